"""Which detector's heads matter: ablate each detector's top-K heads on one model, side by side.

Several detectors rank the same heads differently: the copy score (Wu et al. 2024) and its
variants (``retrieval``, ``topk``, ``attention_mass``), the write score and QRHead's
query-focused score (:func:`retrieval_heads.scoring.detect` with ``scorers=``), and
TransformerLens' pattern scores (:func:`retrieval_heads.detectors.pattern_scores`). This module
asks which ranking points at the heads retrieval needs:

- :func:`detector_tables` — one ``[layer, head]`` table per detector, from detection records
  (and the pattern scores, if given);
- :func:`agreement` — how alike the rankings are: Spearman and top-k Jaccard of every pair;
- :func:`plan_detector_conditions` — the K=0 baseline, every detector's top-K for every K, and
  ``draws`` random controls per K *shared by all detectors*, drawn from the heads in no
  detector's top-K;
- :func:`compare_detectors` — run those conditions over the trials with the one ablation runner
  (:func:`retrieval_heads.causal._execute`, ``kind="compare-detectors"``; resumable);
- :func:`fewest_heads` — per detector, the smallest K that takes accuracy down to a fraction of
  the baseline's.

Records carry a :class:`~retrieval_heads.conditions.HeadAblation` whose selection is
``"top:<detector>"``, ``"random"`` or ``"none"``, so
:func:`retrieval_heads.summaries.summarise_k_sweep` summarises them as any K-sweep. Only
:func:`compare_detectors` needs torch (through the runner), imported when it is called.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float

from retrieval_heads import analysis
from retrieval_heads.heads import Head
from retrieval_heads.records import TrialRecord
from retrieval_heads.scores import HeadScores
from retrieval_heads.seeding import seeded_rng
from retrieval_heads.selection import Condition, clip_ks, top_heads
from retrieval_heads.summaries import KSweepRow

if TYPE_CHECKING:
    from retrieval_heads.model import HookedModel
    from retrieval_heads.scoring import DecodeConfig
    from retrieval_heads.trials.trial import Trial

__all__ = [
    "TOP_PREFIX",
    "agreement",
    "compare_detectors",
    "detector_tables",
    "fewest_heads",
    "plan_detector_conditions",
]

#: A detector's top-K condition is selection ``TOP_PREFIX + name``.
TOP_PREFIX = "top:"

Tables = Mapping[str, Float[np.ndarray, "layer head"]]


def detector_tables(
    records: Iterable[TrialRecord], pattern: Mapping[str, np.ndarray] | None = None
) -> dict[str, Float[np.ndarray, "layer head"]]:
    """One ``[layer, head]`` table per detector: every scorer the scored records all carry.

    Each is the mean over passing trials (:meth:`HeadScores.from_records`), NaN (no passing
    evidence) set to 0 for ranking. ``pattern`` (``{name: table}``, e.g. from
    :func:`~retrieval_heads.detectors.pattern_scores`) is added after them. Raises
    ``ValueError`` when no record has scores or no trial passed, or a pattern table is of
    another shape or name clash.
    """
    scored = [r for r in records if r.scores]
    if not scored:
        raise ValueError("no records with head scores: pass a detection's records")
    if not any(r.passed for r in scored):
        raise ValueError("no trial of the detection passed: its scores rank no head")
    names = [name for name in scored[0].scores if all(name in r.scores for r in scored)]
    tables: dict[str, np.ndarray] = {}
    for name in names:
        mean = HeadScores.from_records(scored, name).as_array()
        tables[name] = np.nan_to_num(mean, nan=0.0)
    shape = next(iter(tables.values())).shape
    for name, table in (pattern or {}).items():
        array = np.asarray(table, dtype=np.float64)
        if name in tables:
            raise ValueError(f"pattern table {name!r} has the name of a scorer of the records")
        if array.shape != shape:
            raise ValueError(f"pattern table {name!r} has shape {array.shape}, the scores {shape}")
        tables[name] = np.nan_to_num(array, nan=0.0)
    return tables


def _shape(tables: Tables) -> tuple[int, int]:
    if not tables:
        raise ValueError("no detector tables given")
    shapes = {np.asarray(t).shape for t in tables.values()}
    if len(shapes) != 1:
        raise ValueError(f"the detector tables differ in shape: {sorted(shapes)}")
    (shape,) = shapes
    if len(shape) != 2:
        raise ValueError(f"a detector table is [layer, head], got shape {shape}")
    return int(shape[0]), int(shape[1])


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def agreement(tables: Tables, ks: Iterable[int] = (5, 10, 20)) -> dict[str, Any]:
    """Spearman and top-k Jaccard for every ordered pair of detectors (JSON-able).

    ``{"detectors": [...], "ks": [...], "spearman": {a: {b: rho}}, "jaccard": {"<k>": {a: {b:
    J}}}}``, with :func:`~retrieval_heads.analysis.spearman` and
    :func:`~retrieval_heads.analysis.jaccard_top_k`; each k is clipped to the head count; an
    undefined Spearman (a constant table) is ``None``.
    """
    layers, heads = _shape(tables)
    names = list(tables)
    clipped = sorted({min(int(k), layers * heads) for k in ks if int(k) > 0})
    spearman = {
        a: {b: _finite(analysis.spearman(tables[a], tables[b])) for b in names} for a in names
    }
    jaccard = {
        str(k): {
            a: {b: float(analysis.jaccard_top_k(tables[a], tables[b], k)) for b in names}
            for a in names
        }
        for k in clipped
    }
    return {"detectors": names, "ks": clipped, "spearman": spearman, "jaccard": jaccard}


def format_agreement(result: Mapping[str, Any]) -> str:
    """The agreement as text: Spearman, then one Jaccard matrix per k."""
    names = result["detectors"]
    width = max(8, *(len(n) for n in names)) + 1

    def matrix(title: str, values: Mapping[str, Mapping[str, float | None]]) -> list[str]:
        lines = [title, " " * width + "".join(f"{n[: width - 1]:>{width}}" for n in names)]
        for a in names:
            cells = "".join(
                f"{'-' if values[a][b] is None else format(values[a][b], '.2f'):>{width}}"
                for b in names
            )
            lines.append(f"{a:<{width}}{cells}")
        return lines

    lines = matrix("Spearman", result["spearman"])
    for k, values in result["jaccard"].items():
        lines += ["", *matrix(f"Jaccard of top-{k}", values)]
    return "\n".join(lines)


def plan_detector_conditions(
    tables: Tables, ks: Iterable[int], *, draws: int, seed: int
) -> list[Condition]:
    """The baseline, each detector's top-K for each K, and ``draws`` shared random controls per K.

    K=0 (the baseline, ``Condition(0, "none", 0, ())``) comes once, first. For each K > 0
    (clipped to the head count, with a warning): ``Condition(K, "top:<name>", 0, heads)`` per
    detector, then ``Condition(K, "random", d, heads)`` for ``d < draws``, drawn with
    ``seeded_rng("detector-controls", seed, K, d)`` from the heads in no detector's top-K (the
    same controls for every detector). When fewer than K such heads remain, all of them are
    taken and the rest drawn from the union's heads that the fewest detectors rank in their
    top-K; the condition's ``note`` says so.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 0:
        raise ValueError(f"draws must be a non-negative integer, got {draws!r}")
    layers, n = _shape(tables)
    clipped, notes = clip_ks(ks, layers * n)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    every = [Head(layer, head) for layer in range(layers) for head in range(n)]
    out = [Condition(0, "none", 0, ())]
    for k in sorted(x for x in clipped if x > 0):
        tops = {name: tuple(sorted(top_heads(table, k))) for name, table in tables.items()}
        out += [Condition(k, TOP_PREFIX + name, 0, heads) for name, heads in tops.items()]
        count = {h: sum(h in heads for heads in tops.values()) for h in every}
        pool = [h for h in every if count[h] == 0]
        for d in range(draws):
            rng = seeded_rng("detector-controls", int(seed), int(k), int(d))
            if len(pool) >= k:
                out.append(Condition(k, "random", d, tuple(sorted(rng.sample(pool, k)))))
                continue
            rest = sorted((h for h in every if count[h] > 0), key=lambda h: (count[h], h))
            fewest = count[rest[k - len(pool) - 1]]
            sure = [h for h in rest if count[h] < fewest]
            tied = [h for h in rest if count[h] == fewest]
            chosen = pool + sure + rng.sample(tied, k - len(pool) - len(sure))
            note = (
                f"only {len(pool)} heads are in no detector's top-{k}; "
                f"{k - len(pool)} drawn from heads in at most {fewest} detectors' top-{k}"
            )
            out.append(Condition(k, "random", d, tuple(sorted(chosen)), note))
    return out


