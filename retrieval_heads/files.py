"""The file layer under the results modules: schema names, errors, JSON in and out, atomic writes.

What :mod:`~retrieval_heads.records`, :mod:`~retrieval_heads.scores`,
:mod:`~retrieval_heads.published` and :mod:`~retrieval_heads.store` all stand on:

- the schema names and version, a results folder's file names (``META_FILE``, ``SCORES_FILE``,
  ...), and :class:`ResultsError` / :class:`ResultsLocked`;
- JSON out (``_jsonable``, ``_dumps``) and in (``_read_json``), and the checks that turn an
  untrusted file's head labels and score lists into a table (``_parse_label``, ``_column``, ...);
- :func:`atomic_write_text`: readers see the old file or the new one, never a part;
- the output guard (``OWNED_NAMES``, :func:`check_output_file`, :func:`check_output_folder`):
  no writer lands on a results folder's own files;
- :func:`provenance`: the versions, git commit and time ``meta.json`` records.

It imports nothing of this package but ``heads`` (never records, scores, published, store or a
model; no torch), so every module above can import it without a cycle.
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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_heads.heads import Head

__all__ = [
    "SCHEMA_VERSION",
    "HEAD_SCORES_SCHEMA",
    "RESULTS_SCHEMA",
    "META_FILE",
    "SCORES_FILE",
    "TRIALS_FILE",
    "TRIALS_DIR",
    "LOCK_FILE",
    "OWNED_NAMES",
    "ResultsError",
    "ResultsLocked",
    "atomic_write_text",
    "provenance",
    "results_folder_of",
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


def _fmt_source(source: str | Path | None) -> str:
    return str(source) if source is not None else "<in-memory data>"


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
# untrusted JSON score tables (head_scores.json and the published format)


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


# ---------------------------------------------------------------------------------------------
# what a results folder owns: no other writer may land on it

# It lives here, beside atomic_write_text, and not in store.py: every writer calls it
# (HeadScores.save, write_published, the views, the experiments), and store.py imports scores and
# published, so there it would make an import cycle (or a lazy import in each writer).

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
