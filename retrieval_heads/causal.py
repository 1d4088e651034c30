"""Causal experiments: what breaks when retrieval heads are ablated, and what does not.

Wu et al. (2024) test the claim that retrieval heads *cause* retrieval by ablating the top-K of
them and comparing with K random heads: needle-in-a-haystack (NIAH) accuracy collapses under the
first and barely moves under the second, while tasks answered from the weights (memorised facts)
stay intact. This module runs those experiments on any :class:`~retrieval_heads.model.HookedModel`,
with the embedded model's extra controls:

- :func:`ablate_grid` — answer (and score) trials with a set of heads ablated;
- :func:`random_heads`, :func:`matched_layer_heads` — seeded control selections that never
  contain a retrieval head or a top-K head; :func:`plan_conditions` lays out a whole sweep;
- :func:`k_sweep` — top-K vs random-K (vs matched-layer-K) for a list of K, into one resumable
  results directory; summaries by :func:`retrieval_heads.analysis.k_sweep`;
- :func:`answer_classes` — how the failures look (the hallucination analysis);
- :func:`fact_trials`, :func:`chain_trials`, :func:`control_sweep` — NIAH vs memorised facts vs
  chain following under the same ablations (embedded model only: its world defines the tasks);
- :func:`patching_map`, :func:`patching_vs_scores` — per-head activation patching on pairs that
  differ only in the needle's value, and its agreement with the retrieval scores.

Choices, all explicit and recorded in every record's ``params`` and in the results' meta:

- a *condition* is ``(k, selection, draw)`` with its heads; ``selection`` is ``"top"`` (the K
  best-scored heads), ``"random"`` (K heads drawn from the non-retrieval heads, score <=
  ``threshold``, never one of the top-K), ``"matched_layer"`` (as many heads per layer as the
  top-K has, drawn from the non-retrieval heads of those layers), ``"none"`` (K=0, the
  baseline) or ``"custom"`` (heads passed by hand). Draws are reproducible from
  ``(seed, k, draw)`` alone (a SHA-256-seeded ``random.Random``);
- an ablated record's trial id is ``"<trial id>|<selection>|k=<K>|draw=<d>"``, so one results
  directory holds every condition and a rerun resumes where it stopped;
- records carry ``k``, ``selection``, ``draw``, ``mode``, ``phase``, ``ablated`` (``"L.H"``
  labels), ``task`` and ``answer_class`` (:func:`~retrieval_heads.grading.classify_failure`
  with the prompt's context, so ``in_context`` is possible), plus the mode's extras
  (``blocked``, ``resample_from``, ``mean_reference``);
- grading: NIAH trials as in detection (ROUGE-1 recall >= 0.5, the paper's criterion); facts by
  exact match (an answer is a region and a town; half of it is not the fact); chains by the hop
  list (``passed``: every hop right and in order; ``recall``: the share of hops right).
  ``params["exact"]`` is recorded for every task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from retrieval_heads import analysis
from retrieval_heads.grading import FAILURE_KINDS, classify_failure, exact_match, grade
from retrieval_heads.heads import Head, parse_heads
from retrieval_heads.interventions import (
    MODES,
    PHASES,
    Ablation,
    ZRecorder,
    check_uniform,
    mean_head_z,
)
from retrieval_heads.model import HookedModel
from retrieval_heads.records import TrialRecord
from retrieval_heads.scores import HeadScores
from retrieval_heads.scoring import (
    ANSWER_ROOM,
    SCORERS,
    DecodeConfig,
    HooksFor,
    check_lengths,
    greedy_decode,
    score_trial,
)
from retrieval_heads.sharding import Shard, shard_dir, shard_meta
from retrieval_heads.store import ResultsDir
from retrieval_heads.trials import world_trials
from retrieval_heads.trials.builder import build_trial
from retrieval_heads.trials.needles import Needle, NeedleSet
from retrieval_heads.trials.trial import Trial

__all__ = [
    "SELECTIONS",
    "TASKS",
    "Condition",
    "ControlSweep",
    "PatchingPair",
    "ablate_grid",
    "ablation_hooks",
    "answer_classes",
    "answer_trial",
    "chain_trials",
    "clip_ks",
    "control_sweep",
    "fact_trials",
    "matched_layer_heads",
    "patching_map",
    "patching_pairs",
    "patching_vs_scores",
    "plan_conditions",
    "random_heads",
    "resample_sources",
    "top_heads",
]

SELECTIONS = ("top", "random", "matched_layer", "none", "custom")
TASKS = ("niah", "fact", "chain")
Scores = HeadScores | np.ndarray


# ---------------------------------------------------------------------------------------------
# choosing heads


def _rng(*parts: Any) -> random.Random:
    """A generator seeded by a stable hash of ``parts`` (not Python's salted ``hash``)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _table(scores: Scores) -> np.ndarray:
    return analysis.score_table(scores)


def _is_retrieval(table: np.ndarray, threshold: float) -> np.ndarray:
    """Retrieval heads: score strictly above ``threshold`` (NaN, no evidence, is not one)."""
    return np.nan_to_num(table, nan=-np.inf) > threshold


def top_heads(scores: Scores, k: int) -> list[Head]:
    """The ``k`` best-scored heads, best first (ties by (layer, head); NaN never chosen)."""
    return analysis.top_k_heads(scores, k)


def _all_heads(table: np.ndarray) -> list[Head]:
    return [Head(layer, head) for layer in range(table.shape[0]) for head in range(table.shape[1])]


def _draw_random(
    scores: Scores, k: int, *, seed: int, draw: int, threshold: float, exclude_top: int | None
) -> tuple[list[Head], str | None]:
    table = _table(scores)
    exclude = set(top_heads(table, k if exclude_top is None else exclude_top))
    retrieval = _is_retrieval(table, threshold)
    heads = _all_heads(table)
    strict = [h for h in heads if h not in exclude and not retrieval[h.layer, h.head]]
    rng = _rng("random_heads", seed, k, draw)
    if len(strict) >= k:
        return sorted(rng.sample(strict, k)), None
    extra = [h for h in heads if h not in exclude and retrieval[h.layer, h.head]]
    if len(strict) + len(extra) < k:
        raise ValueError(
            f"cannot draw {k} random heads outside the top-{len(exclude)}: the model has only "
            f"{len(strict) + len(extra)} other heads"
        )
    chosen = strict + rng.sample(extra, k - len(strict))
    note = (
        f"only {len(strict)} non-retrieval heads (score <= {threshold:g}) outside the "
        f"top-{len(exclude)}; {k - len(strict)} drawn from retrieval heads outside it"
    )
    return sorted(chosen), note


def random_heads(
    scores: Scores,
    k: int,
    *,
    seed: int,
    draw: int,
    threshold: float = analysis.RETRIEVAL_THRESHOLD,
    exclude_top: int | None = None,
    fallback: bool = False,
) -> list[Head]:
    """``k`` heads drawn at random from the non-retrieval heads, none of them a top-K head.

    The pool is every head whose score is ``<= threshold`` (NaN counts as not a retrieval head)
    and that is not among the ``exclude_top`` best (default ``k``). The draw depends only on
    ``(seed, k, draw)`` and the pool, never on global random state. When the pool holds fewer
    than ``k`` heads this raises ``ValueError``, unless ``fallback`` lets the rest come from
    retrieval heads outside the top (:func:`plan_conditions` records that as a note). Returns
    the heads sorted by (layer, head).
    """
    _check_k(k, _table(scores))
    heads, note = _draw_random(
        scores, k, seed=seed, draw=draw, threshold=threshold, exclude_top=exclude_top
    )
    if note and not fallback:
        raise ValueError(f"cannot draw {k} random non-retrieval heads: {note} (fallback=True)")
    return heads


def _draw_matched(
    scores: Scores, k: int, *, seed: int, draw: int, threshold: float
) -> tuple[list[Head], str | None]:
    table = _table(scores)
    top = top_heads(table, k)
    retrieval = _is_retrieval(table, threshold)
    excluded = set(top)
    free = {
        layer: [
            Head(layer, h)
            for h in range(table.shape[1])
            if Head(layer, h) not in excluded and not retrieval[layer, h]
        ]
        for layer in range(table.shape[0])
    }
    need: dict[int, int] = defaultdict(int)
    for h in top:
        need[h.layer] += 1
    rng = _rng("matched_layer_heads", seed, k, draw)
    chosen: list[Head] = []
    notes = []
    for layer in sorted(need):
        pool = free[layer]
        take = min(need[layer], len(pool))
        picked = rng.sample(pool, take)
        chosen += picked
        for h in picked:
            pool.remove(h)
        short = need[layer] - take
        distance = 1
        borrowed: dict[int, int] = defaultdict(int)
        while short and distance < table.shape[0]:
            near = [
                h
                for other in (layer - distance, layer + distance)
                if 0 <= other < table.shape[0]
                for h in free[other]
            ]
            picked = rng.sample(near, min(short, len(near)))
            for h in picked:
                free[h.layer].remove(h)
                borrowed[h.layer] += 1
            chosen += picked
            short -= len(picked)
            distance += 1
        if short:
            raise ValueError(
                f"cannot draw {k} layer-matched non-retrieval heads: too few non-retrieval heads "
                f"outside the top-{k}"
            )
        if borrowed:
            notes.append(
                f"layer {layer} has {take} of {need[layer]} non-retrieval heads outside the "
                f"top-{k}; took "
                + ", ".join(f"{n} from layer {other}" for other, n in sorted(borrowed.items()))
            )
    return sorted(chosen), "; ".join(notes) or None


def matched_layer_heads(
    scores: Scores,
    k: int,
    *,
    seed: int,
    draw: int,
    threshold: float = analysis.RETRIEVAL_THRESHOLD,
    fallback: bool = False,
) -> list[Head]:
    """As many heads per layer as the top-K has, drawn from that layer's non-retrieval heads.

    Never a top-K head or a head scoring above ``threshold``. Reproducible from
    ``(seed, k, draw)``. When a layer has too few such heads, ``fallback`` takes the rest from the
    nearest layers (distance 1, then 2, ...; :func:`plan_conditions` records where from);
    without it that raises ``ValueError``. Returns the heads sorted by (layer, head).
    """
    _check_k(k, _table(scores))
    heads, note = _draw_matched(scores, k, seed=seed, draw=draw, threshold=threshold)
    if note and not fallback:
        raise ValueError(f"cannot match the top-{k} layer by layer: {note} (fallback=True)")
    return heads


def _check_k(k: int, table: np.ndarray) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    if k > table.size:
        raise ValueError(f"k={k} exceeds the model's {table.size} heads")


@dataclass(frozen=True)
class Condition:
    """One ablation condition of a sweep: ``k`` heads chosen by ``selection`` (draw ``draw``).

    ``heads`` are sorted by (layer, head); ``note`` says when a control draw needed a fallback.
    """

    k: int
    selection: str
    draw: int
    heads: tuple[Head, ...]
    note: str | None = None

    @property
    def tag(self) -> str:
        """The suffix of this condition's trial ids: ``"<selection>|k=<K>|draw=<d>"``."""
        return f"{self.selection}|k={self.k}|draw={self.draw}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "selection": self.selection,
            "draw": self.draw,
            "heads": [h.dotted for h in self.heads],
            "note": self.note,
        }


