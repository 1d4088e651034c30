"""Activation frequency: how often each head copies from the context, over trials.

From the copy events of trial records (or, with ``from_scores``, a retrieval score above 0):
per head the share of trials in which it copied at least once (``activation_frequency``), the
heads that copied in every passing trial (``always_on_heads``), and for the others the contexts
(length, depth, needle) whose trials activated them (``activating_contexts``). Pure functions,
numpy only; importable as before from :mod:`retrieval_heads.analysis`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxtyping import Bool, Float

from retrieval_heads.heads import Head
from retrieval_heads.records import TrialRecord
from retrieval_heads.tables import sort_key

__all__ = [
    "CONTEXT_KEYS",
    "active_trials",
    "activation_frequency",
    "always_on_heads",
    "ContextRow",
    "activating_contexts",
]

CONTEXT_KEYS: dict[str, tuple[str, ...]] = {
    "length": ("context_length", "length"),
    "depth": ("depth_percent", "depth"),
    "needle": ("needle_id", "needle"),
}
"""For each context dimension, the trial ``params`` keys that may hold it (first found wins)."""


def _shape_of(records: Sequence[TrialRecord]) -> tuple[int, int]:
    shapes = {(r.n_layers, r.n_heads) for r in records}
    if len(shapes) != 1:
        raise ValueError(f"records disagree on the model's shape: {sorted(shapes)}")
    return shapes.pop()


def _select(records: Iterable[TrialRecord], passing_only: bool) -> list[TrialRecord]:
    chosen = [r for r in records if r.passed or not passing_only]
    if not chosen:
        raise ValueError("no trials to analyse" + (" (none passed)" if passing_only else ""))
    return chosen


def active_trials(
    records: Iterable[TrialRecord], *, passing_only: bool = True, from_scores: bool = False
) -> tuple[list[TrialRecord], Bool[np.ndarray, "trial layer head"]]:
    """``(trials, active)``: ``active[t, layer, head]`` is True when the head made at least one
    copy event in trial ``t`` (with ``from_scores``: when its retrieval score is above 0)."""
    chosen = _select(records, passing_only)
    n_layers, n_heads = _shape_of(chosen)
    active = np.zeros((len(chosen), n_layers, n_heads), dtype=bool)
    for t, record in enumerate(chosen):
        if from_scores:
            active[t] = record.score_array("retrieval") > 0
        elif record.copy_events:
            events = np.asarray(record.copy_events, dtype=np.int64)
            active[t, events[:, 1], events[:, 2]] = True
    return chosen, active


def activation_frequency(
    records: Iterable[TrialRecord], *, passing_only: bool = True, from_scores: bool = False
) -> Float[np.ndarray, "layer head"]:
    """Per head, the share of trials (passing ones by default) with at least one copy event."""
    _, active = active_trials(records, passing_only=passing_only, from_scores=from_scores)
    return active.mean(axis=0)


def always_on_heads(records: Iterable[TrialRecord], *, from_scores: bool = False) -> list[Head]:
    """Heads that copied in every passing trial, in (layer, head) order."""
    freq = activation_frequency(records, passing_only=True, from_scores=from_scores)
    return [Head(int(layer), int(head)) for layer, head in np.argwhere(freq == 1.0)]


def _context_value(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def _resolve_keys(
    records: Sequence[TrialRecord], keys: Mapping[str, str | Sequence[str]] | None
) -> dict[str, str]:
    wanted = CONTEXT_KEYS if keys is None else keys
    resolved: dict[str, str] = {}
    for name, aliases in wanted.items():
        candidates = (aliases,) if isinstance(aliases, str) else tuple(aliases)
        for alias in candidates:
            if any(alias in r.params for r in records):
                resolved[name] = alias
                break
    return resolved


@dataclass(frozen=True)
class ContextRow:
    """How often ``head`` copied in the trials whose ``params[key] == value``."""

    head: Head
    context: str  # the dimension: "length", "depth", "needle"
    key: str  # the params key it was read from
    value: Any
    n_active: int
    n_trials: int
    frequency: float  # of the head over all the trials analysed

    @property
    def share(self) -> float:
        return self.n_active / self.n_trials if self.n_trials else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "head": self.head.dotted,
            "context": self.context,
            "key": self.key,
            "value": self.value,
            "n_active": self.n_active,
            "n_trials": self.n_trials,
            "share": self.share,
            "frequency": self.frequency,
        }


def activating_contexts(
    records: Iterable[TrialRecord],
    heads: Iterable[Head | str] | None = None,
    *,
    keys: Mapping[str, str | Sequence[str]] | None = None,
    passing_only: bool = True,
    from_scores: bool = False,
) -> list[ContextRow]:
    """Which contexts activate each head that is neither silent nor always on.

    One row per (head, context dimension, value): in how many of the trials with that value
    the head copied. ``keys`` maps a dimension name to the ``params`` key(s) holding it (default
    :data:`CONTEXT_KEYS`; dimensions no record has are skipped). ``heads`` defaults to every head
    active in some but not all trials, most frequent first.
    """
    chosen, active = active_trials(records, passing_only=passing_only, from_scores=from_scores)
    freq = active.mean(axis=0)
    if heads is None:
        flat = freq.ravel()
        order = np.argsort(-flat, kind="stable")
        n_heads = freq.shape[1]
        selected = [Head(int(i // n_heads), int(i % n_heads)) for i in order if 0 < flat[i] < 1.0]
    else:
        selected = [Head.parse(h).check(*freq.shape) for h in heads]
    resolved = _resolve_keys(chosen, keys)
    rows: list[ContextRow] = []
    for name, key in resolved.items():
        groups: dict[Any, list[int]] = defaultdict(list)
        for t, record in enumerate(chosen):
            if key in record.params:
                groups[_context_value(record.params[key])].append(t)
        for value in sorted(groups, key=sort_key):
            idx = np.asarray(groups[value])
            sub = active[idx]
            for h in selected:
                rows.append(
                    ContextRow(
                        head=h,
                        context=name,
                        key=key,
                        value=value,
                        n_active=int(sub[:, h.layer, h.head].sum()),
                        n_trials=len(idx),
                        frequency=float(freq[h.layer, h.head]),
                    )
                )
    head_rank = {h: i for i, h in enumerate(selected)}
    dim_rank = {name: i for i, name in enumerate(resolved)}
    rows.sort(key=lambda r: (head_rank[r.head], dim_rank[r.context]))  # stable: values stay sorted
    return rows
