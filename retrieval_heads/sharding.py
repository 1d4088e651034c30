"""Sharding a sweep over processes: which units a shard owns, where it writes, and the merge.

A sweep is a list of *units* in an order that every process derives alike from the same command:
detection's trials in grid order; an ablation's (condition, trial) pairs, condition-major, in the
sweep's order. Shard ``i`` of ``N`` owns the units at positions ``p`` with ``p % N == i``. Round
robin rather than contiguous blocks: a grid is ordered by length, so blocks would give one shard
all the long trials; interleaved, every shard gets the same mix and they finish together.

A shard writes an ordinary results directory (:class:`~retrieval_heads.store.ResultsDir`)
inside the run's output directory, with the kind, model, config and seed of the unsharded run
and its share in ``meta.json`` (``extra.shard``: index, count, units owned, units in the sweep)::

    OUT/
      shards/0-of-2/      shard 0 of 2 (resumable like any results directory)
      shards/1-of-2/
      meta.json  trials.jsonl  head_scores.json     written by merge(OUT)

:func:`merge` checks that the shards are one complete set made by one run, then writes their
union into ``OUT`` through ``ResultsDir``, so ``OUT`` holds what one process would have written:
the same ``trials.jsonl`` records (timings aside) and the same ``head_scores.json`` bytes.

A process gets its share in one of two ways (:class:`Job`):

- ``--shard i/N``: independent jobs (a Slurm job array, machines without a shared scheduler),
  then ``retrieval-heads merge OUT`` once all are done;
- ``torchrun``: rank ``RANK`` of ``WORLD_SIZE`` takes share ``RANK/WORLD_SIZE``, waits at a
  barrier until every rank has written its shard, and rank 0 merges. When a rank dies torchrun
  stops the others; rerunning the same command resumes every shard where it stopped.

This module imports only the results modules (:mod:`retrieval_heads.store`, ``records``,
``files``; scoring and causal import it), and torch only inside :class:`Job`, so merging needs no
model.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shlex
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval_heads.files import ResultsError
from retrieval_heads.records import TrialRecord
from retrieval_heads.store import ResultsDir, load_records, read_meta

__all__ = [
    "SHARDS_DIR",
    "Job",
    "Merged",
    "MergeError",
    "Shard",
    "merge",
    "owned",
    "shard_dir",
    "shard_meta",
]

SHARDS_DIR = "shards"
_SHARD_TEXT = re.compile(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*")
_SHARD_NAME = re.compile(r"(\d+)-of-(\d+)")
# How long a torchrun rank that finished its share waits at the barrier for the slowest one.
# Generous on purpose: on a rerun one rank may have nothing left and another hours of work. A
# rank that dies does not leave the others waiting: torchrun stops them.
BARRIER_TIMEOUT = _dt.timedelta(days=7)


class MergeError(ResultsError):
    """Shard directories that do not make one complete run."""


@dataclass(frozen=True)
class Shard:
    """Share ``index`` (from 0) of a sweep split into ``count`` shards."""

    index: int
    count: int

    def __post_init__(self) -> None:
        for name in ("index", "count"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"shard {name} must be an integer, got {value!r}")
        if self.count < 1:
            raise ValueError(f"a sweep splits into at least 1 shard, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(
                f"shard {self.index}/{self.count} does not exist: the shards of {self.count} "
                f"are 0/{self.count} to {self.count - 1}/{self.count}"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"1/4"`` -> ``Shard(1, 4)``: shard 1 (counting from 0) of 4."""
        match = _SHARD_TEXT.fullmatch(text)
        if match is None:
            raise ValueError(
                f"malformed shard {text!r}: write I/N, shard I (counting from 0) of N, e.g. 0/4"
            )
        return cls(int(match.group(1)), int(match.group(2)))

    def owns(self, position: int) -> bool:
        """Whether the unit at ``position`` of the sweep's order is this shard's."""
        return position % self.count == self.index

    def positions(self, total: int) -> range:
        """The positions this shard owns in a sweep of ``total`` units."""
        return range(self.index, total, self.count)

    @property
    def dirname(self) -> str:
        return f"{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_dir(out: str | Path, shard: Shard) -> Path:
    """Where ``shard`` of the run writing to ``out`` keeps its results."""
    return Path(out) / SHARDS_DIR / shard.dirname