def clip_ks(ks: Iterable[int], n_heads: int) -> tuple[list[int], list[str]]:
    """``ks`` clipped to ``[0, n_heads]``, duplicates after clipping dropped (order kept)."""
    out: list[int] = []
    notes = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"every K must be a non-negative integer, got {k!r}")
        clipped = min(int(k), n_heads)
        if clipped != k:
            notes.append(f"K={k} clipped to the model's {n_heads} heads")
        if clipped in out:
            notes.append(f"K={k} dropped: K={clipped} is already in the sweep")
            continue
        out.append(clipped)
    return out, notes


def plan_conditions(
    scores: Scores,
    ks: Iterable[int],
    *,
    draws: int = 5,
    seed: int = 0,
    threshold: float = analysis.RETRIEVAL_THRESHOLD,
    include_random: bool = True,
    include_matched: bool = True,
) -> tuple[list[Condition], list[str]]:
    """Every condition of a K-sweep, and notes on what was clipped, skipped or fell back.

    K=0 is the baseline (selection ``"none"``, one draw). Each K>0 gets ``top`` once, ``random``
    ``draws`` times and ``matched_layer`` ``draws`` times (if asked). A random or matched draw
    that cannot avoid the top-K (K above half the heads, say) is skipped with a note; one that
    needed a fallback carries its note.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    table = _table(scores)
    clipped, notes = clip_ks(ks, table.size)
    out: list[Condition] = []
    for k in clipped:
        if k == 0:
            out.append(Condition(0, "none", 0, ()))
            continue
        out.append(Condition(k, "top", 0, tuple(sorted(top_heads(table, k)))))
        kinds = [("random", _draw_random)] if include_random else []
        if include_matched:
            kinds.append(("matched_layer", _draw_matched))
        for selection, drawer in kinds:
            for d in range(draws):
                extra = {"exclude_top": None} if selection == "random" else {}
                try:
                    heads, note = drawer(table, k, seed=seed, draw=d, threshold=threshold, **extra)
                except ValueError as error:
                    notes.append(f"{selection} K={k} skipped: {error}")
                    break
                out.append(Condition(k, selection, d, tuple(heads), note))
    return out, notes


# ---------------------------------------------------------------------------------------------
# hooks for a trial


def resample_sources(trials: Sequence[Trial], phase: str = "decode") -> dict[str, Trial]:
    """For each trial, the trial whose ``z`` a resample ablation replays.

    The next trial in the list (cyclically) with another target needle and another haystack
    window (another length or haystack offset); failing that, the next with another needle. In
    phase ``"all"`` the prompt is replayed too, so the source must have the same length.
    """
    out: dict[str, Trial] = {}
    n = len(trials)
    for i, trial in enumerate(trials):
        order = [trials[(i + j) % n] for j in range(1, n)]
        if phase == "all":
            order = [t for t in order if len(t.input_ids) == len(trial.input_ids)]
        other_needle = [t for t in order if _needle_key(t) != _needle_key(trial)]
        other_hay = [t for t in other_needle if _haystack_key(t) != _haystack_key(trial)]
        pick = (other_hay or other_needle or [None])[0]
        if pick is None:
            raise ValueError(
                f"trial {trial.trial_id}: no other trial with another needle"
                + (" and the same length" if phase == "all" else "")
                + " to resample from"
            )
        out[trial.trial_id] = pick
    return out


def _needle_key(trial: Trial) -> Any:
    if trial.needles:
        return trial.target.needle.needle_id
    return ("answer", trial.answer)


def _haystack_key(trial: Trial) -> Any:
    p = trial.params
    return (p.get("haystack"), p.get("haystack_offset"), trial.context_length)


def _budget(trial: Trial, model: HookedModel, config: DecodeConfig) -> int:
    if trial.needles:
        return config.budget(trial, model)
    wanted = config.max_new_tokens
    if wanted is None:
        n_answer = len(model.tokenizer(trial.answer, add_special_tokens=False)["input_ids"])
        wanted = max(ANSWER_ROOM, n_answer + 8)  # the rule of DecodeConfig.budget
    return max(1, min(wanted, model.n_ctx - trial.context_length + 1))


class _Recordings:
    """The ``z`` of every head on resample sources, recorded once per (source, phase)."""

    def __init__(self, model: HookedModel, config: DecodeConfig) -> None:
        self.model = model
        self.config = config
        self._store: dict[tuple[str, str, int], Any] = {}

    @torch.no_grad()
    def get(self, source: Trial, phase: str, n_steps: int) -> Any:
        key = (source.trial_id, phase, n_steps)
        if key not in self._store:
            model = self.model
            ids = torch.tensor(source.input_ids, dtype=torch.long, device=model.device)
            rec = ZRecorder(model)
            # As in score_trial: prefill all but the last prompt token, feed it as step 0.
            state = model.prefill(
                ids[None, :-1], fwd_hooks=rec.prefill_hooks() if phase == "all" else ()
            )
            hooks = rec.decode_hooks()
            token = ids[-1:]
            for _ in range(n_steps):
                logits = model.step(state, token, fwd_hooks=hooks)
                token = logits.argmax(-1)
            self._store[key] = rec.result()
        return self._store[key]


def ablation_hooks(
    model: HookedModel,
    heads: Iterable[Head | str] | str,
    mode: str = "uniform",
    *,
    phase: str = "decode",
    trials: Sequence[Trial] = (),
    mean_z: Tensor | None = None,
    config: DecodeConfig | None = None,
    _recordings: _Recordings | None = None,
) -> tuple[HooksFor | None, Callable[[Trial], dict[str, Any]]]:
    """``(hooks, extras)``: the scorer's per-trial hook function and the params it adds.

    ``hooks(trial) -> (prefill_hooks, decode_hooks)`` (``None`` when no head is ablated);
    ``extras(trial)`` says what the mode did on that trial. ``knockout`` blocks every target
    needle's span (the whole needle sentence); ``mean`` needs ``mean_z``; ``resample`` replays
    the source of :func:`resample_sources` over ``trials``.
    """
    _check_mode(mode, phase, model)
    selected = sorted(set(parse_heads(heads if isinstance(heads, str) else list(heads))))
    for h in selected:
        h.check(model.n_layers, model.n_heads)
    config = config or DecodeConfig()
    if not selected:
        return None, lambda trial: {}
    if mode == "mean" and mean_z is None:
        raise ValueError("mode 'mean' needs mean_z= (see interventions.mean_head_z)")
    sources = resample_sources(trials, phase) if mode == "resample" else {}
    recordings = _recordings or _Recordings(model, config)

    def build(trial: Trial) -> Ablation:
        if mode == "knockout":
            if not trial.targets:
                raise ValueError(f"trial {trial.trial_id} has no needle to knock out")
            blocked = sorted({p for t in trial.targets for p in range(*t.span)})
            return Ablation(selected, mode, phase, blocked_positions=blocked, model=model)
        if mode == "mean":
            return Ablation(selected, mode, phase, mean_z=mean_z, model=model)
        if mode == "resample":
            if trial.trial_id not in sources:
                raise ValueError(f"trial {trial.trial_id} is not among the trials given")
            source = sources[trial.trial_id]
            n_steps = max(_budget(trial, model, config), _budget(source, model, config))
            recorded = recordings.get(source, phase, n_steps)
            return Ablation(selected, mode, phase, resample=recorded, model=model)
        return Ablation(selected, mode, phase, model=model)

    def hooks(trial: Trial):
        ablation = build(trial)
        return ablation.prefill_hooks(model), ablation.decode_hooks(model)

    def extras(trial: Trial) -> dict[str, Any]:
        if mode == "knockout":
            return {"blocked": [list(t.span) for t in trial.targets]}
        if mode == "resample":
            return {"resample_from": sources[trial.trial_id].trial_id}
        return {}

    return hooks, extras


# ---------------------------------------------------------------------------------------------
# answering one trial


def _task(trial: Trial) -> str:
    return str(trial.params.get("task", "niah"))


def _hops(text: str) -> list[str]:
    return [" ".join(part.split()) for part in text.split(",") if part.strip()]


@torch.no_grad()
def answer_trial(
    model: HookedModel,
    trial: Trial,
    config: DecodeConfig | None = None,
    hooks: HooksFor | None = None,
) -> TrialRecord:
    """Greedily answer a trial and grade it, without scoring heads.

    For trials whose answer is not copied from a needle (memorised facts: ``needles=()``),
    where a retrieval score means nothing; the record's score tables are zeros and it has no
    copy events. Decoding is :func:`~retrieval_heads.scoring.greedy_decode`, as in
    ``score_trial`` (the last prompt token is fed as the first decode step; stop at EOS or a
    stop string), so ablation hooks act on exactly the same steps. Grading depends on ``params["task"]`` (see the module docstring).
    """
    config = config or DecodeConfig()
    began = time.perf_counter()
    ids = torch.tensor(trial.input_ids, dtype=torch.long, device=model.device)
    prefill_hooks, decode_hooks = hooks(trial) if hooks else ([], [])
    generated, stopped_by = greedy_decode(
        model,
        ids,
        _budget(trial, model, config),
        config,
        prefill_hooks=prefill_hooks,
        decode_hooks=decode_hooks,
    )
    text = model.tokenizer.decode(generated, skip_special_tokens=True).strip()
    passed, recall = _grade(trial, text, config)
    zeros = [[0.0] * model.n_heads for _ in range(model.n_layers)]
    params = dict(trial.params)
    params.update(
        context_length=trial.context_length,
        depth_percent=trial.depth_percent,
        stopped_by=stopped_by,
    )
    return TrialRecord(
        trial_id=trial.trial_id,
        params=params,
        expected=trial.answer,
        generated_ids=generated,
        generated_text=text,
        passed=passed,
        recall=recall,
        reason=None if passed else classify_failure(text, trial.answer, stopped_by=stopped_by),
        scores={name: zeros for name in SCORERS},
        copy_events=[],
        n_layers=model.n_layers,
        n_heads=model.n_heads,
        elapsed_s=round(time.perf_counter() - began, 4),
    )


def _grade(trial: Trial, text: str, config: DecodeConfig) -> tuple[bool, float]:
    task = _task(trial)
    if task == "chain":
        want = [" ".join(h.split()) for h in trial.params["hops"]]
        got = _hops(text)
        right = sum(1 for a, b in zip(got, want, strict=False) if a == b)
        return got == want, right / len(want)
    verdict = grade(text, trial.answer, threshold=config.pass_threshold)
    if task == "fact":
        return verdict.exact, verdict.recall
    return verdict.passed, verdict.recall


def _context_text(model: HookedModel, trial: Trial) -> str:
    start, end = trial.context_span
    return model.tokenizer.decode(list(trial.input_ids[start:end]), skip_special_tokens=True)


def _run_trial(
    model: HookedModel,
    trial: Trial,
    condition: Condition,
    *,
    mode: str,
    phase: str,
    config: DecodeConfig,
    hooks: HooksFor | None,
    extras: Callable[[Trial], dict[str, Any]],
    tag: str | None = None,
    extra_params: Mapping[str, Any] | None = None,
) -> TrialRecord:
    task = _task(trial)
    if task == "niah":
        record = score_trial(model, trial, config, hooks)
    else:
        record = answer_trial(model, trial, config, hooks)
    distractors = [p.needle.answer for p in trial.distractors] if task == "niah" else []
    answer_class = (
        "correct"
        if record.passed
        else classify_failure(
            record.generated_text,
            trial.answer,
            distractor_answers=distractors,
            context=_context_text(model, trial),
            threshold=config.pass_threshold,
            stopped_by=record.params.get("stopped_by"),
        )
    )
    if not record.passed and answer_class == "correct":
        answer_class = "partial"  # passes ROUGE but not the task's stricter criterion
    params = dict(record.params)
    params.update(
        task=task,
        base_trial_id=trial.trial_id,
        k=condition.k,
        selection=condition.selection,
        draw=condition.draw,
        mode=mode,
        phase=phase,
        ablated=[h.dotted for h in condition.heads],
        answer_class=answer_class,
        exact=exact_match(record.generated_text, trial.answer),
        condition=tag or condition.tag,
        **extras(trial),
        **dict(extra_params or {}),
    )
    if condition.note:
        params["selection_note"] = condition.note
    return dataclasses.replace(
        record,
        trial_id=f"{trial.trial_id}|{tag or condition.tag}",
        params=params,
        reason=None if answer_class == "correct" else answer_class,
    )


# ---------------------------------------------------------------------------------------------
# NIAH under ablation


def _model_name(model: HookedModel) -> str:
    return getattr(model, "name", None) or type(model.hf_model).__name__


def _trials_digest(trials: Sequence[Trial]) -> str:
    blob = ",".join(t.trial_id for t in trials)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _decode_dict(config: DecodeConfig) -> dict[str, Any]:
    return config.__dict__ | {"stop_strings": list(config.stop_strings)}


def _check_mode(mode: str, phase: str, model: HookedModel) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; the modes are {', '.join(MODES)}")
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; use one of {', '.join(PHASES)}")
    if mode == "uniform":
        check_uniform(model)


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


class _Runner:
    """Runs conditions over trials into an optional results directory, with progress."""

    def __init__(
        self,
        model: HookedModel,
        trials: Sequence[Trial],
        *,
        mode: str,
        phase: str,
        config: DecodeConfig,
        mean_z: Tensor | None,
        run: ResultsDir | None,
        total: int,
        progress: bool,
        shard: Shard | None = None,
    ) -> None:
        self.model = model
        self.trials = list(trials)
        self.mode = mode
        self.phase = phase
        self.config = config
        self.mean_z = mean_z
        self.run = run
        self.shard = shard
        self.records: list[TrialRecord] = []
        self.recordings = _Recordings(model, config)
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="ablation trials", unit="trial")

    def condition(
        self,
        condition: Condition,
        tag: str | None = None,
        extra: Mapping[str, Any] | None = None,
        position: int = 0,
    ) -> None:
        """Run ``condition`` over the trials; ``position`` is the condition's index in the sweep
        (a shard owns the (condition, trial) units at ``position * n_trials + trial index``)."""
        done = self.run.done_ids() if self.run is not None else frozenset()
        first = position * len(self.trials)
        mine = [
            t for i, t in enumerate(self.trials) if self.shard is None or self.shard.owns(first + i)
        ]
        todo = [t for t in mine if f"{t.trial_id}|{tag or condition.tag}" not in done]
        if self.bar is not None:
            self.bar.update(len(mine) - len(todo))
        if not todo:
            return
        hooks, extras = ablation_hooks(
            self.model,
            condition.heads,
            self.mode,
            phase=self.phase,
            trials=self.trials,
            mean_z=self.mean_z,
            config=self.config,
            _recordings=self.recordings,
        )
        for trial in todo:
            record = _run_one(
                self.model,
                trial,
                condition,
                mode=self.mode,
                phase=self.phase,
                config=self.config,
                hooks=hooks,
                extras=extras,
                tag=tag,
                extra_params=extra,
            )
            if self.run is not None:
                self.run.append(record)
            self.records.append(record)
            if self.bar is not None:
                self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
) -> list[TrialRecord]:
    """Answer and score ``trials`` with ``heads`` ablated (``mode``, ``phase``).

    Records carry the condition in ``params`` (see the module docstring): ``k`` defaults to the
    number of heads, ``selection`` to ``"none"`` (no heads) or ``"custom"``. Trial ids are
    ``"<trial id>|<tag>"``, ``tag`` defaulting to ``"<selection>|k=<K>|draw=<d>"``. ``mean``
    mode uses ``mean_z`` or computes it once (:func:`~retrieval_heads.interventions.mean_head_z`,
    every position of the first ``n_reference`` trials); ``resample`` replays, for each trial,
    the next trial with another needle and haystack (:func:`resample_sources`); ``knockout``
    blocks the target needle's span. With ``out``, records go to a results directory
    (``kind="ablate"``; atomic, resumable) and the returned list is all of it, sorted by id.
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
) -> list[TrialRecord]:
    began = time.perf_counter()
    total = len(conditions) * len(trials)
    if shard is not None and out is None:
        raise ValueError("a sharded ablation needs out=: shards are merged from disk")
    # What would fail on the first trial fails here, before a results directory is made: a
    # directory made for a run that cannot run would refuse the corrected rerun.
    check_lengths(model, trials)
    for condition in [Condition(0, "none", 0, ()), *conditions]:
        ablation_hooks(
            model, condition.heads, mode, phase=phase, trials=trials, mean_z=mean_z, config=config
        )

    def go(run: ResultsDir | None) -> _Runner:
        runner = _Runner(
            model,
            trials,
            mode=mode,
            phase=phase,
            config=config,
            mean_z=mean_z,
            run=run,
            total=total if shard is None else len(shard.positions(total)),
            progress=progress,
            shard=shard,
        )
        try:
            for position, condition in enumerate(conditions):
                runner.condition(condition, tag, extra, position)
        finally:
            runner.close()
        return runner

    if out is None:
        return go(None).records
    path, shard_extra = out, None
    if shard is not None:  # its share only, into OUT/shards/<i>-of-<N>/ for merge
        path, shard_extra = shard_dir(out, shard), shard_meta(shard, total)
    with ResultsDir(
        path,
        model=_model_name(model),
        config=run_config,
        kind=kind,
        seed=seed,
        extra_meta=shard_extra,
    ) as run:
        go(run)
        run.finalize(timing={"wall_s": round(time.perf_counter() - began, 3)})
        return run.records()


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
    mode: str = "uniform",
    phase: str = "decode",
    out: str | Path | None = None,
    include_matched: bool = True,
    progress: bool = False,
    threshold: float = analysis.RETRIEVAL_THRESHOLD,
    config: DecodeConfig | None = None,
    mean_z: Tensor | None = None,
    n_reference: int = 8,
    score_source: str | None = None,
    shard: Shard | None = None,
) -> list[TrialRecord]:
    """Ablate the top-K heads, and K random (and layer-matched) heads, for every K.

    Conditions come from :func:`plan_conditions` (K clipped to the model's head count; K=0 is
    the unablated baseline; ``draws`` random and matched draws per K, seeded by ``seed``). Every
    condition runs over every trial; records carry ``k``/``selection``/``draw`` so
    :func:`retrieval_heads.analysis.k_sweep` summarises them. With ``out`` everything goes into
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
    )


def answer_classes(
    records: Iterable[TrialRecord], *, by_draw: bool = False
) -> dict[str, dict[str, float]]:
    """Share of each answer class per condition: ``{"top k=6": {"correct": 0.1, ...}}``.

    Conditions are ``"<selection> k=<K>"`` (draws pooled; ``by_draw`` adds ``" draw=<d>"``),
    prefixed by ``"<task>: "`` when the records hold more than one task. Every class of
    :data:`~retrieval_heads.grading.FAILURE_KINDS` is listed (0.0 when absent); a record without
    ``answer_class`` is classified from its text.
    """
    records = list(records)
    tasks = {r.params.get("task", "niah") for r in records}
    counts: dict[str, dict[str, int]] = {}
    order: list[tuple] = []
    for r in records:
        p = r.params
        label = f"{p.get('selection', 'none')} k={p.get('k', 0)}"
        if by_draw:
            label += f" draw={p.get('draw', 0)}"
        if len(tasks) > 1:
            label = f"{p.get('task', 'niah')}: {label}"
        cls = p.get("answer_class") or (
            "correct"
            if r.passed
            else classify_failure(
                r.generated_text, r.expected, stopped_by=r.params.get("stopped_by")
            )
        )
        if label not in counts:
            counts[label] = dict.fromkeys(FAILURE_KINDS, 0)
            order.append(
                (
                    p.get("task", "niah"),
                    int(p.get("k", 0)),
                    str(p.get("selection")),
                    p.get("draw", 0) if by_draw else 0,
                    label,
                )
            )
        counts[label][cls] = counts[label].get(cls, 0) + 1
    out = {}
    for *_, label in sorted(order):
        total = sum(counts[label].values())
        out[label] = {c: n / total for c, n in counts[label].items()}
    return out


# ---------------------------------------------------------------------------------------------
# controls on the embedded model


def _world():
    from retrieval_heads.tiny import world

    return world


def _tiny_trials():
    # The embedded world's trials (tiny_grid, tiny_needle_sets, its haystack and template),
    # through the trials package's one seam to them.
    return world_trials("tiny")


def _encode(model: HookedModel, text: str, what: str) -> list[int]:
    tokenizer = model.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        raise ValueError(
            f"{what}: the model's tokenizer does not cover the embedded model's language (it "
            "maps some words to <unk>); these controls are for load_model('tiny')"
        )
    return list(ids)


def _filler(model: HookedModel, n: int, rng: random.Random) -> list[int]:
    world = _world()
    ids: list[int] = []
    while len(ids) < n:
        ids += _encode(model, world.sentence(rng), "filler")
    return ids[len(ids) - n :]  # cut at the front: the context may open mid-sentence


def fact_trials(model: HookedModel, n: int, seed: int = 0, length: int = 256) -> list[Trial]:
    """``n`` memorised-fact trials of ``length`` tokens: filler, then a fact question.

    The answer ("where does the quiet baker live ?" -> "north ardon") comes from the world's fixed
    fact table (:func:`retrieval_heads.tiny.world.fact_table`), which the model learnt in
    training; it is never in the context, so the trials have no needle (``needles=()``) and are
    answered with :func:`answer_trial`. Facts are sampled without replacement, seeded.
    """
    world = _world()
    facts = world.fact_table()
    if not 0 < n <= len(facts):
        raise ValueError(f"n must be within 1..{len(facts)}, got {n}")
    rng = _rng("fact_trials", seed)
    chosen = rng.sample(range(len(facts)), n)
    bos = model.tokenizer.bos_token_id
    out = []
    for i, index in enumerate(chosen):
        fact = facts[index]
        question = _encode(model, fact.question, "fact question")
        n_filler = length - 1 - len(question)
        if n_filler < 1:
            raise ValueError(f"length {length} leaves no room for filler")
        ids = [bos, *_filler(model, n_filler, _rng("fact_filler", seed, i)), *question]
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
    world = _world()
    if hops < 1:
        raise ValueError(f"hops must be >= 1, got {hops}")
    rng = _rng("chain_trials", seed, hops)
    haystack = _tiny_trials().tiny_haystack(seed)
    template = _tiny_trials().tiny_template()
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
            [
                task,
                r.k,
                r.selection,
                r.n_draws,
                r.n_trials,
                f"{r.accuracy:.3f} ± {r.accuracy_std:.3f}",
                f"{r.recall:.3f} ± {r.recall_std:.3f}",
            ]
            for task, rows in self.rows.items()
            for r in rows
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
    :func:`chain_trials`), all seeded by ``seed``. Conditions as in :func:`k_sweep`. Returns
    the records and per-task summaries; with ``out``, a results directory (kind
    ``"ablate-controls"``), resumable like the K-sweep's; ``shard`` as in :func:`k_sweep`
    (the summaries are then of the share only).
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
            niah_trials = _tiny_trials().tiny_grid(
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
    mean_z, extra = (None, {})
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
    rows = {task: analysis.k_sweep(by_task[task]) for task in tasks if by_task[task]}
    return ControlSweep(records, rows)


# ---------------------------------------------------------------------------------------------
# activation patching


@dataclass(frozen=True)
class PatchingPair:
    """A clean prompt (needle A) and its corruption (same prompt, needle B's value in place)."""

    clean_ids: tuple[int, ...]
    corrupt_ids: tuple[int, ...]
    answer_token: int  # first token of A's value
    wrong_token: int  # first token of B's value
    trial_id: str
    answer: str
    wrong_answer: str
    depth_percent: float


def patching_pairs(
    model: HookedModel, n_pairs: int = 8, seed: int = 0, length: int = 128, n_distractors: int = 0
) -> list[PatchingPair]:
    """Clean/corrupt pairs in the embedded model's world, depths spread evenly over 0..100.

    The clean prompt is an ordinary NIAH trial (held-out keys); the corrupt one is the same
    token sequence with the needle's value replaced by another value of the same length whose
    every word differs (the question, the key and every position stay the same).
    """
    world = _world()
    sets = _tiny_trials().tiny_needle_sets(n_pairs, seed, n_distractors=n_distractors)
    haystack = _tiny_trials().tiny_haystack(seed)
    template = _tiny_trials().tiny_template()
    rng = _rng("patching_pairs", seed)
    pairs = []
    for i, needle_set in enumerate(sets):
        depth = 100.0 * i / (n_pairs - 1) if n_pairs > 1 else 50.0
        trial = build_trial(
            model.tokenizer,
            haystack,
            needle_set,
            length=length,
            depth_percent=depth,
            template=template,
            seed=seed,
            n_ctx=model.n_ctx,
        )
        words = trial.answer.split()
        other = [rng.choice([w for w in world.NUMBERS if w != word]) for word in words]
        wrong = " ".join(other)
        start, end = trial.answer_span
        replacement = _encode(model, wrong, "patching value")
        if len(replacement) != end - start:
            raise ValueError(
                f"the corrupt value {wrong!r} has {len(replacement)} tokens, the clean one "
                f"{end - start}"
            )
        corrupt = list(trial.input_ids)
        corrupt[start:end] = replacement
        pairs.append(
            PatchingPair(
                clean_ids=trial.input_ids,
                corrupt_ids=tuple(corrupt),
                answer_token=trial.input_ids[start],
                wrong_token=replacement[0],
                trial_id=trial.trial_id,
                answer=trial.answer,
                wrong_answer=wrong,
                depth_percent=depth,
            )
        )
    return pairs


def patching_map(
    model: HookedModel, n_pairs: int = 8, seed: int = 0, length: int = 128
) -> Float[Tensor, "layer head"]:
    """Per-head recovery of the logit difference, averaged over :func:`patching_pairs`.

    For each pair, :func:`~retrieval_heads.interventions.patch_heads` patches each head's clean
    ``z`` (every position) into the corrupt run and measures ``(ld_patched - ld_corrupt) /
    (ld_clean - ld_corrupt)`` with ``ld = logit[A's first token] - logit[B's first token]`` at
    the last prompt position; the map is the mean over pairs (pairs whose recovery is undefined
    are skipped). Returns a float32 ``[n_layers, n_heads]`` tensor on the CPU.
    """
    from retrieval_heads.interventions import patch_heads

    maps = []
    for pair in patching_pairs(model, n_pairs, seed, length):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            effect = patch_heads(
                model,
                list(pair.clean_ids),
                list(pair.corrupt_ids),
                pair.answer_token,
                pair.wrong_token,
            )
        maps.append(effect.float().cpu())
    stacked = torch.stack(maps)
    valid = ~torch.isnan(stacked)
    total = torch.where(valid, stacked, torch.zeros_like(stacked)).sum(0)
    count = valid.sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))


def patching_vs_scores(effect: Tensor | np.ndarray, scores: Scores) -> dict[str, float]:
    """Pearson and Spearman correlation between a patching map and retrieval scores (per head)."""
    table = effect.detach().cpu().double().numpy() if isinstance(effect, Tensor) else effect
    table = np.asarray(table, dtype=np.float64)
    return {
        "pearson": analysis.pearson(table, scores),
        "spearman": analysis.spearman(table, scores),
        "n_heads": int((~np.isnan(table) & ~np.isnan(_table(scores))).sum()),
    }
