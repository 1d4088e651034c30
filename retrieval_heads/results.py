"""Results: the trial record, the head-score table, the results directory, the published format.

Nothing here computes attention or touches a model (no torch, no transformers): it stores and
reloads what ``scoring.py`` produced, and reads the score files Wu et al. (2024) published.

Three values cross this module's boundary:

- :class:`TrialRecord` — one decoded trial: its parameters, what was generated, the grade, the
  per-scorer ``[layer][head]`` scores and the copy events ``(step, layer, head, key_position)``.
- :class:`HeadScores` — one scorer's scores of every head over many trials, with statistics:
  the mean over *passing* trials (the paper's retrieval score), std, n, a bootstrap 95% CI,
  the mean over all trials, and the per-trial scores themselves.
- :class:`ResultsDir` — a directory holding a run, written so that a killed run can be resumed.

Results directory layout (``SCHEMA_VERSION`` 1)::

    run/
      meta.json          model, kind, config, seed, provenance, timing, status (atomic rewrite)
      trials/            one file per finished trial: <quoted trial id>.json (atomic, write-once)
      trials.jsonl       all trials, one JSON object per line, sorted by trial id (on finalize())
      head_scores.json   HeadScores.to_dict() of the "retrieval" scorer (on finalize())
      .lock              flock-ed by the writing process (pid, host, time inside); the kernel
                         drops a dead holder's flock, so a stale file never blocks

Design: why one file per trial.
    Appending to ``trials.jsonl`` is not atomic (a kill can leave half a line) and rewriting the
    whole file after every trial is quadratic. So each finished trial is written once, atomically
    (temp file in the same directory, fsync, ``os.replace``), as its own file under ``trials/``.
    Those files (with ``trials.jsonl``) *are* the resume state: ``done_ids()`` is their ids, a kill
    loses at most the trial in flight, and appending an id that is already done is skipped (or refused),
    never duplicated. ``finalize()`` merges them with any earlier ``trials.jsonl`` into a new
    ``trials.jsonl`` (sorted by trial id, written atomically), writes ``head_scores.json``, and then
    removes the per-trial files (``keep_trial_files=True`` keeps them). A crash at any point of
    ``finalize()`` is harmless: a trial present both in ``trials.jsonl`` and ``trials/`` is read
    once, and a later ``finalize()`` finishes the job. Reading a directory always takes the union.

Every file is written with :func:`atomic_write_text`, so no partially written file is ever
visible under its final name; stale temp files (``.<name>.*.tmp``) left by a kill are removed when
the directory is next opened for writing.

``head_scores.json`` is byte-deterministic: the same records give the same bytes (trials sorted by
id, heads in (layer, head) order, a seeded bootstrap, no timestamps: timing lives in ``meta.json``).

The published format is ``{"<layer>-<head>": [score in each successful trial, ...]}``. Its import
and export are lossless: exporting an imported file and writing it with ``json.dumps`` gives back
the same bytes for all seven reference files (values that were JSON integers stay integers).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import numpy as np

from retrieval_heads.heads import Head

try:  # POSIX advisory locks; the lock falls back to a pid file where they are missing
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SCHEMA_VERSION",
    "HEAD_SCORES_SCHEMA",
    "RESULTS_SCHEMA",
    "ResultsError",
    "ResultsLocked",
    "TrialRecord",
    "HeadScores",
    "ResultsDir",
    "import_published",
    "export_published",
    "dumps_published",
    "write_published",
    "load_results",
    "load_records",
    "read_meta",
    "provenance",
    "atomic_write_text",
    "check_output_file",
    "check_output_folder",
]

SCHEMA_VERSION = 1
HEAD_SCORES_SCHEMA = "retrieval-heads/head-scores"
RESULTS_SCHEMA = "retrieval-heads/results"

META_FILE = "meta.json"
SCORES_FILE = "head_scores.json"
TRIALS_FILE = "trials.jsonl"
TRIALS_DIR = "trials"
LOCK_FILE = ".lock"

# Exact integers survive a trip through float64 only up to 2**53.
_MAX_EXACT_INT = 2**53
#: The most bootstrap resamples a stored file may ask for (the default is 1,000).
MAX_RESAMPLES = 100_000
# Score cells (trials x layers x heads) a file may ask for: 16 GB of float64.
_MAX_CELLS = 2**31


class ResultsError(ValueError):
    """A results file or directory is malformed, incompatible, or in use."""


class ResultsLocked(ResultsError):
    """Another process holds the results directory's lock."""


