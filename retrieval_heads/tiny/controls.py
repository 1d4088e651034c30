"""The embedded model's controls: NIAH vs memorised facts vs chain following under ablation.

Wu et al. (2024) check that ablating retrieval heads breaks reading from the context and
leaves what the weights hold. The embedded world defines the tasks that tell the two apart:

- :func:`fact_trials` — questions answered from the world's fixed fact table, which the model
  learnt in training (nothing in the context to copy);
- :func:`chain_trials` — links placed in the context, answered by following them hop by hop;
- :func:`control_sweep`, :class:`ControlSweep` — the three tasks under the same top-K /
  random-K ablations, with per-task summaries.

Trials are answered, graded and recorded by the generic ablation runner
(:mod:`retrieval_heads.causal`), with conditions from :mod:`retrieval_heads.selection`; this
module only builds the world's tasks and lays out the sweep. It never builds a hook or decodes
itself, and it is the one place the controls touch :mod:`retrieval_heads.tiny.world`: the
generic modules never import it (tiny may import generic code, never the reverse).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from retrieval_heads import analysis
from retrieval_heads.causal import (
    TASKS,
    _check_mode,
    _check_trials,
    _decode_dict,
    _execute,
    _mean_reference,
    _score_source,
    _task,
    _trials_digest,
)
from retrieval_heads.model import HookedModel
from retrieval_heads.records import TrialRecord
from retrieval_heads.scoring import DecodeConfig
from retrieval_heads.seeding import seeded_rng
from retrieval_heads.selection import Scores, _table, plan_conditions
from retrieval_heads.sharding import Shard
from retrieval_heads.tiny import trials as tiny_trials
from retrieval_heads.tiny import world
from retrieval_heads.trials.builder import build_trial
from retrieval_heads.trials.needles import Needle, NeedleSet
from retrieval_heads.trials.trial import Trial

__all__ = ["ControlSweep", "chain_trials", "control_sweep", "fact_trials"]


def _filler(model: HookedModel, n: int, rng: random.Random) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tiny_trials.tiny_encode(model, world.sentence(rng), "filler")
    return ids[len(ids) - n :]  # cut at the front: the context may open mid-sentence


def fact_trials(model: HookedModel, n: int, seed: int = 0, length: int = 256) -> list[Trial]:
    """``n`` memorised-fact trials of ``length`` tokens: filler, then a fact question.

    The answer ("where does the quiet baker live ?" -> "north ardon") comes from the world's fixed
    fact table (:func:`retrieval_heads.tiny.world.fact_table`), which the model learnt in
    training; it is never in the context, so the trials have no needle (``needles=()``) and are
    answered with :func:`~retrieval_heads.causal.answer_trial`. Facts are sampled without
    replacement, seeded.
    """
    facts = world.fact_table()
    if not 0 < n <= len(facts):
        raise ValueError(f"n must be within 1..{len(facts)}, got {n}")
    rng = seeded_rng("fact_trials", seed)
    chosen = rng.sample(range(len(facts)), n)
    bos = model.tokenizer.bos_token_id
    out = []
    for i, index in enumerate(chosen):
        fact = facts[index]
        question = tiny_trials.tiny_encode(model, fact.question, "fact question")
        n_filler = length - 1 - len(question)
        if n_filler < 1:
            raise ValueError(f"length {length} leaves no room for filler")
        ids = [bos, *_filler(model, n_filler, seeded_rng("fact_filler", seed, i)), *question]
        params = {
            "task": "fact",
            "fact_index": index,
            "subject": list(fact.subject),
            "question": fact.question,
            "length": length,
            "seed": seed,
        }
        digest = hashlib.sha256(
            json.dumps({"params": params, "ids": ids}, sort_keys=True).encode()
        ).hexdigest()[:16]
        out.append(
            Trial(
                trial_id=f"fact-{digest}",
                input_ids=tuple(ids),
                needles=(),
                answer=fact.answer,
                context_length=length,
                depth_percent=0.0,
                params=params,
                context_span=(1, 1 + n_filler),
            )
        )
    return out


def chain_trials(
    model: HookedModel, n: int, seed: int = 0, length: int = 256, hops: int = 3
) -> list[Trial]:
    """``n`` chain-following trials: the links are in the context, the answer lists every hop.

    Links "the key of the red box is in the blue cup ." (:func:`~retrieval_heads.tiny.world.
    make_chain`, held-out keys) are placed as needles (each a target whose answer is its hop):
    the first at a seeded depth, the others at seeded sentence boundaries, in the world's filler
    and template. ``answer`` is the hop list "blue cup , green bag , old shoe" and
    ``params["hops"]`` the hops, which grading compares in order.
    """
    if hops < 1:
        raise ValueError(f"hops must be >= 1, got {hops}")
    rng = seeded_rng("chain_trials", seed, hops)
    haystack = tiny_trials.tiny_haystack(seed)
    template = tiny_trials.tiny_template()
    out = []
    for i in range(n):
        chain = world.make_chain(rng, hops, split="test")
        nodes = [tuple(node) for node in chain["nodes"]]
        answers = [f"{a} {b}" for a, b in nodes[1:]]
        needles = tuple(
            Needle(f"chain-s{seed}-{i}-l{j}", link, chain["question"], answer)
            for j, (link, answer) in enumerate(zip(chain["links"], answers, strict=True))
        )
        depth = round(rng.uniform(0, 100), 1)
        trial = build_trial(
            model.tokenizer,
            haystack,
            NeedleSet(needles, question=chain["question"], kind="chain"),
            length=length,
            depth_percent=depth,
            template=template,
            seed=seed,
            n_ctx=model.n_ctx,
        )
        params = dict(trial.params, task="chain", hops=answers, n_hops=hops)
        out.append(dataclasses.replace(trial, answer=chain["answer"], params=params))
    return out


@dataclass
class ControlSweep:
    """Records of a control sweep and, per task, its :class:`~retrieval_heads.analysis.KSweepRow`
    summary (accuracy and recall per K and selection, mean ± std over draws)."""

    records: list[TrialRecord]
    rows: dict[str, list[analysis.KSweepRow]] = field(default_factory=dict)

    def accuracy(self, task: str, selection: str, k: int) -> float:
        for row in self.rows[task]:
            if row.selection == selection and row.k == k:
                return row.accuracy
        raise KeyError(f"no row for task {task!r}, selection {selection!r}, K={k}")

    def table(self) -> str:
        body = [
            [task, *analysis.k_sweep_cells(r)] for task, rows in self.rows.items() for r in rows
        ]
        headers = ["task", "K", "selection", "draws", "trials", "accuracy", "recall"]
        return analysis.format_table(body, headers)


def control_sweep(
    model: HookedModel,
    scores: Scores,
    ks: Iterable[int] = (0, 6),
    draws: int = 3,
    seed: int = 0,
    *,
    n: int = 20,
    length: int = 256,
    hops: int = 3,
    tasks: Sequence[str] = TASKS,
    niah_trials: Sequence[Trial] | None = None,
    mode: str = "uniform",
    phase: str = "decode",
    include_matched: bool = False,
    threshold: float = analysis.RETRIEVAL_THRESHOLD,
    out: str | Path | None = None,
    config: DecodeConfig | None = None,
    progress: bool = False,
    shard: Shard | None = None,
) -> ControlSweep:
    """NIAH vs memorised facts vs chain following under the same top-K / random-K ablations.

    ``n`` trials per task at ``length`` tokens (NIAH: ``niah_trials``, or the embedded model's
    grid at that length, 5 depths, 2 distractors; facts: :func:`fact_trials`; chains:
    :func:`chain_trials`), all seeded by ``seed``. Conditions as in
    :func:`~retrieval_heads.causal.k_sweep`. Returns the records and per-task summaries; with
    ``out``, a results directory (kind ``"ablate-controls"``), resumable like the K-sweep's;
    ``shard`` as in :func:`~retrieval_heads.causal.k_sweep` (the summaries are then of the share
    only).
    """
    config = config or DecodeConfig()
    _check_mode(mode, phase, model)
    ks = list(ks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; the tasks are {TASKS}")
    trials: list[Trial] = []
    if "niah" in tasks:
        if niah_trials is None:
            n_needles = math.ceil(n / 5)
            niah_trials = tiny_trials.tiny_grid(
                model.tokenizer,
                lengths=[length],
                depths=[0, 25, 50, 75, 100],
                n_needles=n_needles,
                seed=seed,
            )
            # grouped by needle: a cut at n drops needles, never depths
            niah_trials = sorted(niah_trials, key=lambda t: t.params["needles"][0]["id"])[:n]
        trials += [dataclasses.replace(t, params=dict(t.params, task="niah")) for t in niah_trials]
    if "fact" in tasks:
        trials += fact_trials(model, n, seed, length)
    if "chain" in tasks:
        trials += chain_trials(model, n, seed, length, hops)
    _check_trials(trials)
    table = _table(scores)
    conditions, notes = plan_conditions(
        table, ks, draws=draws, seed=seed, threshold=threshold, include_matched=include_matched
    )
    if mode in ("knockout", "resample") and any(_task(t) == "fact" for t in trials):
        raise ValueError(f"mode {mode!r} needs a needle in every trial; facts have none")
    mean_z, extra = (None, {})  # type: ignore[var-annotated]
    if mode == "mean":
        mean_z, extra = _mean_reference(model, trials, None, 8)
    run_config = {
        "experiment": "control_sweep",
        "ks_requested": ks,
        "draws": draws,
        "seed": seed,
        "n": n,
        "length": length,
        "hops": hops,
        "tasks": list(tasks),
        "mode": mode,
        "phase": phase,
        "threshold": threshold,
        "score_source": _score_source(scores, None),
        "decode": _decode_dict(config),
        "trials": {"n": len(trials), "sha": _trials_digest(trials)},
        "conditions": [c.to_dict() for c in conditions],
        "notes": notes,
        **extra,
    }
    records = _execute(
        model,
        trials,
        conditions,
        mode=mode,
        phase=phase,
        config=config,
        mean_z=mean_z,
        out=out,
        run_config=run_config,
        progress=progress,
        seed=seed,
        extra=extra,
        kind="ablate-controls",
        shard=shard,
    )
    by_task: dict[str, list[TrialRecord]] = defaultdict(list)
    for r in records:
        by_task[r.params["task"]].append(r)
    rows = {task: analysis.summarise_k_sweep(by_task[task]) for task in tasks if by_task[task]}
    return ControlSweep(records, rows)
