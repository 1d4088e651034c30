"""The results folder on disk: :class:`ResultsDir` writes a run so that a killed run can be resumed;
:func:`load_records`, :func:`read_meta` and :func:`load_results` read it (or one score file) back.

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

It never computes a score and never touches a model (no torch, no transformers): it stores and
reloads what ``scoring.py`` produced. Records, score tables and the published format are
:mod:`~retrieval_heads.records`, :mod:`~retrieval_heads.scores` and
:mod:`~retrieval_heads.published`; the lock is :mod:`~retrieval_heads.lock`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from retrieval_heads.files import (
    HEAD_SCORES_SCHEMA,
    META_FILE,
    RESULTS_SCHEMA,
    SCHEMA_VERSION,
    SCORES_FILE,
    TRIALS_DIR,
    TRIALS_FILE,
    ResultsError,
    _dumps,
    _jsonable,
    _not_utf8,
    _now,
    _read_json,
    atomic_write_text,
    provenance,
)
from retrieval_heads.lock import _DirLock
from retrieval_heads.published import import_published
from retrieval_heads.records import TrialRecord
from retrieval_heads.scores import HeadScores

__all__ = ["ResultsDir", "load_records", "read_meta", "load_results", "load_run"]


def _quote_id(trial_id: str) -> str:
    """A reversible, filesystem-safe file stem for a trial id."""
    stem = quote(trial_id, safe="-_=,+@")
    if stem.startswith("."):
        stem = "%2E" + stem[1:]
    return stem


def _unquote_id(stem: str) -> str:
    return unquote(stem)


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

        Returns the retrieval :class:`HeadScores` (``None`` when no trial has head scores: then
        no ``head_scores.json`` is written). Safe to
        call again, and safe to be killed in: the per-trial files are removed only after the
        merged ``trials.jsonl`` is in place.
        """
        self._check_open()
        records = self.records()
        text = "".join(r.to_json() + "\n" for r in records)
        atomic_write_text(self.path / TRIALS_FILE, text)
        scores = None
        if any(r.scores for r in records):  # chain-of-thought runs have no head scores
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
    files ``meta`` says what was read and the record list may be empty. A folder whose records
    have no head scores (a chain-of-thought run) raises :class:`ResultsError`; use
    :func:`load_run` to read any folder.
    """
    meta, scores, records = load_run(path)
    if scores is None:
        raise ResultsError(
            f"results directory {path} ({meta.get('kind', 'a run')}) holds no head scores: its "
            "records answer questions without copying from a context. Pass a detection's "
            "results directory"
        )
    return meta, scores, records


def load_run(path: str | Path) -> tuple[dict[str, Any], HeadScores | None, list[TrialRecord]]:
    """As :func:`load_results`, for any results: the head scores are ``None`` when the
    records have none (a chain-of-thought run)."""
    path = Path(path)
    if path.is_dir():
        meta_path = path / META_FILE
        meta = _read_json(meta_path, "results metadata") if meta_path.exists() else {}
        records = load_records(path)
        scores_path = path / SCORES_FILE
        scored = [r for r in records if r.scores]
        scores: HeadScores | None
        if records and not scored:
            scores = None  # an older version wrote a table of zeros for them: not scores
        elif scores_path.exists():
            scores = HeadScores.load(scores_path)
            if set(scores.trial_ids) != {r.trial_id for r in scored}:
                scores = HeadScores.from_records(scored) if scored else scores
        elif records:
            scores = HeadScores.from_records(scored)
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
