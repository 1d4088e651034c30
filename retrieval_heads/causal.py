"""Causal experiments: what breaks when retrieval heads are ablated, and what does not.

Wu et al. (2024) test the claim that retrieval heads *cause* retrieval by ablating the top-K of
them and comparing with K random heads: needle-in-a-haystack (NIAH) accuracy collapses under the
first and barely moves under the second, while tasks answered from the weights (memorised facts)
stay intact. This module is the ablation runner behind those experiments, on any
:class:`~retrieval_heads.model.HookedModel`:

- :func:`ablate_grid` — answer (and score) trials with a set of heads ablated;
- :func:`k_sweep` — top-K vs random-K (vs matched-layer-K) for a list of K, into one resumable
  results directory; summaries by :func:`retrieval_heads.analysis.summarise_k_sweep`;
- :func:`answer_classes` — how the failures look (the hallucination analysis).

Both sweeps plan every (condition, trial) unit, condition-major, and run them with
:func:`retrieval_heads.runner.run_sweep` (resume, shards, progress); each unit goes through
``_run_one``, the seam tests replace to simulate an interruption. Its neighbours:

- :mod:`retrieval_heads.ablation_hooks` — the hooks of an ablation mode for each trial
  (:func:`~retrieval_heads.ablation_hooks.ablation_hooks`), a resample's sources
  (:func:`~retrieval_heads.ablation_hooks.resample_sources`) and their recorded ``z``;
- :mod:`retrieval_heads.answering` — one trial answered and graded by task without scoring
  heads (:func:`~retrieval_heads.answering.answer_trial`), and the record of one trial under
  one condition;
- :mod:`retrieval_heads.selection` — which heads: :func:`~retrieval_heads.selection.top_heads`,
  the seeded controls :func:`~retrieval_heads.selection.random_heads` and
  :func:`~retrieval_heads.selection.matched_layer_heads`, and
  :func:`~retrieval_heads.selection.plan_conditions`, which lays out a whole sweep;
- :mod:`retrieval_heads.patching` — per-head activation patching on pairs that differ only in
  the needle's value (:func:`~retrieval_heads.patching.patching_map`), and its agreement with
  the retrieval scores (:func:`~retrieval_heads.patching.patching_vs_scores`);
- :mod:`retrieval_heads.tiny.controls` — NIAH vs memorised facts vs chain following under the
  same ablations (``fact_trials``, ``chain_trials``, ``control_sweep``; embedded model only:
  its world defines the tasks). It imports this runner; this module never imports
  :mod:`retrieval_heads.tiny`, and never chooses heads itself.

The names that moved to those modules still answer here (``causal.answer_trial``,
``causal.ablation_hooks``, ``causal.resample_sources``, ``causal.top_heads``, ...).

Choices, all explicit and recorded in every record and in the results' meta:

- a *condition* is ``(k, selection, draw)`` with its heads
  (:class:`~retrieval_heads.selection.Condition`; the selections ``"top"``, ``"random"``,
  ``"matched_layer"``, ``"none"`` and ``"custom"`` are described in
  :mod:`retrieval_heads.selection`). Draws are reproducible from ``(seed, k, draw)`` alone (a
  SHA-256-seeded ``random.Random``, :func:`~retrieval_heads.seeding.seeded_rng`);
- an ablated record's trial id is ``"<trial id>|<selection>|k=<K>|draw=<d>"``, so one results
  directory holds every condition and a rerun resumes where it stopped;
- records carry their condition as a typed :class:`~retrieval_heads.conditions.HeadAblation`,
  and in ``params`` their ``task``, ``answer_class`` and ``exact`` and the mode's extras
  (``blocked``, ``resample_from``, ``mean_reference``); grading is by task (NIAH, fact, chain).
  Both are spelled out in :mod:`retrieval_heads.answering`.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from retrieval_heads import ablation_hooks as per_trial_hooks
from retrieval_heads import analysis, answering, patching, selection
from retrieval_heads.ablation_hooks import (
    TrialAblations,
    _check_mode,
    _Recordings,
    ablation_hooks,
    resample_sources,
    trial_ablations,
)
from retrieval_heads.answering import TASKS, _run_trial, answer_trial
from retrieval_heads.batched import score_batch, unit_batch_size
from retrieval_heads.heads import Head, parse_heads
from retrieval_heads.interventions import Mode, Phase, mean_head_z
from retrieval_heads.model import HookedModel
from retrieval_heads.records import TrialRecord
from retrieval_heads.runner import Unit, model_info, model_name, run_sweep
from retrieval_heads.scores import HeadScores
from retrieval_heads.scoring import DecodeConfig, HooksFor, check_lengths
from retrieval_heads.selection import (
    SELECTIONS,
    Condition,
    Scores,
    _table,
    plan_conditions,
    top_heads,
)
from retrieval_heads.sharding import Shard
from retrieval_heads.summaries import answer_classes  # re-exported: causal.answer_classes
from retrieval_heads.trials.trial import Trial

__all__ = [
    "SELECTIONS",
    "TASKS",
    "Condition",
    "ablate_grid",
    "ablation_hooks",
    "answer_classes",
    "answer_trial",
    "matched_layer_heads",
    "patching_map",
    "patching_vs_scores",
    "plan_conditions",
    "random_heads",
    "resample_sources",
    "top_heads",
]

# Re-exports, for code written as ``causal.<name>`` (users' scripts and notebooks; the package,
# the experiments and the tests now import these from where they live). ``top_heads``,
# ``plan_conditions``, ``Condition`` and ``SELECTIONS`` (selection.py) are imported above for
# the runner's own use and stay reachable here the same way.
random_heads = selection.random_heads  # retrieval_heads/selection.py
matched_layer_heads = selection.matched_layer_heads  # retrieval_heads/selection.py
patching_map = patching.patching_map  # retrieval_heads/patching.py
patching_vs_scores = patching.patching_vs_scores  # retrieval_heads/patching.py

# The hooks of an ablation and the answering of one trial lived here (ablation_hooks.py,
# answering.py). Every name they had here still answers as ``causal.<name>``: the public ones
# are imported above; the private ones (tiny.controls and the tests use some) follow.
_needle_key = per_trial_hooks._needle_key  # retrieval_heads/ablation_hooks.py
_haystack_key = per_trial_hooks._haystack_key  # retrieval_heads/ablation_hooks.py
_budget = answering._budget  # retrieval_heads/answering.py
_context_text = answering._context_text  # retrieval_heads/answering.py
_grade = answering._grade  # retrieval_heads/answering.py
_hops = answering._hops  # retrieval_heads/answering.py
_task = answering._task  # retrieval_heads/answering.py

# The embedded world's controls moved to retrieval_heads.tiny.controls. They are not re-exported
# here (that would make this generic module import the tiny world); asking for one says where
# it went.
_MOVED_TO_TINY = ("ControlSweep", "chain_trials", "control_sweep", "fact_trials")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_TINY:
        raise AttributeError(
            f"retrieval_heads.causal.{name} moved to retrieval_heads.tiny.controls: "
            f"from retrieval_heads.tiny.controls import {name}"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# NIAH under ablation


def _trials_digest(trials: Sequence[Trial]) -> str:
    blob = ",".join(t.trial_id for t in trials)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _decode_dict(config: DecodeConfig) -> dict[str, Any]:
    return config.__dict__ | {"stop_strings": list(config.stop_strings)}


def _check_trials(trials: Sequence[Trial]) -> None:
    ids = [t.trial_id for t in trials]
    if len(set(ids)) != len(ids):
        raise ValueError("trial ids repeat: ablation results are keyed by trial id")
    if not trials:
        raise ValueError("no trials given")


def _mean_reference(
    model: HookedModel, trials: Sequence[Trial], mean_z: Tensor | None, n_reference: int
) -> tuple[Tensor, dict[str, Any]]:
    if mean_z is not None:
        return mean_z, {"mean_reference": "given"}
    reference = list(trials[:n_reference])
    value = mean_head_z(model, [list(t.input_ids) for t in reference], positions="all")
    return value, {"mean_reference": [t.trial_id for t in reference]}


def _run_one(model: HookedModel, trial: Trial, condition: Condition, **kwargs: Any) -> TrialRecord:
    """One trial under one condition (a seam for tests that simulate an interruption)."""
    return _run_trial(model, trial, condition, **kwargs)


def ablate_grid(
    model: HookedModel,
    trials: Sequence[Trial],
    heads: Iterable[Head | str] | str,
    *,
    mode: str = "uniform",
    phase: str = "decode",
    out: str | Path | None = None,
    tag: str | None = None,
    config: DecodeConfig | None = None,
    k: int | None = None,
    selection: str | None = None,
    draw: int = 0,
    mean_z: Tensor | None = None,
    n_reference: int = 8,
    progress: bool = False,
    shard: Shard | None = None,
    batch_size: int | None = 1,
) -> list[TrialRecord]:
    """Answer and score ``trials`` with ``heads`` ablated (``mode``, ``phase``).

    Records carry the condition (a :class:`~retrieval_heads.conditions.HeadAblation`; see
    :mod:`retrieval_heads.answering`): ``k`` defaults to the number of heads, ``selection`` to
    ``"none"`` (no heads) or ``"custom"``. Trial ids are ``"<trial id>|<tag>"``, ``tag`` defaulting
    to ``"<selection>|k=<K>|draw=<d>"``. ``mean`` mode uses ``mean_z`` or computes it once
    (:func:`~retrieval_heads.interventions.mean_head_z`, every position of the first ``n_reference``
    trials); ``resample`` replays, for each trial, the next trial with another needle and haystack
    (:func:`resample_sources`); ``knockout`` blocks the target needle's span. With ``out``, records
    go to a results directory (``kind="ablate"``; atomic, resumable) and the returned list is all of
    it, sorted by id.
    With ``shard`` (and ``out``) only the shard's share of the trials runs, into
    ``out/shards/<i>-of-<N>/`` (:mod:`retrieval_heads.sharding`), and that share is returned.
    """
    config = config or DecodeConfig()
    _check_mode(mode, phase, model)
    trials = list(trials)
    _check_trials(trials)
    chosen = tuple(sorted(set(parse_heads(heads if isinstance(heads, str) else list(heads)))))
    selection = selection or ("custom" if chosen else "none")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    condition = Condition(len(chosen) if k is None else int(k), selection, int(draw), chosen)
    extra: dict[str, Any] = {}
    if mode == "mean" and chosen:
        mean_z, extra = _mean_reference(model, trials, mean_z, n_reference)
    run_config = {
        "experiment": "ablate_grid",
        "condition": condition.to_dict(),
        "tag": tag or condition.tag,
        "mode": mode,
        "phase": phase,
        "decode": _decode_dict(config),
        "trials": {"n": len(trials), "sha": _trials_digest(trials)},
        **extra,
    }
    return _execute(
        model,
        trials,
        [condition],
        mode=mode,
        phase=phase,
        config=config,
        mean_z=mean_z,
        out=out,
        run_config=run_config,
        progress=progress,
        seed=None,
        tag=tag,
        extra=extra,
        shard=shard,
        batch_size=batch_size,
    )


def _execute(
    model: HookedModel,
    trials: Sequence[Trial],
    conditions: Sequence[Condition],
    *,
    mode: str,
    phase: str,
    config: DecodeConfig,
    mean_z: Tensor | None,
    out: str | Path | None,
    run_config: dict[str, Any],
    progress: bool,
    seed: int | None,
    tag: str | None = None,
    extra: Mapping[str, Any] | None = None,
    kind: str = "ablate",
    shard: Shard | None = None,
    batch_size: int | None = 1,
) -> list[TrialRecord]:
    """Plan every (condition, trial) unit, condition-major, and run them with the runner.

    ``batch_size`` (``None``: from the device's memory): NIAH trials of one condition and length
    run together, under their per-trial ablations stacked into one (row ``i`` as trial ``i``:
    :meth:`~retrieval_heads.ablation_hooks.TrialAblations.stacked`; every mode); fact and chain
    trials, and a batch whose ablations cannot be stacked, run one by one. The records do not
    change."""
    # What would fail on the first trial fails here, before a results directory is made: a
    # directory made for a run that cannot run would refuse the corrected rerun.
    check_lengths(model, trials)
    for condition in [Condition(0, "none", 0, ()), *conditions]:
        ablation_hooks(
            model, condition.heads, mode, phase=phase, trials=trials, mean_z=mean_z, config=config
        )
    recordings = _Recordings(model, config)
    # what every record of this sweep shares (the per-unit and the batched path alike)
    common: dict[str, Any] = dict(
        mode=mode, phase=phase, config=config, tag=tag, extra_params=extra
    )
    built: dict[int, TrialAblations | None] = {}

    def ablations(unit: Unit) -> TrialAblations | None:
        position, condition = unit.condition
        if position not in built:  # a condition's ablations, set up when its first unit runs
            built[position] = trial_ablations(
                model,
                condition.heads,
                mode,
                phase=phase,
                trials=trials,
                mean_z=mean_z,
                config=config,
                _recordings=recordings,
            )
        return built[position]

    def hooks_of(per_trial: TrialAblations | None) -> tuple[HooksFor | None, Callable]:
        return (per_trial.hooks, per_trial.extras) if per_trial else (None, _no_extras)

    def run_unit(unit: Unit) -> TrialRecord:
        hooks, extras = hooks_of(ablations(unit))
        return _run_one(model, unit.item, unit.condition[1], hooks=hooks, extras=extras, **common)

    def batchable(unit: Unit) -> bool:
        _, condition = unit.condition
        return _task(unit.item) == "niah" and (not condition.heads or mode in BATCHABLE_MODES)

    def run_batch(batch: list[Unit]) -> list[TrialRecord]:  # the runner runs a lone unit itself
        per_trial, condition = ablations(batch[0]), batch[0].condition[1]
        batch_trials = [u.item for u in batch]
        stacked = per_trial.stacked(batch_trials) if per_trial else None
        if per_trial and stacked is None:  # ablations that cannot share a batch
            return [run_unit(unit) for unit in batch]
        prefill, decode = (
            (stacked.prefill_hooks(model), stacked.decode_hooks(model)) if stacked else ([], [])
        )
        scored = score_batch(
            model, batch_trials, config, prefill_hooks=prefill, decode_hooks=decode
        )
        hooks, extras = hooks_of(per_trial)
        return [
            _run_trial(model, trial, condition, hooks=hooks, extras=extras, scored=record, **common)
            for trial, record in zip(batch_trials, scored, strict=True)
        ]

    units = [
        Unit(f"{t.trial_id}|{tag or condition.tag}", t, (position, condition))
        for position, condition in enumerate(conditions)
        for t in trials
    ]
    return run_sweep(
        units,
        run_unit,
        run_batch=None if batch_size == 1 else run_batch,
        batch_key=lambda u: (
            (u.condition[0], len(u.item.input_ids)) if batchable(u) else u.record_id
        ),
        batch_size=unit_batch_size(model, batch_size),
        out=out,
        model=model_name(model),
        kind=kind,
        config=run_config,
        seed=seed,
        extra_meta=model_info(model),
        shard=shard,
        progress="ablation trials" if progress else False,
    )


# The modes whose NIAH trials may run in batches: all of them (per-trial ablations are stacked,
# TrialAblations.stacked).
BATCHABLE_MODES = ("uniform", "zero", "mean", "resample", "knockout")


def _no_extras(trial: Trial) -> dict[str, Any]:
    """A condition that ablates no head adds no params."""
    return {}


# ---------------------------------------------------------------------------------------------
# K-sweep


def _score_source(scores: Scores, given: str | None) -> str:
    if given is not None:
        return given
    if isinstance(scores, HeadScores):
        return scores.source or f"HeadScores({scores.n_passed}/{scores.n_total} passing trials)"
    return "array"


def k_sweep(
    model: HookedModel,
    trials: Sequence[Trial],
    scores: Scores,
    ks: Iterable[int] = (0, 1, 2, 5, 10, 20, 50),
    *,
    draws: int = 5,
    seed: int = 0,
    mode: Mode = "uniform",
    phase: Phase = "decode",
    out: str | Path | None = None,
    include_matched: bool = True,
    progress: bool = False,
    threshold: float = analysis.RETRIEVAL_THRESHOLD,
    config: DecodeConfig | None = None,
    mean_z: Tensor | None = None,
    n_reference: int = 8,
    score_source: str | None = None,
    shard: Shard | None = None,
    batch_size: int | None = 1,
) -> list[TrialRecord]:
    """Ablate the top-K heads, and K random (and layer-matched) heads, for every K.

    Conditions come from :func:`~retrieval_heads.selection.plan_conditions` (K clipped to the
    model's head count; K=0 is the unablated baseline; ``draws`` random and matched draws per K,
    seeded by ``seed``). Every condition runs over every trial; records carry
    ``k``/``selection``/``draw`` so
    :func:`retrieval_heads.analysis.summarise_k_sweep` summarises them. With ``out`` everything
    goes into
    one results directory (``kind="ablate"``): its config (checked on resume) holds the ks
    (requested and clipped), draws, seed, mode, phase, threshold, the score source with the
    top heads' scores, the trial ids' digest and every condition's heads; a rerun after an
    interruption skips the records already there. Returns the records (sorted by id with
    ``out``; in run order without). With ``shard`` (and ``out``) only the shard's share of the
    (condition, trial) pairs runs, condition-major, into ``out/shards/<i>-of-<N>/``
    (:mod:`retrieval_heads.sharding`), and that share is returned.
    """
    config = config or DecodeConfig()
    _check_mode(mode, phase, model)
    trials = list(trials)
    _check_trials(trials)
    table = _table(scores)
    if table.shape != (model.n_layers, model.n_heads):
        raise ValueError(
            f"the scores are {table.shape[0]}x{table.shape[1]} heads, the model "
            f"{model.n_layers}x{model.n_heads}"
        )
    ks = list(ks)
    conditions, notes = plan_conditions(
        table, ks, draws=draws, seed=seed, threshold=threshold, include_matched=include_matched
    )
    extra: dict[str, Any] = {}
    if mode == "mean" and any(c.heads for c in conditions):
        mean_z, extra = _mean_reference(model, trials, mean_z, n_reference)
    largest = max((c.k for c in conditions), default=0)
    run_config = {
        "experiment": "k_sweep",
        "ks_requested": ks,
        "ks": sorted({c.k for c in conditions}),
        "draws": draws,
        "seed": seed,
        "mode": mode,
        "phase": phase,
        "threshold": threshold,
        "include_matched": include_matched,
        "score_source": _score_source(scores, score_source),
        "top_scores": [
            [h.dotted, float(table[h.layer, h.head])] for h in top_heads(table, largest)
        ],
        "decode": _decode_dict(config),
        "trials": {"n": len(trials), "sha": _trials_digest(trials)},
        "conditions": [c.to_dict() for c in conditions],
        "notes": notes,
        **extra,
    }
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return _execute(
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
        shard=shard,
        batch_size=batch_size,
    )