def shard_meta(shard: Shard, total: int, *, require_pass: bool = False) -> dict[str, Any]:
    """What a shard's ``meta.json`` records (``extra``) so that :func:`merge` can check it:
    its place, how many units it owns (complete when it holds that many), whether the unsharded
    run would fail without a passing trial, and the command that made it (to say how to finish
    it)."""
    return {
        "shard": {
            "index": shard.index,
            "count": shard.count,
            "units": len(shard.positions(total)),
            "units_total": total,
            "require_pass": require_pass,
            "command": _command_line(),
        }
    }


def _command_line() -> str | None:
    """This process's ``retrieval-heads`` command, or ``None`` when it is not one (a notebook,
    a test runner): only a real command line is worth suggesting to rerun."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if program is None:
        return None
    is_cli = program.name == "retrieval-heads" or (
        program.name == "__main__.py" and program.parent.name == "retrieval_heads"
    )
    return shlex.join(["retrieval-heads", *sys.argv[1:]]) if is_cli else None


# ---------------------------------------------------------------------------------------------
# merging


@dataclass
class Merged:
    """What :func:`merge` wrote into ``path``: the run's kind, the shard count, ``meta.json``
    as written, and every record sorted by trial id."""

    path: Path
    kind: str
    count: int
    meta: dict[str, Any]
    records: list[TrialRecord]


def _find_shards(root: Path) -> dict[tuple[int, int], Path]:
    found = {}
    if root.is_dir():
        for path in sorted(root.iterdir()):
            match = _SHARD_NAME.fullmatch(path.name)
            if match and path.is_dir():
                found[(int(match.group(1)), int(match.group(2)))] = path
    return found


def _finish_hint(metas: Mapping[int, dict], index: int, count: int) -> str:
    """How to write or finish shard ``index``: another shard's command with ``--shard i/N``."""
    for meta in metas.values():
        command = ((meta.get("extra") or {}).get("shard") or {}).get("command")
        if command:
            words = shlex.split(command)
            kept = []
            skip = False
            for word in words:
                if skip:
                    skip = False
                elif word == "--shard":
                    skip = True
                elif not word.startswith("--shard="):
                    kept.append(word)
            return f"run `{shlex.join([*kept, '--shard', f'{index}/{count}'])}`"
    return f"rerun the command that wrote the other shards with --shard {index}/{count}"


def _disagreements(name_a: str, a: dict, name_b: str, b: dict) -> list[str]:
    out = []
    for key in ("schema_version", "kind", "model", "seed"):
        if a.get(key) != b.get(key):
            out.append(f"{key} {a.get(key)!r} in {name_a}, {b.get(key)!r} in {name_b}")
    config_a, config_b = a.get("config") or {}, b.get("config") or {}
    for key in sorted(set(config_a) | set(config_b), key=str):
        if config_a.get(key) != config_b.get(key):
            out.append(
                f"config {key} {config_a.get(key)!r} in {name_a}, {config_b.get(key)!r} in {name_b}"
            )
    share_a = (a.get("extra") or {}).get("shard") or {}
    share_b = (b.get("extra") or {}).get("shard") or {}
    for key in ("units_total", "require_pass"):
        if share_a.get(key) != share_b.get(key):
            out.append(f"{key} {share_a.get(key)!r} in {name_a}, {share_b.get(key)!r} in {name_b}")
    return out


def _check_shards(root: Path) -> tuple[dict[int, dict], dict[int, Path]]:
    """The ``meta.json`` and directory of every shard ``0..N-1`` under ``root``, once they are
    checked to be one set (one N) of one run (same kind, model, seed, config), none missing."""
    found = _find_shards(root)
    if not found:
        raise MergeError(
            f"no shards in {root}: write them first (with --shard I/N, or under torchrun), "
            "then merge"
        )
    counts = sorted({count for _, count in found})
    if len(counts) > 1:
        names = ", ".join(path.name for path in found.values())
        raise MergeError(
            f"mismatched shard sets in {root} ({names}): the shards of one run split it the same "
            "way (the same N in I-of-N). Move the set you do not want elsewhere, then merge again"
        )
    count = counts[0]
    paths = {index: path for (index, _), path in found.items()}
    stray = sorted(path.name for index, path in paths.items() if index >= count)
    if stray:
        raise MergeError(
            f"{', '.join(stray)} in {root} cannot be shards (shard I of N has I < N): "
            "remove them, then merge again"
        )
    metas: dict[int, dict] = {}
    for index, path in paths.items():
        if not (path / "meta.json").exists():
            continue  # killed before its first write: reported as missing below
        meta = read_meta(path)
        share = (meta.get("extra") or {}).get("shard")
        if not isinstance(share, dict) or (share.get("index"), share.get("count")) != (
            index,
            count,
        ):
            raise MergeError(
                f"{path} is not shard {index}/{count}: its meta.json says {share!r}. "
                "Shard directories are written by --shard or torchrun; do not rename them"
            )
        metas[index] = meta
    if metas:
        first = min(metas)
        for index, meta in metas.items():
            problems = _disagreements(paths[first].name, metas[first], paths[index].name, meta)
            if problems:
                raise MergeError(
                    f"the shards in {root} are not from one run: {'; '.join(problems[:4])}. "
                    "Remove the shards of the other run and write them again with the same "
                    "command"
                )
    for index in range(count):
        if index not in metas:
            raise MergeError(
                f"shard {index}/{count} is missing (no {root / f'{index}-of-{count}'} with a "
                f"meta.json): {_finish_hint(metas, index, count)}, then merge again"
            )
    return metas, paths


