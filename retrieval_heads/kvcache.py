"""What retrieval heads buy for KV-cache compression: a what-if, simulated with attention masks.

Head-aware compression (DuoAttention, RazorAttention, HeadKV) keeps every token's key and value
for a few heads and, for all the others, only the first ``sink`` tokens (attention sinks) and
the last ``window`` tokens. This module asks what that would cost on the needle-in-a-haystack
grid, without building a compressed cache: the windowed heads get an attention mask in hooks
(:func:`~retrieval_heads.interventions.window_hooks`), which gives exactly the attention they
would have over an evicted cache.

- Choice at KV-head level. A cache stores keys and values per *KV head*; under grouped-query
  attention every query head of a group reads the same cache, so a group is kept whole or
  windowed whole. A KV head's score is the ``max`` (or ``mean``) of its query heads' retrieval
  scores (:func:`kv_head_scores`).
- Memory share. A trial of ``L`` prompt tokens keeps ``L`` tokens for each full KV head and
  ``min(L, sink + window)`` for each windowed one: ``kv_share = (F * L + (N - F) *
  min(L, sink + window)) / (N * L)`` over the ``N = layers * kv_heads`` KV heads, ``F`` of them
  full (:meth:`KVPolicy.kv_share`). In a model with sliding-window layers (Gemma 2/3) such a
  layer's cache holds only its window ``w``: that is its full size (``min(L, w)`` in both sums),
  and a "full" KV head of a sliding layer keeps its own window, not the context.
- Phases. ``"decode"`` (default; RazorAttention-style): the prompt is read with full attention
  and the cache is compressed before the answer is written, so only decode steps are masked
  (the fast prefill stays). ``"all"`` (DuoAttention-style): the windowed heads are windowed
  while reading the prompt too.
- Curves (:func:`simulate`): accuracy against KV share for the top-K KV heads by score, for K
  random KV heads (seeded draws), and for uniform windowing of every head at several windows;
  plus the uncompressed baseline. Records are the scorer's own
  (:func:`~retrieval_heads.scoring.score_trial`), so each carries its grade and the head scores
  under compression, with the condition as a typed
  :class:`~retrieval_heads.conditions.KVWindow`.
- Export (:func:`export_heads`): the chosen full-attention heads in DuoAttention's layout, a
  ``layers x kv_heads`` tab-separated matrix of values in [0, 1] with a ``config.json`` holding
  ``sink_size`` and ``recent_size`` (what ``duo_attn.utils.load_attn_pattern`` reads), and as a
  plain JSON list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from jaxtyping import Float

from retrieval_heads import analysis
from retrieval_heads.batched import score_batch, unit_batch_size
from retrieval_heads.conditions import KVWindow
from retrieval_heads.interventions import window_hooks
from retrieval_heads.model import HookedModel
from retrieval_heads.records import TrialRecord
from retrieval_heads.runner import Unit, model_info, model_name, run_sweep
from retrieval_heads.scores import HeadScores, group_kv_heads
from retrieval_heads.scoring import DecodeConfig, check_lengths, score_trial
from retrieval_heads.seeding import seeded_rng
from retrieval_heads.sharding import Shard
from retrieval_heads.trials.trial import Trial

__all__ = [
    "KVCondition",
    "KVPolicy",
    "export_chosen",
    "export_heads",
    "kv_head_scores",
    "plan_kv_conditions",
    "random_kv_heads",
    "simulate",
    "top_kv_heads",
]

PHASES = ("decode", "all")
REDUCTIONS = ("max", "mean")
SELECTIONS = ("none", "top", "random", "uniform")
KVHead = tuple[int, int]  # (layer, kv head)


@dataclass(frozen=True)
class KVPolicy:
    """Which KV heads keep the whole context; every other one keeps ``sink`` + ``window``."""

    trial_independent: ClassVar[bool] = True  # the same window for every trial and row
    full_kv_heads: frozenset[KVHead]
    sink: int = 4
    window: int = 64
    phase: str = "decode"

    def __post_init__(self) -> None:
        for name, low in (("sink", 0), ("window", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.phase not in PHASES:
            raise ValueError(
                f"unknown phase {self.phase!r}: use 'decode' (compress the cache after the "
                "prompt) or 'all' (window the prompt too)"
            )
        object.__setattr__(self, "full_kv_heads", frozenset(map(tuple, self.full_kv_heads)))

    def windowed_kv_heads(self, n_layers: int, n_kv_heads: int) -> list[KVHead]:
        """The KV heads that keep only the sink and the window, layer-major."""
        for layer, kv in self.full_kv_heads:
            if not (0 <= layer < n_layers and 0 <= kv < n_kv_heads):
                raise ValueError(
                    f"KV head {layer}.{kv} is outside the model's {n_layers} layers x "
                    f"{n_kv_heads} KV heads"
                )
        return [
            (layer, kv)
            for layer in range(n_layers)
            for kv in range(n_kv_heads)
            if (layer, kv) not in self.full_kv_heads
        ]

    def windowed_query_heads(self, model: HookedModel) -> list[tuple[int, int]]:
        """Every query head that reads a windowed KV head (all of its group)."""
        group = model.n_heads // model.n_kv_heads
        return [
            (layer, kv * group + i)
            for layer, kv in self.windowed_kv_heads(model.n_layers, model.n_kv_heads)
            for i in range(group)
        ]

    def kv_share(
        self,
        n_layers: int,
        n_kv_heads: int,
        length: int,
        layer_windows: Sequence[int | None] | None = None,
    ) -> float:
        """Share of a ``length``-token KV cache this policy keeps (see the module docstring).

        ``layer_windows`` (:meth:`HookedModel.layer_windows`) gives a sliding-window layer's own
        window: the model's cache keeps only that many tokens there, so that is the layer's
        full size, and a windowed head of it keeps ``min(its window, sink + window)``."""
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        windows = list(layer_windows) if layer_windows is not None else [None] * n_layers
        if len(windows) != n_layers:
            raise ValueError(f"layer_windows has {len(windows)} entries for {n_layers} layers")
        own = [length if w is None else min(length, w) for w in windows]  # the model's cache
        windowed = set(self.windowed_kv_heads(n_layers, n_kv_heads))
        kept = sum(
            min(own[layer], self.sink + self.window) if (layer, kv) in windowed else own[layer]
            for layer in range(n_layers)
            for kv in range(n_kv_heads)
        )
        return kept / (n_kv_heads * sum(own))

    # ---- the intervention protocol (retrieval_heads.intervention.Intervention) ----------------

    def decode_hooks(self, model: HookedModel, trial: Trial | None = None) -> list:
        """The windowed heads' ``hook_attn_scores`` hooks (``trial`` is not used)."""
        heads = self.windowed_query_heads(model)
        return window_hooks(model, heads, self.sink, self.window) if heads else []

    def prefill_hooks(self, model: HookedModel, trial: Trial | None = None) -> list:
        """The same hooks in phase ``"all"``; none in phase ``"decode"`` (the fast prefill)."""
        return self.decode_hooks(model, trial) if self.phase == "all" else []

    def describe(self) -> dict[str, Any]:
        """``{"intervention": "kv_window", "full_kv_heads", "sink", "window", "phase"}``."""
        return {
            "intervention": "kv_window",
            "full_kv_heads": [f"{layer}.{kv}" for layer, kv in sorted(self.full_kv_heads)],
            "sink": self.sink,
            "window": self.window,
            "phase": self.phase,
        }

    def hooks(self, model: HookedModel) -> tuple[list, list]:
        """``(prefill_hooks, decode_hooks)`` (prefill ones only in phase all)."""
        return self.prefill_hooks(model), self.decode_hooks(model)


