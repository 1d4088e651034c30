"""Which heads an ablation takes: the top-K, seeded random and layer-matched controls, a sweep's plan.

The choices the causal experiments (:mod:`retrieval_heads.causal`, the embedded model's
controls in :mod:`retrieval_heads.tiny.controls`, the chain-of-thought run in
:mod:`retrieval_heads.cot`) ablate, made from a table of head scores alone:

- :func:`top_heads` — the K best-scored heads;
- :func:`random_heads`, :func:`matched_layer_heads` — seeded control selections that never
  contain a retrieval head or a top-K head;
- :class:`Condition`, :func:`clip_ks`, :func:`plan_conditions` — a whole K-sweep's conditions,
  with notes on what was clipped, skipped or fell back.

A *condition* is ``(k, selection, draw)`` with its heads; ``selection`` is ``"top"`` (the K
best-scored heads), ``"random"`` (K heads drawn from the non-retrieval heads, score <=
``threshold``, never one of the top-K), ``"matched_layer"`` (as many heads per layer as the
top-K has, drawn from the non-retrieval heads of those layers), ``"none"`` (K=0, the baseline)
or ``"custom"`` (heads passed by hand). Draws are reproducible from ``(seed, k, draw)`` alone (a
SHA-256-seeded ``random.Random``, :func:`retrieval_heads.seeding.seeded_rng`).

It never runs a model and never imports torch: scores in (a
:class:`~retrieval_heads.scores.HeadScores` or a ``[layer, head]`` array), heads out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxtyping import Float

from retrieval_heads import analysis
from retrieval_heads.heads import Head
from retrieval_heads.scores import HeadScores
from retrieval_heads.seeding import seeded_rng

__all__ = [
    "SELECTIONS",
    "Condition",
    "clip_ks",
    "matched_layer_heads",
    "plan_conditions",
    "random_heads",
    "top_heads",
]

SELECTIONS = ("top", "random", "matched_layer", "none", "custom")
#: A score table: a :class:`HeadScores` or a ``[layer, head]`` array.
Scores = HeadScores | Float[np.ndarray, "layer head"]


# ---------------------------------------------------------------------------------------------
# choosing heads


def _table(scores: Scores) -> Float[np.ndarray, "layer head"]:
    return analysis.score_table(scores)


def _is_retrieval(table: np.ndarray, threshold: float) -> np.ndarray:
    """Retrieval heads: score strictly above ``threshold`` (NaN, no evidence, is not one)."""
    return np.nan_to_num(table, nan=-np.inf) > threshold


def top_heads(scores: Scores, k: int) -> list[Head]:
    """The ``k`` best-scored heads, best first (ties by (layer, head); NaN never chosen).

    ``scores``: a :class:`HeadScores` or a ``[layer, head]`` table. The one top-k helper for
    query heads (``rh.top_heads``; ``HeadScores.top(k)`` is the same for ``stat="mean"``);
    ``kvcache.top_kv_heads`` ranks KV heads.
    """
    return analysis._top_k_heads(scores, k)  # the one implementation


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
    rng = seeded_rng("random_heads", seed, k, draw)
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
    rng = seeded_rng("matched_layer_heads", seed, k, draw)
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
        kinds: list[tuple[str, Callable[..., tuple[list[Head], str | None]]]] = (
            [("random", _draw_random)] if include_random else []
        )
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
