"""The one sweep runner: units in, resumable records out.

Detection, ablation, the embedded model's controls, the KV-cache what-if and the
chain-of-thought run all have the same shape: *plan* the units (a trial, or a question's
prompt, under a condition), then *run* them. :func:`run_sweep` owns the second half for all of
them: which units a shard owns, which a results folder already holds (resume), the loop, the
progress bar, the atomic one-file-per-record writes, the check before the folder is marked
finished, and the timing. The callers only plan and say how one unit becomes a
:class:`~retrieval_heads.records.TrialRecord`.

Units are ordered; a shard owns the units at its positions in that order (round robin,
:class:`~retrieval_heads.sharding.Shard`), so every process of a sharded run must plan the same
units in the same order (they do: planning is seeded and deterministic).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval_heads.records import TrialRecord
from retrieval_heads.sharding import Shard, shard_dir, shard_meta
from retrieval_heads.store import ResultsDir

__all__ = ["Unit", "run_sweep", "model_name"]


@dataclass(frozen=True)
class Unit:
    """One record to make: ``record_id`` (its key in the results folder), the ``item`` run (a
    trial, a question's prompt) and the ``condition`` it runs under (whatever the planner uses;
    units of one condition are usually adjacent, so per-condition set-up can be cached)."""

    record_id: str
    item: Any
    condition: Any = None


def model_name(model: Any) -> str:
    """The name a results folder records for ``model``."""
    return getattr(model, "name", None) or type(model.hf_model).__name__


def model_info(model: Any) -> dict[str, Any]:
    """What the views want to know of the model (``meta.json``'s ``model_info``; never
    compared on resume)."""
    describe = getattr(model, "describe", None)
    return {"model_info": describe()} if describe else {}


def run_sweep(
    units: Sequence[Unit],
    run_unit: Callable[[Unit], TrialRecord],
    *,
    out: str | Path | None = None,
    model: str,
    kind: str,
    config: Mapping[str, Any],
    seed: int | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    shard: Shard | None = None,
    require_pass: bool = False,
    overwrite: bool = False,
    progress: bool | str = False,
    check: Callable[[list[TrialRecord]], None] | None = None,
    timing: bool = True,
    run_batch: Callable[[list[Unit]], list[TrialRecord]] | None = None,
    batch_key: Callable[[Unit], Any] | None = None,
    batch_size: int | Callable[[Unit], int] = 1,
) -> list[TrialRecord]:
    """Run every unit (of ``shard``, if given) that ``out`` does not hold yet; return the records.

    Without ``out`` the records of this call are returned, in unit order. With ``out`` they go
    to a :class:`~retrieval_heads.store.ResultsDir` (``model``, ``kind``, ``config``,
    ``seed`` identify the run: a rerun resumes it, another run there is refused) as each one
    finishes, and the folder's records are returned, sorted by id, old ones included. With
    ``shard`` (and ``out``), only the units at the shard's positions run, into
    ``out/shards/<i>-of-<N>/`` with the shard's metadata, for
    :func:`~retrieval_heads.sharding.merge` (``require_pass``: the merge fails when no record of
    the whole run passed).

    ``check(records)`` runs on the whole set before the folder is marked finished; if it raises,
    the folder is marked ``failed`` with the error's text (the records stay, a rerun resumes)
    and the error propagates. A shard skips it: its share alone does not decide.

    Batches: with ``run_batch`` (units -> their records, in order), consecutive units left to
    run that share a ``batch_key`` (a condition and a trial length, say) run together, up to
    ``batch_size`` of them (a number, or a function of the batch's first unit). Batches are cut
    from all the units this process owns, done or not, and a batch with a missing record runs
    whole: a run killed mid-batch resumes to the same files, to the last bit. ``progress``: a tqdm bar over the units left (a string names it).
    """
    ids = [u.record_id for u in units]
    if len(set(ids)) != len(ids):
        raise ValueError("record ids repeat: a results folder keys its records by id")
    if shard is not None:
        if out is None:
            raise ValueError(f"a sharded {kind} run needs out=: shards are merged from disk")
        units = [units[p] for p in shard.positions(len(units))]
    began = time.perf_counter()

    def run_all(done: frozenset[str]) -> Iterable[TrialRecord]:
        todo = [u for u in units if u.record_id not in done]
        bar = _bar(todo, progress)
        if run_batch is None or batch_size == 1:
            for unit in bar:
                yield run_unit(unit)
            return
        # Batches are cut from every unit this process owns, done or not, so a resumed run
        # computes each record in the batch it would have had (a batched product may round
        # in the last bit by batch): a batch with a record missing runs whole, and only the
        # missing records are kept.
        for batch in _batches(units, batch_key, batch_size):
            missing = [u.record_id not in done for u in batch]
            if not any(missing):
                continue
            # a batch of one is a unit: the per-unit path (and the records it has always given)
            records = [run_unit(batch[0])] if len(batch) == 1 else run_batch(batch)
            if len(records) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} units gave {len(records)} records")
            yield from (r for r, m in zip(records, missing, strict=True) if m)
            if hasattr(bar, "update"):
                bar.update(sum(missing))
        if hasattr(bar, "close"):
            bar.close()

    if out is None:
        records = list(run_all(frozenset()))
        if check is not None:
            check(records)
        return records
    path, meta = Path(out), dict(extra_meta or {})
    if shard is not None:
        path = shard_dir(out, shard)
        meta = shard_meta(shard, len(ids), require_pass=require_pass) | meta
        check = None
    with ResultsDir(
        path,
        model=model,
        config=config,
        kind=kind,
        seed=seed,
        overwrite=overwrite,
        extra_meta=meta,
    ) as run:
        for record in run_all(run.done_ids()):
            run.append(record)
        records = run.records()
        if check is not None:
            try:
                check(records)
            except Exception as exc:
                run.update_meta(status="failed", failure=str(exc))
                raise
        wall = {"wall_s": round(time.perf_counter() - began, 3)} if timing else None
        run.finalize(timing=wall)
        return run.records()


def _batches(
    units: Sequence[Unit],
    key: Callable[[Unit], Any] | None,
    size: int | Callable[[Unit], int],
) -> Iterable[list[Unit]]:
    """Consecutive units of one key, at most ``size`` at a time."""
    batch: list[Unit] = []
    limit = 1
    for unit in units:
        if batch and (len(batch) >= limit or (key is not None and key(unit) != key(batch[0]))):
            yield batch
            batch = []
        if not batch:
            limit = max(1, size(unit) if callable(size) else int(size))
        batch.append(unit)
    if batch:
        yield batch


def _bar(units: Sequence[Unit], progress: bool | str) -> Iterable[Unit]:
    if not progress:
        return units
    from tqdm.auto import tqdm

    desc = progress if isinstance(progress, str) else "trials"
    return tqdm(units, desc=desc, unit="trial", total=len(units))
