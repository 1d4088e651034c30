"""The arithmetic of score tables behind :class:`~retrieval_heads.scores.HeadScores`: plain
arrays in, arrays out (numpy only).

- ``head_statistics``: per head of a ``[trial, layer, head]`` array, each a ``[layer, head]``
  array: over passing trials the mean (the paper's retrieval score), the sample std (ddof=1)
  and n; a percentile bootstrap CI of that mean, resampling *trials* (the same resample for
  every head) from a generator seeded with ``seed``; the mean and n over all trials. NaN marks
  "no score" and is left out; heads not ``present`` get NaN. Deterministic to the bit: sums
  over trials use numpy's pairwise summation (a head's mean equals ``np.mean`` of its list).
- ``group_kv_heads``: a ``[layer, head]`` query-head table to ``[layer, kv_head]`` (GQA), the
  one place an unscored head's meaning for its group is decided (``nan=``).

``group_kv_heads`` is importable from :mod:`retrieval_heads.scores` as before.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from jaxtyping import Float

__all__ = ["head_statistics", "group_kv_heads", "KVReduce", "NaNPolicy"]

KVReduce = Literal["max", "mean"]
NaNPolicy = Literal["ignore", "zero"]


def head_statistics(
    values: Float[np.ndarray, "trial layer head"],
    passed: np.ndarray,  # [trial] bool
    present: np.ndarray,  # [trial, layer, head] bool
    *,
    n_resamples: int,
    seed: int,
    confidence: float,
) -> dict[str, np.ndarray]:
    """``mean``, ``std``, ``n``, ``ci_low``, ``ci_high``, ``mean_all``, ``n_all`` of ``values``
    (``[trial, layer, head]``; ``passed`` one bool per trial, ``present`` ``[layer, head]``)."""
    passing = values[passed]
    valid = ~np.isnan(passing)
    filled = np.where(valid, passing, 0.0)
    n = valid.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = _sum_trials(filled) / n
        dev = np.where(valid, passing - mean, 0.0)
        std = np.sqrt(_sum_trials(dev**2) / (n - 1))
    mean = np.where(n > 0, mean, np.nan)
    std = np.where(n > 1, std, np.nan)
    valid_all = ~np.isnan(values)
    n_all = valid_all.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_all = _sum_trials(np.where(valid_all, values, 0.0)) / n_all
    mean_all = np.where(n_all > 0, mean_all, np.nan)
    lo, hi = _bootstrap(filled, valid, n_resamples=n_resamples, seed=seed, confidence=confidence)
    absent = ~present
    for arr in (mean, std, lo, hi, mean_all):
        arr[absent] = np.nan
    return {
        "mean": mean,
        "std": std,
        "n": n.astype(np.int64),
        "ci_low": lo,
        "ci_high": hi,
        "mean_all": mean_all,
        "n_all": n_all.astype(np.int64),
    }


def _bootstrap(
    filled: np.ndarray, valid: np.ndarray, *, n_resamples: int, seed: int, confidence: float
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap of the mean, vectorised: resample weights @ scores."""
    n_trials = filled.shape[0]
    shape = filled.shape[1:]
    if n_trials == 0:
        return np.full(shape, np.nan), np.full(shape, np.nan)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_trials, np.full(n_trials, 1.0 / n_trials), size=n_resamples).astype(
        np.float64
    )
    flat = filled.reshape(n_trials, -1)
    counts = weights @ valid.reshape(n_trials, -1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (weights @ flat) / counts
    alpha = (1.0 - confidence) / 2.0
    if np.isnan(means).any():
        with np.errstate(invalid="ignore"), _quiet_nan_warnings():
            lo, hi = np.nanquantile(means, [alpha, 1.0 - alpha], axis=0)
    else:
        lo, hi = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
    return lo.reshape(shape), hi.reshape(shape)


def _sum_trials(table: np.ndarray) -> np.ndarray:
    """Sum ``[trial, layer, head]`` over trials with numpy's pairwise summation (it applies only
    along a contiguous axis), so a head's mean equals ``np.mean`` of its list bit for bit."""
    n_trials = table.shape[0]
    # An explicit width: reshape(0, -1) is ambiguous (no passing trial at all).
    flat = np.ascontiguousarray(table.reshape(n_trials, math.prod(table.shape[1:])).T)
    return flat.sum(axis=1).reshape(table.shape[1:])


def group_kv_heads(
    table: Float[np.ndarray, "layer head"],
    n_kv_heads: int,
    reduce: KVReduce = "max",
    *,
    nan: NaNPolicy = "ignore",
) -> Float[np.ndarray, "layer kv_head"]:
    """Aggregate a ``[layer, head]`` query-head table to ``[layer, kv_head]`` (GQA).

    Query head ``h`` reads kv head ``h // (n_heads // n_kv_heads)``; ``reduce`` (``"max"`` or
    ``"mean"``) combines each group. The one place NaN (an unscored head) is handled, by
    ``nan``: ``"ignore"`` leaves unscored heads out of their group (NaN only where a whole group
    is unscored; :meth:`HeadScores.kv_heads`), ``"zero"`` counts them as score 0 (never NaN;
    :func:`retrieval_heads.kvcache.kv_head_scores`, which ranks KV heads).
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"unknown reduction {reduce!r}: use one of max, mean")
    if nan not in ("ignore", "zero"):
        raise ValueError(f"unknown NaN policy {nan!r}: use 'ignore' or 'zero'")
    table = np.asarray(table, dtype=np.float64)
    n_layers, n_heads = table.shape
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(
            f"{n_heads} query heads do not split over {n_kv_heads} KV heads "
            f"(n_kv_heads={n_kv_heads} must divide the number of query heads)"
        )
    grouped = table.reshape(n_layers, n_kv_heads, n_heads // n_kv_heads)
    if nan == "zero":
        grouped = np.nan_to_num(grouped, nan=0.0)
        return grouped.max(axis=-1) if reduce == "max" else grouped.mean(axis=-1)
    with _quiet_nan_warnings():
        return np.nanmax(grouped, axis=-1) if reduce == "max" else np.nanmean(grouped, axis=-1)


class _quiet_nan_warnings:
    """Silence numpy's all-NaN-slice RuntimeWarnings inside a block."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)