# ---------------------------------------------------------------------------------------------
# small helpers


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(value: Any) -> Any:
    """Turn configs and params into plain JSON values (tuples -> lists, Paths -> str, ...)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, Head):
        return value.dotted
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(v) for v in items]
    return str(value)


def _dumps(obj: Any, *, indent: int | None = None) -> str:
    return json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=False)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_UMASK = os.umask(0)
os.umask(_UMASK)  # read once at import: os.umask can only be read by setting it


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a part.

    A temp file in the same directory is written, flushed and fsynced, then renamed over ``path``
    with ``os.replace`` (atomic on POSIX and Windows); the directory is fsynced after.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; results are meant to be shared: give it the umask's mode.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # "[Errno 28] No space left on device: '<path>'"
        raise
    _fsync_dir(path.parent)


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ResultsError(f"{what} {path}: cannot read it ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ResultsError(f"{what} {path}: {_not_utf8(exc)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultsError(
            f"{what} {path}: not valid JSON ({exc}); the file may be truncated or corrupt"
        ) from exc


def _not_utf8(exc: UnicodeDecodeError) -> str:
    return (
        f"not UTF-8 text (byte {exc.object[exc.start]:#04x}); the file is corrupt or not a "
        "retrieval-heads file"
    )


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(
        x, (bool, np.bool_)
    )


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _fmt_source(source: str | Path | None) -> str:
    return str(source) if source is not None else "<in-memory data>"


def _quote_id(trial_id: str) -> str:
    """A reversible, filesystem-safe file stem for a trial id."""
    stem = quote(trial_id, safe="-_=,+@")
    if stem.startswith("."):
        stem = "%2E" + stem[1:]
    return stem


def _unquote_id(stem: str) -> str:
    return unquote(stem)


# ---------------------------------------------------------------------------------------------
# provenance


_PACKAGES = ("retrieval-heads-lens", "numpy", "torch", "transformers", "transformer_lens")


def _git_commit(directory: Path) -> dict[str, Any] | None:
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return {"commit": commit.stdout.strip(), "dirty": dirty}


def provenance(packages: Iterable[str] = _PACKAGES) -> dict[str, Any]:
    """Versions, git commit and time, for ``meta.json``.

    Package versions come from ``importlib.metadata`` (nothing is imported; a missing package
    is ``None``). The git commit is the one of the repository holding this package, or ``None``
    where git or the repository is absent.
    """
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "packages": versions,
        "git": _git_commit(Path(__file__).resolve().parent),
        "host": socket.gethostname(),
        "time": _now(),
    }


# ---------------------------------------------------------------------------------------------
# TrialRecord


@dataclasses.dataclass
class TrialRecord:
    """One decoded trial, as ``scoring.py`` yields it and ``trials.jsonl`` stores it.

    ``scores`` maps a scorer name to a ``[layer][head]`` table; ``"retrieval"`` is always there.
    ``copy_events`` are ``(step, layer, head, key_position)``: at decode step ``step`` head
    ``(layer, head)`` put its argmax attention on ``key_position`` inside the answer span and
    the token there was the one generated.
    """

    trial_id: str
    params: dict[str, Any]
    expected: str
    generated_ids: list[int]
    generated_text: str
    passed: bool
    recall: float
    reason: str | None
    scores: dict[str, list[list[float]]]
    copy_events: list[tuple[int, int, int, int]]
    n_layers: int
    n_heads: int
    elapsed_s: float = 0.0

    def __post_init__(self) -> None:
        # Accept what a scorer naturally hands over (numpy tables, tuples); store plain lists.
        if isinstance(self.scores, Mapping):
            self.scores = {
                k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in self.scores.items()
            }
        if isinstance(self.generated_ids, (np.ndarray, tuple)):
            self.generated_ids = [int(t) for t in self.generated_ids]
        if isinstance(self.copy_events, np.ndarray):
            self.copy_events = [tuple(int(v) for v in e) for e in self.copy_events]
        elif isinstance(self.copy_events, tuple):
            self.copy_events = list(self.copy_events)
        if isinstance(self.passed, np.bool_):
            self.passed = bool(self.passed)

    def score_array(self, scorer: str = "retrieval") -> np.ndarray:
        """The ``[layer, head]`` table of one scorer as a float64 array."""
        if scorer not in self.scores:
            raise KeyError(
                f"trial {self.trial_id!r} has no scorer {scorer!r}; it has {sorted(self.scores)}"
            )
        return np.asarray(self.scores[scorer], dtype=np.float64)

    def active_heads(self) -> set[Head]:
        """Heads with at least one copy event in this trial."""
        return {Head(int(e[1]), int(e[2])) for e in self.copy_events}

    def validate(self, source: str | Path | None = None) -> TrialRecord:
        """Raise :class:`ResultsError` naming ``source`` and the field if anything is malformed."""
        where = f"trial record {self.trial_id!r} in {_fmt_source(source)}"

        def fail(msg: str) -> None:
            raise ResultsError(f"{where}: {msg}")

        if not isinstance(self.trial_id, str) or not self.trial_id:
            raise ResultsError(
                f"trial record in {_fmt_source(source)}: trial_id must be a non-empty string, "
                f"got {self.trial_id!r}"
            )
        if not isinstance(self.params, dict):
            fail(f"params must be an object, got {type(self.params).__name__}")
        try:  # what to_json() will need: NaN or infinity would fail only when written
            _dumps(_jsonable(self.params))
        except ValueError:
            fail("params must hold finite numbers only (NaN and infinity are not JSON)")
        if not isinstance(self.expected, str):
            fail("expected must be a string")
        if not isinstance(self.generated_text, str):
            fail("generated_text must be a string")
        if not isinstance(self.generated_ids, list) or not all(
            _is_int(t) for t in self.generated_ids
        ):
            fail("generated_ids must be a list of integers")
        if not isinstance(self.passed, bool):
            fail(f"passed must be true or false, got {self.passed!r}")
        if not _is_number(self.recall) or not math.isfinite(self.recall):
            fail(f"recall must be a finite number, got {self.recall!r}")
        if self.reason is not None and not isinstance(self.reason, str):
            fail("reason must be a string or null")
        for name in ("n_layers", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(f"{name} must be a positive integer, got {value!r}")
        if not _is_number(self.elapsed_s) or not math.isfinite(self.elapsed_s):
            fail(f"elapsed_s must be a finite number, got {self.elapsed_s!r}")
        if not isinstance(self.scores, dict) or "retrieval" not in self.scores:
            fail("scores must be an object with at least the 'retrieval' scorer")
        for scorer, table in self.scores.items():
            if not isinstance(table, list) or len(table) != self.n_layers:
                fail(f"scores[{scorer!r}] must be a list of {self.n_layers} layers")
            for layer, row in enumerate(table):
                if not isinstance(row, list) or len(row) != self.n_heads:
                    fail(f"scores[{scorer!r}][{layer}] must be a list of {self.n_heads} heads")
                for head, x in enumerate(row):
                    if not _is_number(x) or not math.isfinite(x):
                        fail(f"scores[{scorer!r}][{layer}][{head}] is not a finite number: {x!r}")
        if not isinstance(self.copy_events, list):
            fail("copy_events must be a list")
        for i, event in enumerate(self.copy_events):
            if (
                not isinstance(event, (list, tuple))
                or len(event) != 4
                or not all(_is_int(v) for v in event)
            ):
                fail(f"copy_events[{i}] must be [step, layer, head, key_position], got {event!r}")
            if not (0 <= event[1] < self.n_layers and 0 <= event[2] < self.n_heads):
                fail(f"copy_events[{i}] names head {event[1]}.{event[2]}, outside the model")
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (fixed key order), the form of one ``trials.jsonl`` line."""
        return {
            "trial_id": self.trial_id,
            "params": _jsonable(self.params),
            "expected": self.expected,
            "generated_ids": [int(t) for t in self.generated_ids],
            "generated_text": self.generated_text,
            "passed": bool(self.passed),
            "recall": float(self.recall),
            "reason": self.reason,
            "n_layers": int(self.n_layers),
            "n_heads": int(self.n_heads),
            "elapsed_s": float(self.elapsed_s),
            "scores": {
                name: [[float(x) for x in row] for row in np.asarray(table).tolist()]
                for name, table in sorted(self.scores.items())
            },
            "copy_events": [[int(v) for v in e] for e in self.copy_events],
        }

    def to_json(self) -> str:
        return _dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None) -> TrialRecord:
        """Build and validate a record; errors name ``source`` and the offending field."""
        if not isinstance(data, Mapping):
            raise ResultsError(
                f"trial record in {_fmt_source(source)}: expected an object, "
                f"got {type(data).__name__}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        required = fields - {"elapsed_s", "reason"}
        missing = sorted(required - set(data))
        if missing:
            tid = data.get("trial_id", "?")
            raise ResultsError(
                f"trial record {tid!r} in {_fmt_source(source)}: missing field(s) {missing}"
            )
        kwargs = {k: data[k] for k in fields if k in data}
        scores = kwargs["scores"]
        if isinstance(scores, Mapping):
            kwargs["scores"] = dict(scores)
        events = kwargs["copy_events"]
        if isinstance(events, list):
            kwargs["copy_events"] = [tuple(e) if isinstance(e, list) else e for e in events]
        kwargs.setdefault("reason", None)
        kwargs.setdefault("elapsed_s", 0.0)
        return cls(**kwargs).validate(source)

    @classmethod
    def from_json(cls, line: str, source: str | Path | None = None) -> TrialRecord:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ResultsError(f"{_fmt_source(source)}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, source)


# ---------------------------------------------------------------------------------------------
# HeadScores


def _sum_trials(table: np.ndarray) -> np.ndarray:
    """Sum ``[trial, layer, head]`` over trials with numpy's pairwise summation (it applies only
    along a contiguous axis), so a head's mean equals ``np.mean`` of its list bit for bit."""
    n_trials = table.shape[0]
    # An explicit width: reshape(0, -1) is ambiguous (no passing trial at all).
    flat = np.ascontiguousarray(table.reshape(n_trials, math.prod(table.shape[1:])).T)
    return flat.sum(axis=1).reshape(table.shape[1:])


def _nan_to_none(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


class HeadScores:
    """One scorer's score of every head over a set of trials, with per-head statistics.

    ``values`` is ``[trial, layer, head]``; NaN marks "no score" (a head absent from an imported
    file, or the tail of a shorter list in a ragged one). ``passed`` says which trials count for
    the paper's score. Statistics, each a ``[layer, head]`` array, computed on first use:

    - ``mean``: mean over passing trials — the retrieval score of the paper;
    - ``std``: sample standard deviation (ddof=1) over passing trials (NaN when n < 2);
    - ``n``: number of passing trials with a score;
    - ``ci_low``/``ci_high``: percentile bootstrap CI (``confidence``, default 95%) of ``mean``,
      resampling *trials* (the same resample for every head), ``n_resamples`` draws from a
      ``numpy`` generator seeded with ``seed`` — reproducible;
    - ``mean_all``/``n_all``: over all trials, passing or not.

    A table imported from the published format holds only successful trials (that is all the
    files contain), so there ``mean_all == mean`` and ``n_passed == n_total``.
    """

    def __init__(
        self,
        values: np.ndarray | Sequence,
        passed: Sequence[bool] | np.ndarray | None = None,
        trial_ids: Sequence[str] | None = None,
        *,
        scorer: str = "retrieval",
        present: np.ndarray | None = None,
        int_mask: np.ndarray | None = None,
        n_resamples: int = 1000,
        seed: int = 0,
        confidence: float = 0.95,
        source: str | None = None,
    ) -> None:
        values = np.array(values, dtype=np.float64)
        if values.ndim != 3:
            raise ValueError(f"values must be [trial, layer, head], got shape {values.shape}")
        n_trials, n_layers, n_heads = values.shape
        if n_layers == 0 or n_heads == 0:
            raise ValueError(f"a score table needs at least one layer and head, got {values.shape}")
        if np.isinf(values).any():
            raise ValueError("values must be finite (NaN marks a missing score)")
        passed_arr = (
            np.ones(n_trials, dtype=bool) if passed is None else np.asarray(passed, dtype=bool)
        )
        if passed_arr.shape != (n_trials,):
            raise ValueError(f"passed must have one entry per trial ({n_trials})")
        ids = (
            [str(i) for i in range(n_trials)] if trial_ids is None else [str(t) for t in trial_ids]
        )
        if len(ids) != n_trials:
            raise ValueError(f"trial_ids must have one entry per trial ({n_trials})")
        if len(set(ids)) != len(ids):
            raise ValueError("trial_ids must be unique")
        if present is None:
            present = (
                ~np.isnan(values).all(axis=0) if n_trials else np.ones((n_layers, n_heads), bool)
            )
        present = np.asarray(present, dtype=bool)
        if present.shape != (n_layers, n_heads):
            raise ValueError(f"present must be [layer, head] = {(n_layers, n_heads)}")
        if int_mask is not None:
            int_mask = np.asarray(int_mask, dtype=bool)
            if int_mask.shape != values.shape:
                raise ValueError("int_mask must have the shape of values")
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        if n_resamples < 1:
            raise ValueError("n_resamples must be at least 1")
        self.values = values
        self.passed = passed_arr
        self.trial_ids = ids
        self.scorer = scorer
        self.present = present
        self.int_mask = int_mask
        self.n_resamples = int(n_resamples)
        self.seed = int(seed)
        self.confidence = float(confidence)
        self.source = source
        self._stats: dict[str, np.ndarray] = {}

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_records(
        cls,
        records: Iterable[TrialRecord],
        scorer: str = "retrieval",
        *,
        n_resamples: int = 1000,
        seed: int = 0,
        confidence: float = 0.95,
    ) -> HeadScores:
        """Stack one scorer's tables from records (sorted by trial id, so order never matters)."""
        records = sorted(records, key=lambda r: r.trial_id)
        if not records:
            raise ResultsError("no trial records to build head scores from")
        shape = (records[0].n_layers, records[0].n_heads)
        tables = []
        for record in records:
            if (record.n_layers, record.n_heads) != shape:
                raise ResultsError(
                    f"trial {record.trial_id!r} has {record.n_layers}x{record.n_heads} heads, "
                    f"the others {shape[0]}x{shape[1]}"
                )
            tables.append(record.score_array(scorer))
        return cls(
            np.stack(tables),
            [r.passed for r in records],
            [r.trial_id for r in records],
            scorer=scorer,
            n_resamples=n_resamples,
            seed=seed,
            confidence=confidence,
        )

    # -- shape and per-trial access ------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return self.values.shape[1]

    @property
    def n_heads(self) -> int:
        return self.values.shape[2]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_layers, self.n_heads)

    @property
    def n_total(self) -> int:
        """Number of trials."""
        return self.values.shape[0]

    @property
    def n_passed(self) -> int:
        """Number of passing trials."""
        return int(self.passed.sum())

    @property
    def pass_rate(self) -> float:
        return self.n_passed / self.n_total if self.n_total else float("nan")

    def heads(self) -> list[Head]:
        """The heads that have scores, in (layer, head) order."""
        return [Head(int(layer), int(head)) for layer, head in np.argwhere(self.present)]

    def _index(self, head: Head | str | tuple[int, int]) -> Head:
        h = Head.parse(head)
        h.check(self.n_layers, self.n_heads)
        return h

    def per_trial(self, head: Head | str, *, passing_only: bool = True) -> np.ndarray:
        """Scores of one head, one per (passing) trial that has one, in trial order."""
        h = self._index(head)
        column = self.values[:, h.layer, h.head]
        if passing_only:
            column = column[self.passed]
        return column[~np.isnan(column)]

    # -- statistics ----------------------------------------------------------------------------

    def _compute(self) -> None:
        passing = self.values[self.passed]
        valid = ~np.isnan(passing)
        filled = np.where(valid, passing, 0.0)
        n = valid.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = _sum_trials(filled) / n
            dev = np.where(valid, passing - mean, 0.0)
            std = np.sqrt(_sum_trials(dev**2) / (n - 1))
        mean = np.where(n > 0, mean, np.nan)
        std = np.where(n > 1, std, np.nan)
        valid_all = ~np.isnan(self.values)
        n_all = valid_all.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_all = _sum_trials(np.where(valid_all, self.values, 0.0)) / n_all
        mean_all = np.where(n_all > 0, mean_all, np.nan)
        lo, hi = self._bootstrap(filled, valid)
        absent = ~self.present
        for arr in (mean, std, lo, hi, mean_all):
            arr[absent] = np.nan
        self._stats = {
            "mean": mean,
            "std": std,
            "n": n.astype(np.int64),
            "ci_low": lo,
            "ci_high": hi,
            "mean_all": mean_all,
            "n_all": n_all.astype(np.int64),
        }

    def _bootstrap(self, filled: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Percentile bootstrap of the mean, vectorised: resample weights @ scores."""
        n_trials = filled.shape[0]
        shape = filled.shape[1:]
        if n_trials == 0:
            return np.full(shape, np.nan), np.full(shape, np.nan)
        rng = np.random.default_rng(self.seed)
        weights = rng.multinomial(
            n_trials, np.full(n_trials, 1.0 / n_trials), size=self.n_resamples
        ).astype(np.float64)
        flat = filled.reshape(n_trials, -1)
        counts = weights @ valid.reshape(n_trials, -1).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (weights @ flat) / counts
        alpha = (1.0 - self.confidence) / 2.0
        if np.isnan(means).any():
            with np.errstate(invalid="ignore"), _quiet_nan_warnings():
                lo, hi = np.nanquantile(means, [alpha, 1.0 - alpha], axis=0)
        else:
            lo, hi = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
        return lo.reshape(shape), hi.reshape(shape)

    def _stat(self, name: str) -> np.ndarray:
        if not self._stats:
            self._compute()
        try:
            return self._stats[name]
        except KeyError:
            raise ValueError(
                f"unknown statistic {name!r}; choose one of {sorted(self._stats)}"
            ) from None

    @property
    def mean(self) -> np.ndarray:
        """Mean over passing trials, ``[layer, head]`` (the paper's retrieval score)."""
        return self._stat("mean")

    @property
    def std(self) -> np.ndarray:
        return self._stat("std")

    @property
    def n(self) -> np.ndarray:
        return self._stat("n")

    @property
    def ci_low(self) -> np.ndarray:
        return self._stat("ci_low")

    @property
    def ci_high(self) -> np.ndarray:
        return self._stat("ci_high")

    @property
    def mean_all(self) -> np.ndarray:
        return self._stat("mean_all")

    @property
    def n_all(self) -> np.ndarray:
        return self._stat("n_all")

    def as_array(self, stat: str = "mean") -> np.ndarray:
        """A copy of one statistic as ``[layer, head]`` (NaN for heads without scores)."""
        return self._stat(stat).copy()

    def stats(self, head: Head | str) -> dict[str, Any]:
        """All statistics of one head."""
        h = self._index(head)
        out: dict[str, Any] = {"head": h.dotted}
        for name in ("mean", "std", "n", "ci_low", "ci_high", "mean_all", "n_all"):
            value = self._stat(name)[h.layer, h.head]
            out[name] = int(value) if name in ("n", "n_all") else float(value)
        return out

    def score(self, head: Head | str, stat: str = "mean") -> float:
        h = self._index(head)
        return float(self._stat(stat)[h.layer, h.head])

    def ranking(self, stat: str = "mean") -> list[tuple[Head, float]]:
        """Heads with a score, best first; ties in (layer, head) order (a stable sort)."""
        table = self._stat(stat)
        heads = self.heads()
        values = np.array([table[h.layer, h.head] for h in heads], dtype=np.float64)
        keyed = np.where(np.isnan(values), -np.inf, values)
        order = np.argsort(-keyed, kind="stable")
        return [(heads[i], float(values[i])) for i in order]

    def top(self, k: int, stat: str = "mean") -> list[Head]:
        """The ``k`` best heads by ``stat``, best first (ties broken by (layer, head))."""
        if k < 0:
            raise ValueError("k must be >= 0")
        return [h for h, _ in self.ranking(stat)[:k]]

    def above(self, threshold: float = 0.1, stat: str = "mean") -> list[Head]:
        """Heads whose ``stat`` is strictly above ``threshold``, best first."""
        return [h for h, v in self.ranking(stat) if v > threshold]

    def kv_heads(self, n_kv_heads: int, how: str = "max", stat: str = "mean") -> np.ndarray:
        """Aggregate query heads to key/value heads for grouped-query attention.

        Query head ``h`` reads kv head ``h // (n_heads // n_kv_heads)`` (the Llama/Mistral
        ``repeat_kv`` layout). ``how="max"`` (the default) gives each kv head the best score of
        its query heads — a kv head is a retrieval head if any query head reading it is one;
        ``how="mean"`` averages them. Returns ``[layer, kv_head]``; heads without scores are
        ignored (NaN only when a whole group has none).
        """
        if n_kv_heads <= 0 or self.n_heads % n_kv_heads:
            raise ValueError(
                f"n_kv_heads={n_kv_heads} must divide the number of query heads ({self.n_heads})"
            )
        table = self._stat(stat).reshape(self.n_layers, n_kv_heads, self.n_heads // n_kv_heads)
        with _quiet_nan_warnings():
            if how == "max":
                return np.nanmax(table, axis=2)
            if how == "mean":
                return np.nanmean(table, axis=2)
        raise ValueError(f"how must be 'max' or 'mean', got {how!r}")

    # -- serialisation -------------------------------------------------------------------------

    def _trial_values(self, layer: int, head: int, rows: np.ndarray | None = None) -> list:
        """One head's per-trial values as JSON numbers; ints stay ints (lossless round trips)."""
        column = self.values[:, layer, head]
        if rows is not None:
            column = column[rows]
        out: list[Any] = column.tolist()
        if self.int_mask is not None:
            mask = self.int_mask[:, layer, head]
            if rows is not None:
                mask = mask[rows]
            for i in np.flatnonzero(mask):
                out[i] = int(out[i])
        for i in np.flatnonzero(np.isnan(column)):
            out[i] = None
        return out

    def to_dict(self) -> dict[str, Any]:
        """The ``head_scores.json`` form: schema-versioned, deterministic, no timestamps.

        Heads are keyed ``"L.H"`` in (layer, head) order; ``per_trial`` lists each head's score
        in every trial (``trials.ids`` order; ``null`` = no score). Statistics are included for
        readers and recomputed on load.
        """
        heads: dict[str, Any] = {}
        per_trial: dict[str, Any] = {}
        for h in self.heads():
            s = self.stats(h)
            heads[h.dotted] = {
                "mean": _nan_to_none(s["mean"]),
                "std": _nan_to_none(s["std"]),
                "n": s["n"],
                "ci95": [_nan_to_none(s["ci_low"]), _nan_to_none(s["ci_high"])],
                "mean_all": _nan_to_none(s["mean_all"]),
                "n_all": s["n_all"],
            }
            per_trial[h.dotted] = self._trial_values(h.layer, h.head)
        return {
            "schema": HEAD_SCORES_SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "scorer": self.scorer,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_trials": self.n_total,
            "n_passed": self.n_passed,
            "bootstrap": {
                "n_resamples": self.n_resamples,
                "seed": self.seed,
                "confidence": self.confidence,
            },
            "trials": {"ids": list(self.trial_ids), "passed": [bool(p) for p in self.passed]},
            "heads": heads,
            "per_trial": per_trial,
        }

    def to_json(self) -> str:
        return _dumps(self.to_dict(), indent=1) + "\n"

    def save(self, path: str | Path) -> None:
        """Write ``to_json()`` atomically; never over a results folder's files (E56): a run's
        own ``head_scores.json`` is written by its :class:`ResultsDir` only."""
        check_output_file(path, "head scores")
        atomic_write_text(path, self.to_json())

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None) -> HeadScores:
        where = f"head-scores file {_fmt_source(source)}"
        if not isinstance(data, Mapping):
            raise ResultsError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("schema") != HEAD_SCORES_SCHEMA:
            raise ResultsError(f"{where}: not a head-scores file (schema={data.get('schema')!r})")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ResultsError(
                f"{where}: schema version {version!r}; this version of retrieval-heads reads "
                f"version {SCHEMA_VERSION}"
            )
        try:
            n_layers, n_heads = int(data["n_layers"]), int(data["n_heads"])
            ids = list(data["trials"]["ids"])
            passed = list(data["trials"]["passed"])
            per_trial = data["per_trial"]
            boot = data.get("bootstrap", {})
            if not isinstance(boot, Mapping):
                raise TypeError(f"bootstrap must be an object, got {type(boot).__name__}")
            n_resamples = int(boot.get("n_resamples", 1000))
            boot_seed = int(boot.get("seed", 0))
            confidence = float(boot.get("confidence", 0.95))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ResultsError(f"{where}: missing or malformed field ({exc!r})") from exc
        if len(passed) != len(ids) or not all(isinstance(p, bool) for p in passed):
            raise ResultsError(f"{where}: trials.passed must be one true/false per trial id")
        if not 1 <= n_resamples <= MAX_RESAMPLES or not 0 < confidence < 1:
            # an untrusted file must not make the bootstrap allocate without bound
            raise ResultsError(
                f"{where}: bootstrap n_resamples must be 1..{MAX_RESAMPLES} and confidence "
                f"within (0, 1), got {n_resamples} and {confidence}"
            )
        if not isinstance(per_trial, Mapping):
            raise ResultsError(f"{where}: per_trial must be an object")
        values = _table((len(ids), n_layers, n_heads), where)
        int_mask = np.zeros(values.shape, dtype=bool)
        present = np.zeros((n_layers, n_heads), dtype=bool)
        for label, column in per_trial.items():
            head = _parse_label(label, where, n_layers, n_heads)
            if not isinstance(column, list) or len(column) != len(ids):
                raise ResultsError(
                    f"{where}: per_trial[{label!r}] must be a list with one entry per trial "
                    f"({len(ids)})"
                )
            col, is_int = _column(column, where, label, allow_none=True)
            values[:, head.layer, head.head] = col
            int_mask[:, head.layer, head.head] = is_int
            present[head.layer, head.head] = True
        try:
            scores = cls(
                values,
                passed,
                ids,
                scorer=str(data.get("scorer", "retrieval")),
                present=present,
                int_mask=int_mask if int_mask.any() else None,
                n_resamples=n_resamples,
                seed=boot_seed,
                confidence=confidence,
                source=str(source) if source is not None else None,
            )
        except ValueError as exc:
            raise ResultsError(f"{where}: {exc}") from exc
        # The stored statistics must agree with the per-trial scores they summarise.
        stored = data.get("heads", {})
        if isinstance(stored, Mapping):
            for label, entry in stored.items():
                h = _parse_label(label, where, n_layers, n_heads)
                if not isinstance(entry, Mapping) or entry.get("n") != int(
                    scores.n[h.layer, h.head]
                ):
                    raise ResultsError(f"{where}: heads[{label!r}] disagrees with per_trial")
        return scores

    @classmethod
    def load(cls, path: str | Path) -> HeadScores:
        path = Path(path)
        return cls.from_dict(_read_json(path, "head-scores file"), path)

    def __repr__(self) -> str:
        return (
            f"HeadScores(scorer={self.scorer!r}, {self.n_layers}x{self.n_heads} heads, "
            f"{self.n_passed}/{self.n_total} passing trials)"
        )


class _quiet_nan_warnings:
    """Silence numpy's all-NaN-slice RuntimeWarnings inside a block."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# published format


def _table(shape: tuple[int, int, int], where: str) -> np.ndarray:
    """An all-NaN ``[trial, layer, head]`` table, or a ResultsError for a shape no model has."""
    if min(shape[1:]) <= 0 or min(shape) < 0:
        raise ResultsError(f"{where}: a score table needs layers and heads, got shape {shape}")
    too_large = ResultsError(
        f"{where}: a {shape[1]} x {shape[2]} head table over {shape[0]} trials is too large to "
        "hold; is a head label wrong?"
    )
    if math.prod(shape) > _MAX_CELLS:  # refuse before allocating (overcommit would say yes)
        raise too_large
    try:
        return np.full(shape, np.nan)
    except (ValueError, MemoryError):
        raise too_large from None


def _parse_label(label: Any, where: str, n_layers: int | None, n_heads: int | None) -> Head:
    if not isinstance(label, str):
        raise ResultsError(f"{where}: key {label!r} is not a head label like '14-7'")
    try:
        head = Head.parse(label)
    except ValueError as exc:
        raise ResultsError(f"{where}: key {label!r} is not a head label like '14-7'") from exc
    if n_layers is not None and n_heads is not None:
        try:
            head.check(n_layers, n_heads)
        except ValueError as exc:
            raise ResultsError(f"{where}: key {label!r}: {exc}") from exc
    return head


def _check_value(x: Any, where: str, label: str, index: int) -> float:
    if not _is_number(x):
        raise ResultsError(f"{where}: key {label!r}, trial {index}: score {x!r} is not a number")
    if isinstance(x, (int, np.integer)) and abs(int(x)) > _MAX_EXACT_INT:
        raise ResultsError(
            f"{where}: key {label!r}, trial {index}: integer {x} is too large to hold exactly"
        )
    value = float(x)
    if not math.isfinite(value):
        raise ResultsError(
            f"{where}: key {label!r}, trial {index}: score {x!r} is not a finite number"
        )
    return value


def _column(
    column: list, where: str, label: str, *, allow_none: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One head's list of JSON numbers -> (float64 values, was-an-int mask); NaN for ``None``."""
    kinds = set(map(type, column))
    if kinds <= {int, float}:  # the fast path: plain JSON numbers
        values = np.array(column, dtype=np.float64)
        is_int = np.fromiter((type(x) is int for x in column), dtype=bool, count=len(column))
        if np.isfinite(values).all() and (
            not is_int.any() or np.abs(values[is_int]).max() <= _MAX_EXACT_INT
        ):
            return values, is_int
    values = np.empty(len(column), dtype=np.float64)
    is_int = np.zeros(len(column), dtype=bool)
    for i, x in enumerate(column):
        if x is None and allow_none:
            values[i] = np.nan
            continue
        values[i] = _check_value(x, where, label, i)
        is_int[i] = isinstance(x, (int, np.integer))
    return values, is_int


def import_published(
    source: str | Path | Mapping[str, Any],
    *,
    n_layers: int | None = None,
    n_heads: int | None = None,
    scorer: str = "retrieval",
    name: str | None = None,
) -> HeadScores:
    """Read a published ``{"<layer>-<head>": [score per successful trial]}`` file or dict.

    The shape is inferred from the labels (largest layer and head + 1) unless given; heads the
    file does not list are absent (NaN), not zero. Lists may differ in length (the table is
    padded with NaN). All trials count as passing: the files hold successful trials only. Which
    values were JSON integers is remembered, so :func:`export_published` gives the file back.
    Raises :class:`ResultsError` naming the file and the offending key on bad input.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        where = f"published score file {path}"
        data = _read_json(path, "published score file")
        label_source = str(path)
    else:
        where = f"published scores {name or '<dict>'}"
        data = source
        label_source = name
    if not isinstance(data, Mapping):
        raise ResultsError(
            f"{where}: expected a JSON object {{'layer-head': [scores]}}, got {type(data).__name__}"
        )
    if not data:
        raise ResultsError(f"{where}: has no heads")
    if (n_layers is None) != (n_heads is None):
        raise ValueError("give both n_layers and n_heads, or neither")
    parsed: list[tuple[Head, str, list]] = []
    seen: dict[Head, str] = {}
    for label, column in data.items():
        head = _parse_label(label, where, n_layers, n_heads)
        if head in seen:
            raise ResultsError(f"{where}: keys {seen[head]!r} and {label!r} name the same head")
        seen[head] = label
        if not isinstance(column, list):
            raise ResultsError(
                f"{where}: key {label!r}: expected a list of scores, got {type(column).__name__}"
            )
        parsed.append((head, label, column))
    if n_layers is None or n_heads is None:
        n_layers = max(h.layer for h, _, _ in parsed) + 1
        n_heads = max(h.head for h, _, _ in parsed) + 1
    n_trials = max(len(column) for _, _, column in parsed)
    values = _table((n_trials, n_layers, n_heads), where)
    int_mask = np.zeros(values.shape, dtype=bool)
    present = np.zeros((n_layers, n_heads), dtype=bool)
    for head, label, column in parsed:
        present[head.layer, head.head] = True
        col, is_int = _column(column, where, label)
        values[: len(column), head.layer, head.head] = col
        int_mask[: len(column), head.layer, head.head] = is_int
    return HeadScores(
        values,
        np.ones(n_trials, dtype=bool),
        [f"published-{i}" for i in range(n_trials)],
        scorer=scorer,
        present=present,
        int_mask=int_mask,
        source=label_source,
    )


def export_published(scores: HeadScores, *, passing_only: bool = True) -> dict[str, list]:
    """The published format: ``{"L-H": [score per passing trial]}``, heads in (layer, head) order.

    Trials without a score for a head are left out of its list. Values imported as JSON integers
    are written as integers, so import → export → ``json.dumps`` reproduces a published file.
    """
    rows = np.flatnonzero(scores.passed) if passing_only else np.arange(scores.n_total)
    out: dict[str, list] = {}
    for h in scores.heads():
        out[h.dashed] = [x for x in scores._trial_values(h.layer, h.head, rows) if x is not None]
    return out


def dumps_published(published: Mapping[str, list]) -> str:
    """Serialise like the authors did (``json.dumps`` defaults: ``", "`` and ``": "``)."""
    return json.dumps(published, allow_nan=False)


def write_published(scores: HeadScores, path: str | Path, *, passing_only: bool = True) -> None:
    """Export ``scores`` to the published format, atomically (never over a run's own files)."""
    check_output_file(path, "exported score file", is_ours=_is_published_file)
    atomic_write_text(path, dumps_published(export_published(scores, passing_only=passing_only)))


def _is_published_file(path: Path) -> bool:
    """Whether ``path`` holds scores in the published format (an earlier export)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and all(
        isinstance(k, str) and k.replace("-", "", 1).isdigit() and "-" in k for k in data
    )


# ---------------------------------------------------------------------------------------------
# what a results folder owns: no other writer may land on it

#: Names a results folder (or its shards) owns, whether or not they exist yet: ``kv-sim``'s
#: export (``kvcache.export_heads``) and ``patch``'s file included.
OWNED_NAMES = frozenset(
    {META_FILE, SCORES_FILE, TRIALS_FILE, TRIALS_DIR, LOCK_FILE, "shards", "duo_attention",
     "kv_head_scores.tsv", "full_attention_heads.json", "patching.json"}
)  # fmt: skip


def results_folder_of(path: str | Path) -> Path | None:
    """The results folder ``path`` lies in (a folder with a ``meta.json``, up to 3 levels up:
    ``run/trials/x.json``, ``run/shards/0-of-2/meta.json``), or None."""
    path = Path(path).absolute()
    for folder in list(path.parents)[:3]:
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # no meta.json, or not ours: a folder like any other
        if isinstance(meta, dict) and meta.get("schema") == RESULTS_SCHEMA:
            return folder
    return None


def check_output_file(
    path: str | Path, what: str, *, owns: Iterable[str] = (), is_ours=None
) -> None:
    """Refuse an output file that is a folder, or that would land on a results folder's files.

    Inside a results folder a writer may add a new file, write the names it ``owns`` (``patch``
    owns ``patching.json``), and rewrite an existing file only when ``is_ours(path)`` says it
    made it (a report over an earlier report). The folder's own names (``OWNED_NAMES``) are
    refused even when absent: a later run would read what was written there."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"--out {path} is a directory: give a file name inside it")
    folder = results_folder_of(path)
    if folder is None:
        return
    relative = path.absolute().relative_to(folder)
    name = relative.parts[0]
    if name in set(owns) and len(relative.parts) == 1:
        return
    owned = name in OWNED_NAMES
    if owned or (path.exists() and not (is_ours and is_ours(path))):
        held = "its own file" if path.exists() else "a name that folder owns"
        raise ValueError(
            f"the {what} {path} would land on {relative}, {held}, in the results folder "
            f"{folder}: write it under another name (results are never overwritten)"
        )


def check_output_folder(path: str | Path) -> None:
    """Refuse a results folder's ``--out`` that is a file, or that lies inside another results
    folder's own files (``run/trials``): checked before any model loads."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a folder: give a results folder's path")
    folder = results_folder_of(path / META_FILE)
    if folder is not None and folder != path.absolute():
        relative = path.absolute().relative_to(folder)
        if relative.parts[0] in OWNED_NAMES:
            raise ValueError(
                f"--out {path} lies in {relative.parts[0]}/ of the results folder {folder}, "
                "which that run owns: give a folder of its own"
            )


# ---------------------------------------------------------------------------------------------
# the results directory


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class _DirLock:
    """An exclusive lock on a directory: ``flock`` on ``.lock`` (released by the kernel when the
    holder dies, so a stale file never blocks), or where ``fcntl`` is missing, an O_EXCL pid file
    whose holder is checked for liveness. The file holds the holder's pid, host and start time."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return f"pid {info.get('pid')} on {info.get('host')} since {info.get('time')}"
        except (OSError, ValueError, AttributeError):
            return "another process"

    def _busy(self) -> ResultsLocked:
        return ResultsLocked(
            f"results directory {self.path.parent} is in use by {self._holder()} "
            f"(lock file {self.path}); wait for it to finish, or write to another directory"
        )

    def _info(self) -> str:
        return _dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": _now()})

    def acquire(self) -> None:
        if fcntl is None:  # Windows
            self._acquire_pidfile()
            return
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy() from None
            except OSError:  # a filesystem without flock (some network mounts)
                os.close(fd)
                self._acquire_pidfile()
                return
            # The holder before us may have unlinked the file between our open and our flock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, self._info().encode())
                    os.fsync(fd)
                except BaseException:  # e.g. a full disk: do not keep the flock on a dead fd
                    os.close(fd)
                    raise
                self._fd = fd
                return
            os.close(fd)
        raise self._busy()

    def _acquire_pidfile(self) -> None:
        """O_EXCL create; a lock left by a dead process on this host is stale and replaced."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    info = json.loads(self.path.read_text(encoding="utf-8"))
                    stale = info.get("host") == socket.gethostname() and not _pid_alive(
                        int(info.get("pid"))
                    )
                except (OSError, ValueError, TypeError, AttributeError):
                    stale = False
                if not stale:
                    raise self._busy() from None
                self.path.unlink(missing_ok=True)
                continue
            try:
                os.write(fd, self._info().encode())
            except BaseException:  # an empty pid file would block every later writer
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            os.close(fd)
            self._fd = -1
            return
        raise self._busy()

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _trial_path(trials_dir: Path, trial_id: str) -> Path:
    return trials_dir / f"{_quote_id(trial_id)}.json"


def _read_jsonl(path: Path) -> list[TrialRecord]:
    records = []
    try:
        # split("\n"), not splitlines(): JSON strings may hold U+2028, U+0085 ... unescaped
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as exc:
        raise ResultsError(f"trials file {path}: cannot read it ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ResultsError(f"trials file {path}: {_not_utf8(exc)}") from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            records.append(TrialRecord.from_json(line, f"{path}, line {number}"))
    return records


def _read_trial_files(trials_dir: Path) -> dict[str, TrialRecord]:
    out: dict[str, TrialRecord] = {}
    if not trials_dir.is_dir():
        return out
    for path in sorted(trials_dir.glob("*.json")):
        record = TrialRecord.from_dict(_read_json(path, "trial file"), path)
        if record.trial_id != _unquote_id(path.stem):
            raise ResultsError(f"trial file {path}: holds trial {record.trial_id!r}")
        out[record.trial_id] = record
    return out


def load_records(directory: str | Path) -> list[TrialRecord]:
    """All trials of a results directory (``trials.jsonl`` ∪ ``trials/``), sorted by id."""
    directory = Path(directory)
    merged: dict[str, TrialRecord] = {}
    jsonl = directory / TRIALS_FILE
    if jsonl.exists():
        for record in _read_jsonl(jsonl):
            if record.trial_id in merged:
                raise ResultsError(f"trials file {jsonl}: trial {record.trial_id!r} is duplicated")
            merged[record.trial_id] = record
    merged.update(_read_trial_files(directory / TRIALS_DIR))
    return [merged[k] for k in sorted(merged)]


def read_meta(directory: str | Path) -> dict[str, Any]:
    """A results directory's ``meta.json``; :class:`ResultsError` if it is missing or not ours."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise ResultsError(f"results directory {directory} has no {META_FILE}")
    meta = _read_json(path, "results metadata")
    if not isinstance(meta, dict) or meta.get("schema") != RESULTS_SCHEMA:
        raise ResultsError(f"results metadata {path} is not a retrieval-heads results file")
    return meta


def _config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        diffs = []
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                diffs.append(f"{path}: new")
            elif key not in new:
                diffs.append(f"{path}: missing")
            else:
                diffs.extend(_config_diff(old[key], new[key], path))
        return diffs
    return [] if old == new else [f"{prefix or 'config'}: {old!r} -> {new!r}"]


class ResultsDir:
    """A results directory open for writing: atomic files, resume by trial id, a lock.

    ``model``, ``kind``, ``config`` and ``seed`` identify the run; reopening a directory made for
    another of any of them (or by an incompatible schema version) raises :class:`ResultsError`,
    unless ``overwrite=True``, which deletes this module's files in it (and nothing else) and
    starts afresh. Use as a context manager, or call :meth:`close`, to release the lock::

        with ResultsDir(out, model="tiny", config=cfg) as run:
            for trial in trials:
                if trial.trial_id in run:
                    continue
                run.append(score(trial))
            run.finalize()
    """

    def __init__(
        self,
        path: str | Path,
        *,
        model: str,
        config: Mapping[str, Any] | None = None,
        kind: str = "detect",
        seed: int | None = None,
        overwrite: bool = False,
        extra_meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.trials_dir = self.path / TRIALS_DIR
        self._lock = _DirLock(self.path)
        self._lock.acquire()
        try:
            self._open(model, config, kind, seed, overwrite, extra_meta)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, model, config, kind, seed, overwrite, extra_meta) -> None:
        meta_path = self.path / META_FILE
        self._clean_temp_files()
        wanted = {
            "kind": kind,
            "model": str(model),
            "config": _jsonable(dict(config or {})),
            "seed": seed,
        }
        if overwrite:
            self._clear()
        if meta_path.exists():
            meta = _read_json(meta_path, "results metadata")
            self._check_compatible(meta, wanted)
            meta.setdefault("resumed", []).append(_now())
            meta["status"] = "running"
        else:
            # An empty trials/ is what a run killed (or out of disk) before its first meta.json
            # write leaves: nothing to lose, so it does not block a fresh start.
            if (self.path / TRIALS_FILE).exists() or any(self.trials_dir.glob("*.json")):
                raise ResultsError(
                    f"results directory {self.path} has trials but no {META_FILE}, so what made "
                    "them is unknown; pass overwrite=True to start afresh"
                )
            meta = {
                "schema": RESULTS_SCHEMA,
                "schema_version": SCHEMA_VERSION,
                **wanted,
                "provenance": provenance(),
                "created": _now(),
                "status": "running",
                "extra": _jsonable(dict(extra_meta or {})),
            }
        self.meta: dict[str, Any] = meta
        # Read what is done before touching meta.json: a corrupt trials.jsonl fails here and
        # leaves the directory exactly as it was.
        self._done: set[str] = set(_jsonl_ids(self.path / TRIALS_FILE))
        self.trials_dir.mkdir(exist_ok=True)
        self._done.update(_unquote_id(p.stem) for p in self.trials_dir.glob("*.json"))
        self._write_meta()
        self._shape: tuple[int, int] | None = None

    def _check_compatible(self, meta: Any, wanted: dict[str, Any]) -> None:
        where = f"results directory {self.path}"
        if not isinstance(meta, dict) or meta.get("schema") != RESULTS_SCHEMA:
            raise ResultsError(f"{where}: {META_FILE} is not a retrieval-heads results file")
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise ResultsError(
                f"{where} was written with schema version {meta.get('schema_version')!r}; this "
                f"version of retrieval-heads writes version {SCHEMA_VERSION}. Use another "
                "directory, or pass overwrite=True to replace it"
            )
        problems = []
        for key in ("kind", "model", "seed"):
            if meta.get(key) != wanted[key]:
                problems.append(f"{key}: {meta.get(key)!r} there, {wanted[key]!r} now")
        problems += _config_diff(meta.get("config"), wanted["config"])
        if problems:
            raise ResultsError(
                f"{where} was made for another run ({'; '.join(problems)}). Use another "
                "directory, or pass overwrite=True to replace it"
            )

    def _stored_shape(self) -> tuple[int, int] | None:
        """(n_layers, n_heads) of one stored trial, reading as little as possible."""
        for path in self.trials_dir.glob("*.json"):
            data = _read_json(path, "trial file")
            return int(data["n_layers"]), int(data["n_heads"])
        jsonl = self.path / TRIALS_FILE
        if jsonl.exists():
            with jsonl.open(encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        data = json.loads(line)
                        return int(data["n_layers"]), int(data["n_heads"])
        return None

    def _clean_temp_files(self) -> None:
        """Remove temp files a killed writer left (only this module's own names)."""
        patterns = [(self.path, f".{name}.*.tmp") for name in (META_FILE, SCORES_FILE, TRIALS_FILE)]
        patterns.append((self.trials_dir, ".*.json.*.tmp"))
        for directory, pattern in patterns:
            if directory.is_dir():
                for tmp in directory.glob(pattern):
                    tmp.unlink(missing_ok=True)

    def _clear(self) -> None:
        for name in (META_FILE, SCORES_FILE, TRIALS_FILE):
            (self.path / name).unlink(missing_ok=True)
        if self.trials_dir.is_dir():
            for path in self.trials_dir.glob("*.json"):
                path.unlink()
            try:
                self.trials_dir.rmdir()
            except OSError:
                pass

    def _write_meta(self) -> None:
        atomic_write_text(self.path / META_FILE, _dumps(self.meta, indent=2) + "\n")

    def _check_open(self) -> None:
        if not self._lock.held:
            raise ResultsError(f"results directory {self.path} is closed")

    # -- resume and append ---------------------------------------------------------------------

    def done_ids(self) -> frozenset[str]:
        """Ids of the trials already stored (in ``trials.jsonl`` or ``trials/``)."""
        return frozenset(self._done)

    def __contains__(self, trial_id: object) -> bool:
        return trial_id in self._done

    def __len__(self) -> int:
        return len(self._done)

    def append(self, record: TrialRecord, *, on_duplicate: str = "skip") -> bool:
        """Store one finished trial atomically; ``False`` if its id is already done.

        ``on_duplicate="error"`` raises instead of skipping. A record is never stored twice.
        """
        self._check_open()
        if on_duplicate not in ("skip", "error"):
            raise ValueError("on_duplicate must be 'skip' or 'error'")
        record.validate(f"append to {self.path}")
        if record.trial_id in self._done:
            if on_duplicate == "error":
                raise ResultsError(
                    f"results directory {self.path}: trial {record.trial_id!r} is already done"
                )
            return False
        shape = (record.n_layers, record.n_heads)
        if self._shape is None and self._done:
            self._shape = self._stored_shape()
        if self._shape is not None and shape != self._shape:
            raise ResultsError(
                f"results directory {self.path}: trial {record.trial_id!r} has "
                f"{shape[0]}x{shape[1]} heads, the stored trials {self._shape[0]}x{self._shape[1]}"
            )
        self._shape = shape
        atomic_write_text(_trial_path(self.trials_dir, record.trial_id), record.to_json() + "\n")
        self._done.add(record.trial_id)
        return True

    def records(self) -> list[TrialRecord]:
        """All stored trials, sorted by trial id."""
        return load_records(self.path)

    def head_scores(self, scorer: str = "retrieval", **bootstrap: Any) -> HeadScores:
        return HeadScores.from_records(self.records(), scorer, **bootstrap)

    # -- finishing -----------------------------------------------------------------------------

    def finalize(
        self,
        *,
        timing: Mapping[str, Any] | None = None,
        keep_trial_files: bool = False,
        **bootstrap: Any,
    ) -> HeadScores | None:
        """Write ``trials.jsonl`` (sorted by id) and ``head_scores.json``, update ``meta.json``.

        Returns the retrieval :class:`HeadScores` (``None`` when there are no trials). Safe to
        call again, and safe to be killed in: the per-trial files are removed only after the
        merged ``trials.jsonl`` is in place.
        """
        self._check_open()
        records = self.records()
        text = "".join(r.to_json() + "\n" for r in records)
        atomic_write_text(self.path / TRIALS_FILE, text)
        scores = None
        if records:
            scores = HeadScores.from_records(records, "retrieval", **bootstrap)
            atomic_write_text(self.path / SCORES_FILE, scores.to_json())
        if not keep_trial_files:
            for path in self.trials_dir.glob("*.json"):
                path.unlink()
        elapsed = sum(float(r.elapsed_s) for r in records)
        self.meta.update(
            status="finished",
            finished=_now(),
            n_trials=len(records),
            n_passed=sum(r.passed for r in records),
            scorers=sorted({name for r in records for name in r.scores}),
            timing={"trials_elapsed_s": elapsed, **_jsonable(dict(timing or {}))},
        )
        self._write_meta()
        return scores

    def update_meta(self, **fields: Any) -> None:
        """Add fields to ``meta.json`` (atomically)."""
        self._check_open()
        self.meta.update(_jsonable(fields))
        self._write_meta()

    def close(self) -> None:
        """Release the lock (trials already appended are safe on disk)."""
        self._lock.release()

    def __enter__(self) -> ResultsDir:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is not None and self.meta.get("status") == "running":
                # Said in meta.json, not left "running": what stopped it, and how to go on.
                # (A killed process cannot say so; a rerun resumes either way.)
                stopped = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
                first = (str(exc).strip().splitlines() or [""])[0]
                self.update_meta(
                    status=stopped, failure=f"{exc_type.__name__}: {first}".rstrip(": ")
                )
        except OSError:  # the disk that failed the run may fail this too: the trials are safe
            pass
        finally:
            self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    def __repr__(self) -> str:
        return f"ResultsDir({str(self.path)!r}, {len(self._done)} trials done)"


def _jsonl_ids(path: Path) -> list[str]:
    """Trial ids in a ``trials.jsonl`` (parsed, not validated: resuming a big run stays fast)."""
    if not path.exists():
        return []
    ids = []
    try:
        with path.open(encoding="utf-8", newline="\n") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        ids.append(json.loads(line)["trial_id"])
                    except (ValueError, KeyError, TypeError) as exc:
                        raise ResultsError(
                            f"trials file {path}, line {number}: not a trial record ({exc!r})"
                        ) from exc
    except UnicodeDecodeError as exc:
        raise ResultsError(f"trials file {path}: {_not_utf8(exc)}") from None
    return ids


# ---------------------------------------------------------------------------------------------
# reading back


def load_results(path: str | Path) -> tuple[dict[str, Any], HeadScores, list[TrialRecord]]:
    """Read results back: ``(meta, retrieval HeadScores, trial records)``.

    ``path`` may be a results directory, a ``head_scores.json`` (project format), a published
    ``{"L-H": [...]}`` score file, or a ``trials.jsonl``; the format is detected. For single
    files ``meta`` says what was read and the record list may be empty.
    """
    path = Path(path)
    if path.is_dir():
        meta_path = path / META_FILE
        meta = _read_json(meta_path, "results metadata") if meta_path.exists() else {}
        records = load_records(path)
        scores_path = path / SCORES_FILE
        if scores_path.exists():
            scores = HeadScores.load(scores_path)
            stored = set(scores.trial_ids)
            if stored != {r.trial_id for r in records}:
                scores = HeadScores.from_records(records) if records else scores
        elif records:
            scores = HeadScores.from_records(records)
        else:
            raise ResultsError(f"results directory {path} holds no trials and no {SCORES_FILE}")
        return meta, scores, records
    if not path.exists():
        raise ResultsError(f"no results at {path}")
    if path.suffix == ".jsonl":
        records = _read_jsonl(path)
        if not records:
            raise ResultsError(f"trials file {path} is empty")
        return {"format": "trials", "source": str(path)}, HeadScores.from_records(records), records
    data = _read_json(path, "score file")
    if isinstance(data, Mapping) and data.get("schema") == HEAD_SCORES_SCHEMA:
        return {"format": "head-scores", "source": str(path)}, HeadScores.from_dict(data, path), []
    if isinstance(data, Mapping) and "schema" in data:
        raise ResultsError(
            f"score file {path}: unknown schema {data.get('schema')!r}; expected "
            f"{HEAD_SCORES_SCHEMA!r} or a published {{'layer-head': [scores]}} file"
        )
    if not isinstance(data, Mapping):  # never a str: import_published would read it as a path
        raise ResultsError(
            f"score file {path}: expected a JSON object (a head-scores file or a published "
            f"{{'layer-head': [scores]}} file), got {type(data).__name__}"
        )
    scores = import_published(data, name=str(path))
    return {"format": "published", "source": str(path)}, scores, []