def compare_detectors(
    model: HookedModel,
    trials: Sequence[Trial],
    tables: Tables,
    ks: Iterable[int],
    *,
    draws: int = 3,
    seed: int = 0,
    mode: str = "uniform",
    phase: str = "decode",
    out: str | Path | None = None,
    config: DecodeConfig | None = None,
    progress: bool = False,
    batch_size: int | None = 1,
    n_reference: int = 8,
) -> list[TrialRecord]:
    """Ablate every detector's top-K, and the shared random controls, over ``trials``.

    The conditions of :func:`plan_detector_conditions`, run condition-major by
    :func:`retrieval_heads.causal._execute` into one resumable results directory
    (``kind="compare-detectors"``) whose config records the detectors, ks, draws, seed, mode,
    phase, each detector's top heads at the largest K, every condition and the trials' digest
    (a rerun with another of them is refused). ``mean`` mode averages ``z`` over every
    position of the first ``n_reference`` trials. Returns the records (sorted by id with
    ``out``).
    """
    from retrieval_heads import causal
    from retrieval_heads.ablation_hooks import _check_mode
    from retrieval_heads.scoring import DecodeConfig

    config = config or DecodeConfig()
    _check_mode(mode, phase, model)
    trials = list(trials)
    causal._check_trials(trials)
    shape = _shape(tables)
    if shape != (model.n_layers, model.n_heads):
        raise ValueError(
            f"the detector tables are {shape[0]}x{shape[1]} heads, the model "
            f"{model.n_layers}x{model.n_heads}"
        )
    ks = [int(k) for k in ks]
    conditions = plan_detector_conditions(tables, ks, draws=draws, seed=seed)
    largest = max(c.k for c in conditions)
    extra: dict[str, Any] = {}
    mean_z = None
    if mode == "mean" and largest:
        mean_z, extra = causal._mean_reference(model, trials, None, n_reference)
    run_config = {
        "experiment": "compare_detectors",
        "detectors": list(tables),
        "ks_requested": ks,
        "ks": sorted({c.k for c in conditions}),
        "draws": draws,
        "seed": seed,
        "mode": mode,
        "phase": phase,
        "top_heads": {
            name: [h.dotted for h in top_heads(table, largest)] for name, table in tables.items()
        },
        "decode": causal._decode_dict(config),
        "trials": {"n": len(trials), "sha": causal._trials_digest(trials)},
        "conditions": [c.to_dict() for c in conditions],
        **extra,
    }
    return causal._execute(
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
        kind="compare-detectors",
        batch_size=batch_size,
    )


def fewest_heads(rows: Iterable[KSweepRow], fraction: float = 0.5) -> dict[str, int | None]:
    """Per detector, the smallest K whose accuracy is at most ``fraction`` x the baseline's.

    ``rows``: :func:`~retrieval_heads.summaries.summarise_k_sweep` of a comparison's records.
    Keys are the detectors (selections ``"top:<name>"``) and ``"random"`` (the shared controls,
    mean over draws), each ``None`` when no K measured gets there. With no baseline row, or a
    baseline accuracy of 0 (nothing to break), every value is ``None``.
    """
    rows = list(rows)
    baseline = [r.accuracy for r in rows if r.k == 0 and r.selection == "none"]
    out: dict[str, int | None] = {}
    for row in sorted(rows, key=lambda r: r.k):
        if row.selection.startswith(TOP_PREFIX):
            name = row.selection[len(TOP_PREFIX) :]
        elif row.selection == "random":
            name = "random"
        else:
            continue
        out.setdefault(name, None)
        if baseline and baseline[0] > 0 and out[name] is None and row.k > 0:
            if row.accuracy <= fraction * baseline[0]:
                out[name] = row.k
    if "random" in out:  # the control last
        out["random"] = out.pop("random")
    return out