# ---------------------------------------------------------------------------------------------
# choosing KV heads


def kv_head_scores(
    scores: HeadScores | np.ndarray,
    n_kv_heads: int,
    reduce: Literal["max", "mean"] = "max",
    *,
    nan: Literal["ignore", "zero"] = "zero",
) -> Float[np.ndarray, "layer kv_head"]:
    """``[layer, kv_head]`` scores from ``[layer, head]`` ones (or a :class:`HeadScores`).

    ``reduce`` over each group's query-head scores; unscored heads (NaN) count as 0 by default
    (``nan="zero"``: every KV head gets a rankable score).
    :func:`~retrieval_heads.scores.group_kv_heads` is the one implementation (``HeadScores.kv_heads`` uses it with ``nan="ignore"``).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduce!r}: use one of {', '.join(REDUCTIONS)}")
    return group_kv_heads(analysis.score_table(scores), n_kv_heads, reduce, nan=nan)


def top_kv_heads(kv_scores: Float[np.ndarray, "layer kv_head"], k: int) -> list[KVHead]:
    """The ``k`` best-scored KV heads, best first (ties by (layer, kv head))."""
    flat = np.asarray(kv_scores, dtype=np.float64).ravel()
    _check_k(k, flat.size)
    order = np.argsort(-flat, kind="stable")[:k]
    n_kv = kv_scores.shape[1]
    return [(int(i // n_kv), int(i % n_kv)) for i in order]


def random_kv_heads(
    n_layers: int, n_kv_heads: int, k: int, *, seed: int, draw: int
) -> list[KVHead]:
    """``k`` KV heads drawn uniformly, reproducibly from ``(seed, draw, k)``, sorted."""
    _check_k(k, n_layers * n_kv_heads)
    rng = seeded_rng("kv-random", seed, draw, int(k))  # int(k): numpy K, same heads
    everything = [(layer, kv) for layer in range(n_layers) for kv in range(n_kv_heads)]
    return sorted(rng.sample(everything, k))


def _check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= n:
        raise ValueError(f"K must be an integer from 0 to the model's {n} KV heads, got {k!r}")


# ---------------------------------------------------------------------------------------------
# the sweep


@dataclass(frozen=True)
class KVCondition:
    """One point of a curve: ``selection`` of ``k`` full KV heads (draw ``draw``), or none."""

    selection: str
    k: int
    draw: int
    policy: KVPolicy | None  # None: the uncompressed model

    @property
    def tag(self) -> str:
        """The suffix of this condition's record ids."""
        if self.policy is None:
            return "kv:none"
        return (
            f"kv:{self.selection}|k={self.k}|s={self.policy.sink}|w={self.policy.window}"
            f"|draw={self.draw}"
        )

    def record_condition(self) -> KVWindow:
        """The typed condition its records carry."""
        d = self.to_dict()
        full = d["full_kv_heads"]
        return KVWindow(
            selection=self.selection,
            k=self.k,
            draw=self.draw,
            sink=d["sink"],
            window=d["window"],
            phase=d["phase"],
            full_kv_heads="all" if full == "all" else tuple(full),
            tag=self.tag,
        )

    def to_dict(self) -> dict[str, Any]:
        policy = self.policy
        return {
            "selection": self.selection,
            "k": self.k,
            "draw": self.draw,
            "sink": None if policy is None else policy.sink,
            "window": None if policy is None else policy.window,
            "phase": None if policy is None else policy.phase,
            "full_kv_heads": "all"
            if policy is None
            else [f"{layer}.{kv}" for layer, kv in sorted(policy.full_kv_heads)],
        }