def merge(
    out: str | Path,
    *,
    no_pass_error: Callable[[list[TrialRecord]], Exception] | None = None,
) -> Merged:
    """Merge the shards under ``out/shards/`` into ``out``, as one process would have written it.

    Refuses with :class:`MergeError`, before anything is written, when the shards are not one
    complete set of one run: shard sets of different ``N``, shards that disagree on kind, model,
    seed or config, a shard missing or unfinished (the message says which, and how to finish
    it), or a trial id in two shards. ``out`` itself must be empty or hold the same run (as
    :class:`~retrieval_heads.store.ResultsDir` checks). Safe to rerun: records already in
    ``out`` are skipped, and every file is written atomically, so a merge killed halfway is
    completed by the next.

    ``no_pass_error(records)`` is raised, after the trials are written and ``meta.json`` says
    ``"failed"``, when the shards come from a run that needs a passing trial (detection) and no
    trial passed, as the unsharded run would have done.
    """
    out = Path(out)
    metas, paths = _check_shards(out / SHARDS_DIR)
    count = len(metas)
    records: list[TrialRecord] = []
    for index in range(count):
        units = metas[index]["extra"]["shard"]["units"]
        held = load_records(paths[index])
        status = metas[index].get("status")
        if status != "finished" or len(held) != units:
            raise MergeError(
                f"shard {index}/{count} is unfinished ({len(held)} of {units} trials in "
                f"{paths[index]}, status {status!r}"
                f"{'; it may still be running' if status == 'running' else ''}): "
                f"{_finish_hint(metas, index, count)} to complete it, then merge again"
            )
        records.extend(held)
    repeated = [tid for tid, n in Counter(r.trial_id for r in records).items() if n > 1]
    if repeated:
        raise MergeError(
            f"trial {repeated[0]!r} is in more than one shard in {out / SHARDS_DIR} "
            f"({len(repeated)} repeated ids): these shards were not made by one run. Remove "
            "them and write them again"
        )
    records.sort(key=lambda r: r.trial_id)
    reference = metas[0]
    share = reference["extra"]["shard"]
    provenance = {
        "merged_from": {
            "count": count,
            "units": share["units_total"],
            "hosts": [metas[i].get("provenance", {}).get("host") for i in range(count)],
        }
    }
    if "model_info" in reference["extra"]:  # the model's shape and layer windows, for the views
        provenance["model_info"] = reference["extra"]["model_info"]
    with ResultsDir(
        out,
        model=reference["model"],
        config=reference.get("config"),
        kind=reference["kind"],
        seed=reference.get("seed"),
        extra_meta=provenance,
    ) as run:
        for record in records:
            run.append(record)
        if share.get("require_pass") and no_pass_error and not any(r.passed for r in records):
            error = no_pass_error(records)
            run.update_meta(status="failed", failure=str(error))
            raise error
        shard_wall = [metas[i].get("timing", {}).get("wall_s") for i in range(count)]
        timing = {"shards_wall_s": shard_wall} if any(w is not None for w in shard_wall) else {}
        run.finalize(timing=timing)
        meta = dict(run.meta)
    return Merged(out, reference["kind"], count, meta, records)


# ---------------------------------------------------------------------------------------------
# processes


