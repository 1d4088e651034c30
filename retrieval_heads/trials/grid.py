"""Grids of trials: every length x depth x needle, with distractors drawn once per needle.

Owns :func:`make_grid`, the evenly spaced :func:`linspace_lengths` / :func:`linspace_depths`, and
:func:`default_lengths`, the lengths a grid gets when none are given (fit to the context).
It builds each trial through :func:`~retrieval_heads.trials.builder.build_trial`, never itself,
and knows no model or synthetic world (:func:`retrieval_heads.trials.make_trials` picks those).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from retrieval_heads.seeding import seeded_rng
from retrieval_heads.trials.base import TrialError
from retrieval_heads.trials.builder import DEFAULT_MAX_OFFSET, _as_set, build_trial
from retrieval_heads.trials.haystacks import Haystack
from retrieval_heads.trials.needles import Needle, NeedleSet
from retrieval_heads.trials.template import PromptTemplate
from retrieval_heads.trials.trial import Trial

__all__ = ["default_lengths", "linspace_depths", "linspace_lengths", "make_grid"]


def linspace_lengths(min_length: int, max_length: int, n: int) -> list[int]:
    """``n`` evenly spaced lengths from ``min_length`` to ``max_length``, rounded, duplicates
    dropped (so fewer than ``n`` when the range is narrow)."""
    if n < 1 or min_length < 1 or max_length < min_length:
        raise TrialError(
            f"linspace_lengths needs 1 <= min <= max and n >= 1, got "
            f"({min_length}, {max_length}, {n})"
        )
    if n == 1:
        return [int(min_length)]
    values = [round(min_length + (max_length - min_length) * i / (n - 1)) for i in range(n)]
    return list(dict.fromkeys(int(v) for v in values))


def linspace_depths(n: int) -> list[float]:
    """``n`` evenly spaced depths from 0 to 100 percent (``[0.0]`` for ``n == 1``)."""
    if n < 1:
        raise TrialError(f"linspace_depths needs n >= 1, got {n}")
    if n == 1:
        return [0.0]
    return [100.0 * i / (n - 1) for i in range(n)]


def default_lengths(
    n_ctx: int,
    n: int = 3,
    *,
    room: int | None = None,
    shortest: int = 5,
    floor: bool = False,
    cap: int | None = None,
    min_length: int | None = None,
    max_length: int | None = None,
) -> list[int]:
    """The lengths of a grid for a model with ``n_ctx`` tokens of context, when none are given:
    ``n`` of them, evenly spaced (:func:`linspace_lengths`) from the shortest to the longest.

    - the longest: ``max_length``, else the context (at most ``cap`` tokens) less ``room``
      tokens left for the answer; ``room=None``: 6 for a context of at most 512 tokens, else 24;
    - the shortest: ``min_length``, else the longest divided by ``shortest``, rounded (or
      floored, ``floor=True``), and at least 64.

    The defaults are the experiment scripts' grid (tiny: 200, 600, 1000; tiny-short: 64, 157,
    250); the command line asks for ``n=--n-lengths, room=32, shortest=8, floor=True,
    cap=32768`` with its ``--min-length`` / ``--max-length``.
    """
    if room is None:
        room = 6 if n_ctx <= 512 else 24
    high = max_length or min(n_ctx, n_ctx if cap is None else cap) - room
    low = min_length or max(64, high // shortest if floor else round(high / shortest))
    return linspace_lengths(low, high, n)


def make_grid(
    tokenizer: Any,
    haystack: Haystack,
    needles: Sequence[Needle | NeedleSet],
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    n_distractors: int = 0,
    distractor_pool: Sequence[Needle] | None = None,
    seed: int = 0,
    template: PromptTemplate | None = None,
    n_ctx: int | None = None,
    max_offset: int = DEFAULT_MAX_OFFSET,
) -> list[Trial]:
    """Trials for every length × depth × needle, in that nesting order (needle innermost).

    Items without their own distractors get ``n_distractors`` other needles as distractors, from
    ``distractor_pool`` (default: the needles of the grid), seeded per needle, so the same ones
    at every length and depth, skipping needles that share the target's question or answer. Repeated lengths, depths or needle ids are an
    error, since they would give repeated trial ids.
    """
    items = [_as_set(n) for n in needles]
    if not items:
        raise TrialError("make_grid needs at least one needle")
    for label, values in (("lengths", list(lengths)), ("depths", [float(d) for d in depths])):
        if not values:
            raise TrialError(f"make_grid needs at least one of {label}")
        if len(set(values)) != len(values):
            raise TrialError(f"make_grid: repeated {label} {values}")
    keys = [tuple(n.needle_id for n in s.targets) for s in items]
    if len(set(keys)) != len(keys):
        raise TrialError(f"make_grid: repeated needles {keys}")
    pool = [n for s in items for n in s.targets]
    if distractor_pool is not None:
        pool = list(distractor_pool) + pool

    resolved: list[NeedleSet] = []
    for key, item in zip(keys, items, strict=True):
        if item.distractors or n_distractors == 0:
            resolved.append(item)
            continue
        taken_q = {n.question for n in item.targets}
        taken_a = {n.answer for n in item.targets}
        candidates = [n for n in pool if n.question not in taken_q and n.answer not in taken_a]
        candidates = list({n.needle_id: n for n in candidates}.values())
        if len(candidates) < n_distractors:
            raise TrialError(
                f"make_grid: needle {item.targets[0].needle_id!r} needs {n_distractors} "
                f"distractors but only {len(candidates)} other needles can serve"
            )
        chosen = seeded_rng("distractors", seed, key).sample(candidates, n_distractors)
        resolved.append(
            NeedleSet(
                item.targets,
                tuple(chosen),
                item.question,
                "multikey" if item.kind == "single" else item.kind,
            )
        )

    trials = []
    for length in lengths:
        for depth in depths:
            for item in resolved:
                trials.append(
                    build_trial(
                        tokenizer,
                        haystack,
                        item,
                        length=int(length),
                        depth_percent=float(depth),
                        template=template,
                        seed=seed,
                        n_ctx=n_ctx,
                        max_offset=max_offset,
                    )
                )
    return trials