def default_ks(n_kv_total: int) -> list[int]:
    """0, 1, 2, 4, ... below the model's KV-head count (all of them is the baseline)."""
    ks, k = [0], 1
    while k < n_kv_total:
        ks.append(k)
        k *= 2
    return ks


def plan_kv_conditions(
    kv_scores: np.ndarray,
    *,
    ks: Iterable[int] | None = None,
    draws: int = 3,
    seed: int = 0,
    sink: int = 4,
    window: int = 64,
    uniform_windows: Iterable[int] | None = None,
    phase: str = "decode",
) -> list[KVCondition]:
    """The baseline, top-K and ``draws`` random draws per K, and uniform windowing.

    ``ks`` defaults to :func:`default_ks`; ``uniform_windows`` to ``window`` times 1/2, 1, 2,
    4 and 8 (K = 0 full heads: every head windowed). Duplicates are dropped, order kept.
    """
    n_layers, n_kv = kv_scores.shape
    total = n_layers * n_kv
    if draws < 0:
        raise ValueError(f"draws must be >= 0, got {draws}")
    ks = list(dict.fromkeys(default_ks(total) if ks is None else ks))
    for k in ks:
        _check_k(k, total)
    if uniform_windows is None:
        uniform_windows = [max(1, window // 2), window, 2 * window, 4 * window, 8 * window]
    out = [KVCondition("none", total, 0, None)]
    for k in ks:
        chosen = top_kv_heads(kv_scores, k)
        out.append(KVCondition("top", k, 0, KVPolicy(frozenset(chosen), sink, window, phase)))
        if 0 < k < total:
            for d in range(draws):
                picked = random_kv_heads(n_layers, n_kv, k, seed=seed, draw=d)
                out.append(
                    KVCondition("random", k, d, KVPolicy(frozenset(picked), sink, window, phase))
                )
    for w in dict.fromkeys(uniform_windows):
        if w == window and 0 in ks:
            continue  # top K=0 at this window is already uniform windowing
        out.append(KVCondition("uniform", 0, 0, KVPolicy(frozenset(), sink, int(w), phase)))
    return out


@dataclass
class KVSweep:
    """What :func:`simulate` returns: the conditions, the KV scores and every record."""

    conditions: list[KVCondition]
    kv_scores: np.ndarray
    records: list[TrialRecord] = field(default_factory=list)

    def curve(self) -> list[analysis.KVPoint]:
        return analysis.kv_curve(self.records)

    def chosen(self, tolerance: float = 0.05) -> analysis.KVPoint:
        """The smallest top-K within ``tolerance`` of the baseline's accuracy
        (:func:`~retrieval_heads.analysis.smallest_sufficient_k`)."""
        return analysis.smallest_sufficient_k(self.curve(), tolerance)


def simulate(
    model: HookedModel,
    trials: Sequence[Trial],
    scores: HeadScores | Float[np.ndarray, "layer head"],
    *,
    ks: Iterable[int] | None = None,
    draws: int = 3,
    seed: int = 0,
    sink: int = 4,
    window: int = 64,
    uniform_windows: Iterable[int] | None = None,
    phase: Literal["decode", "all"] = "decode",
    reduce: Literal["max", "mean"] = "max",
    out: str | Path | None = None,
    config: DecodeConfig | None = None,
    progress: bool = False,
    shard: Shard | None = None,
    batch_size: int | None = 1,
) -> KVSweep:
    """Answer ``trials`` under every condition of :func:`plan_kv_conditions`.

    ``scores``: the retrieval scores of ``model`` (``[layer, head]``), from which the KV heads
    are ranked. Each record's id is ``"<trial id>|<condition tag>"``, its ``condition`` a
    :class:`~retrieval_heads.conditions.KVWindow` (``selection``, ``k`` full KV heads, ``draw``,
    ``sink``, ``window``, ``phase``, ``full_kv_heads``) and its ``params`` add ``kv_share``. With ``out``, records go to a results directory
    (``kind="kv-sim"``; atomic, resumable) and the sweep's records are all of it. With
    ``shard`` (and ``out``) only the shard's share of the (condition, trial) pairs runs,
    condition-major, into ``out/shards/<i>-of-<N>/`` (:mod:`retrieval_heads.sharding`; merge
    them with ``retrieval-heads merge``), and the sweep holds that share. ``batch_size``: the
    trials of one condition and length run together (``None``: from the device's memory), as in
    :func:`~retrieval_heads.scoring.detect`; the records do not change.
    """
    config = config or DecodeConfig()
    trials = list(trials)
    if not trials:
        raise ValueError("no trials given")
    table = analysis.score_table(scores)
    if table.shape != (model.n_layers, model.n_heads):
        raise ValueError(
            f"the scores are {table.shape[0]} x {table.shape[1]} heads but the model has "
            f"{model.n_layers} x {model.n_heads}: detect on this model first"
        )
    kv_scores = kv_head_scores(table, model.n_kv_heads, reduce)
    conditions = plan_kv_conditions(
        kv_scores,
        ks=ks,
        draws=draws,
        seed=seed,
        sink=sink,
        window=window,
        uniform_windows=uniform_windows,
        phase=phase,
    )
    check_lengths(model, trials)
    run_config = {
        "experiment": "kv_sim",
        "reduce": reduce,
        "seed": seed,
        "draws": draws,
        "kv_scores": np.round(kv_scores, 6).tolist(),
        "score_source": getattr(scores, "source", None) or "array",
        "decode": config.__dict__ | {"stop_strings": list(config.stop_strings)},
        "trials": sorted(t.trial_id for t in trials),
        "conditions": [c.to_dict() for c in conditions],
    }
    sweep = KVSweep(conditions, kv_scores)
    units = [  # condition-major: the shards' order
        Unit(f"{t.trial_id}|{c.tag}", t, c) for c in conditions for t in trials
    ]

    def run_batch(units: list[Unit]) -> list[TrialRecord]:
        policy = units[0].condition.policy
        prefill, decode = ([], []) if policy is None else policy.hooks(model)
        trials = [u.item for u in units]
        records = score_batch(model, trials, config, prefill_hooks=prefill, decode_hooks=decode)
        return [
            _kv_record(model, t, units[0].condition, r)
            for t, r in zip(trials, records, strict=True)
        ]

    sweep.records = run_sweep(
        units,
        lambda unit: _run_trial(model, unit.item, unit.condition, config),
        run_batch=None if batch_size == 1 else run_batch,
        batch_key=lambda unit: (unit.condition.tag, len(unit.item.input_ids)),
        batch_size=unit_batch_size(model, batch_size),
        out=out,
        model=model_name(model),
        kind="kv-sim",
        config=run_config,
        seed=seed,
        extra_meta=model_info(model),
        shard=shard,
        progress="kv-sim trials" if progress else False,
    )
    return sweep


def _run_trial(
    model: HookedModel, trial: Trial, condition: KVCondition, config: DecodeConfig
) -> TrialRecord:
    return _kv_record(
        model, trial, condition, score_trial(model, trial, config, intervention=condition.policy)
    )


def _kv_record(
    model: HookedModel, trial: Trial, condition: KVCondition, record: TrialRecord
) -> TrialRecord:
    """A scored trial as a kv-sim record: its condition, and the share of the cache kept."""
    policy = condition.policy
    length = len(trial.input_ids)
    share = (
        1.0
        if policy is None
        else policy.kv_share(model.n_layers, model.n_kv_heads, length, model.layer_windows())
    )
    params = dict(record.params)
    params.update(base_trial_id=trial.trial_id, kv_share=round(share, 6))
    return dataclasses.replace(
        record,
        trial_id=f"{trial.trial_id}|{condition.tag}",
        params=params,
        condition=condition.record_condition(),
    )


# The exports live in kv_export.py; kvcache.export_heads / export_chosen keep working.
from retrieval_heads.kv_export import export_chosen, export_heads  # noqa: E402