def _env_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    text = environ.get(name)
    if text is None:
        if default is None:
            raise ValueError(f"torchrun sets {name}, but it is missing from the environment")
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None


class Job:
    """How this process takes part in a sweep: alone, as one of N independent jobs
    (``--shard i/N``), or as one rank of a ``torchrun`` job. Use as a context manager (it joins
    and leaves torchrun's process group) and call :meth:`finish` once the share is written.

    The process group carries only barriers (no tensors), so it is gloo whatever the device:
    gloo works on CPU and GPU hosts alike and needs no CUDA stream. Each rank computes on its
    own device (:meth:`device`)."""

    def __init__(
        self,
        shard: Shard | None = None,
        *,
        torchrun: bool = False,
        local_rank: int = 0,
        timeout: _dt.timedelta = BARRIER_TIMEOUT,
    ) -> None:
        if torchrun and shard is None:
            raise ValueError("a torchrun job needs its rank's shard")
        self.shard = shard
        self.torchrun = torchrun
        self.local_rank = local_rank
        self.timeout = timeout
        self._joined = False

    @classmethod
    def from_env(
        cls, shard: str | Shard | None = None, environ: Mapping[str, str] | None = None
    ) -> Job:
        """The job of this process: torchrun's ``RANK``/``WORLD_SIZE`` when ``WORLD_SIZE`` > 1,
        else ``shard`` (``"i/N"``, a :class:`Shard` or ``None`` for the whole sweep)."""
        environ = os.environ if environ is None else environ
        world = _env_int(environ, "WORLD_SIZE", 1)
        if world > 1:
            if shard is not None:
                raise ValueError(
                    "--shard and torchrun both split the sweep: under torchrun each rank takes "
                    "share RANK/WORLD_SIZE, so drop --shard"
                )
            rank = _env_int(environ, "RANK")
            return cls(
                Shard(rank, world), torchrun=True, local_rank=_env_int(environ, "LOCAL_RANK", 0)
            )
        if isinstance(shard, str):
            shard = Shard.parse(shard)
        return cls(shard)

    @property
    def merges(self) -> bool:
        """Whether this process merges the shards (rank 0 of a torchrun job)."""
        return self.torchrun and self.shard is not None and self.shard.index == 0

    def device(self, requested: str | None, device_map: Any = None) -> str | None:
        """The device to compute on: under torchrun on a CUDA machine, ``cuda:LOCAL_RANK`` when
        ``cuda`` or nothing was asked for (one GPU per rank); otherwise what was asked for."""
        if not self.torchrun or device_map is not None or requested not in (None, "cuda"):
            return requested
        import torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else requested

    def __enter__(self) -> Job:
        if self.torchrun:
            import torch
            import torch.distributed as dist

            if not dist.is_initialized():
                # torchrun may keep its store across restarts (--max-restarts); keys a killed
                # rank left there would send the new ranks to dead addresses, so each attempt
                # gets its own key prefix.
                store, rank, world = next(dist.rendezvous("env://", timeout=self.timeout))
                attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                store = dist.PrefixStore(f"retrieval-heads/attempt-{attempt}", store)
                dist.init_process_group(
                    "gloo", store=store, rank=rank, world_size=world, timeout=self.timeout
                )
                self._joined = True
            if torch.cuda.is_available() and self.local_rank < torch.cuda.device_count():
                torch.cuda.set_device(self.local_rank)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._joined:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._joined = False

    def finish(
        self,
        out: str | Path,
        *,
        no_pass_error: Callable[[list[TrialRecord]], Exception] | None = None,
    ) -> Merged | None:
        """After this process's share of ``out`` is written. Under torchrun: wait until every
        rank's is, rank 0 merges (:func:`merge`), and every rank waits for that merge, so all
        may read the merged results after. Returns the merge on rank 0, ``None`` elsewhere and
        for ``--shard`` jobs (merged later by ``retrieval-heads merge``)."""
        if not self.torchrun:
            return None
        import torch.distributed as dist

        dist.barrier()
        merged = merge(out, no_pass_error=no_pass_error) if self.merges else None
        # If rank 0's merge fails it exits with the error; torchrun then stops the ranks
        # waiting here.
        dist.barrier()
        return merged


def owned(items: Sequence[Any], shard: Shard | None) -> list[Any]:
    """The items at the positions ``shard`` owns (all of them without a shard)."""
    if shard is None:
        return list(items)
    return [items[p] for p in shard.positions(len(items))]
