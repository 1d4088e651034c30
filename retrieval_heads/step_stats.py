"""A decode run's attention rows reduced to per-head scores, step by step, in O(context) memory.

:class:`_StepStats` keeps, for every decode step, each head's argmax key, its top-k mass and
its mass on the answer span, from the rows one step hands over (the lean step's sink or the
bridge's ``hook_pattern``); :func:`copy_events` and :func:`retrieval_score` turn the argmaxes
into the paper's copy events and score; :func:`_scores` gives every scorer's table of one
answer. :mod:`retrieval_heads.scoring` (one trial) and :mod:`retrieval_heads.batched` (a batch,
one ``_StepStats`` per trial) decode; this module never runs a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["SCORERS", "copy_events", "retrieval_score"]

SCORERS = ("retrieval", "topk", "attention_mass")


@dataclass
class _StepStats:
    """Per-step reductions of every layer's attention row for the current query.

    Rows arrive layer by layer (``add``, or the ``hook_pattern`` hook of ``hook``) and are
    reduced together when the step ends (``flush``; ``new_step`` and ``_scores`` call it): rows
    of one length are stacked into one ``[layer, head, key]`` tensor, so a step costs a handful
    of tensor operations rather than a handful per layer.

    ``first_query`` is the absolute position of the first step's query (``None``: each row
    spans the whole context). A sliding-window layer's row covers only the last ``key``
    positions (its KV cache holds no more), so its indices are shifted to absolute positions.
    """

    n_layers: int
    n_heads: int
    span: tuple[int, int]
    first_query: int | None = None
    argmax: list[Int[Tensor, "layer head"]] = field(default_factory=list)
    topk_mass: list[Float[Tensor, "layer head"]] = field(default_factory=list)
    span_mass: list[Float[Tensor, "layer head"]] = field(default_factory=list)
    _pending: list[tuple[int, Float[Tensor, "head key"]]] = field(default_factory=list)

    def new_step(self, device: torch.device) -> None:
        self.flush()
        shape = (self.n_layers, self.n_heads)
        self.argmax.append(torch.full(shape, -1, dtype=torch.long, device=device))
        self.topk_mass.append(torch.zeros(shape, device=device))
        self.span_mass.append(torch.zeros(shape, device=device))

    def add(self, layer: int, row: Float[Tensor, "head key"]) -> None:
        """Keep one layer's row of the current step (a ``step_rows`` sink forwards here)."""
        self._pending.append((layer, row))

    def hook(self, layer: int) -> Callable:
        """A ``hook_pattern`` hook feeding ``add`` from the bridge."""

        def take_row(pattern: Float[Tensor, "batch head query key"], hook: Any) -> None:
            # [head, key]: the current query's attention, copied as it is now (a later hook
            # may change the pattern in place; the row is reduced when the step ends).
            self.add(layer, pattern[0, :, -1, :].clone())

        return take_row

    def flush(self) -> None:
        """Reduce the rows kept for the current step into its tables."""
        if not self._pending:
            return
        start, end = self.span
        k = end - start
        step = len(self.argmax) - 1
        table = self.argmax[-1].device
        by_length: dict[tuple[int, torch.device], list[tuple[int, Tensor]]] = {}
        for layer, row in self._pending:
            by_length.setdefault((row.shape[-1], row.device), []).append((layer, row))
        self._pending = []
        for (n_keys, _), group in by_length.items():
            layers = [layer for layer, _ in group]
            rows = torch.stack([row for _, row in group]).float()  # [layer, head, key]
            # Absolute position of key 0: the query sees keys up to itself.
            offset = 0 if self.first_query is None else self.first_query + step + 1 - n_keys
            lo, hi = min(max(start - offset, 0), n_keys), min(max(end - offset, 0), n_keys)
            values, index = rows.topk(min(k, n_keys), dim=-1)  # [layer, head, k]
            inside = (index >= start - offset) & (index < end - offset)
            # The tables live on the embedding's device; with a device map a layer may be on
            # another GPU, so its results are gathered there (a few bytes per layer).
            self.argmax[-1][layers] = (rows.argmax(dim=-1) + offset).to(table)
            self.span_mass[-1][layers] = rows[..., lo:hi].sum(dim=-1).to(table)
            self.topk_mass[-1][layers] = (values * inside).sum(dim=-1).to(table)


@dataclass
class _BatchStepStats:
    """:class:`_StepStats` for a batch of trials of one length, reduced for every row at once.

    Rows arrive as ``[batch, head, key]`` per layer and are reduced when the step ends: one
    argmax and one top-k per group of rows with the same answer length, one span sum per row,
    instead of a handful of operations per trial (on a GPU each is a kernel launch). Every row is
    reduced at every step, stopped or not (rows of a batch never interact, so a stopped row's
    numbers are simply not taken); :meth:`trial` gives a row's first ``n_steps`` steps as the
    :class:`_StepStats` one trial would have kept. The reductions are the single-trial ones on
    each row's slice, so the numbers are the same.
    """

    n_layers: int
    n_heads: int
    spans: list[tuple[int, int]]
    first_query: int | None = None
    argmax: list[Int[Tensor, "batch layer head"]] = field(default_factory=list)
    topk_mass: list[Float[Tensor, "batch layer head"]] = field(default_factory=list)
    span_mass: list[Float[Tensor, "batch layer head"]] = field(default_factory=list)
    _pending: list[tuple[int, Float[Tensor, "batch head key"]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # the rows by answer length: one top-k for each length (a top-k of another k could
        # order tied keys otherwise than the trial alone does)
        self._by_k: dict[int, list[int]] = {}
        for b, (start, end) in enumerate(self.spans):
            self._by_k.setdefault(end - start, []).append(b)

    def new_step(self, device: torch.device) -> None:
        self.flush()
        shape = (len(self.spans), self.n_layers, self.n_heads)
        self.argmax.append(torch.full(shape, -1, dtype=torch.long, device=device))
        self.topk_mass.append(torch.zeros(shape, device=device))
        self.span_mass.append(torch.zeros(shape, device=device))

    def add(self, layer: int, rows: Float[Tensor, "batch head key"]) -> None:
        """Keep one layer's rows of the current step."""
        self._pending.append((layer, rows))

    def flush(self) -> None:
        """Reduce the rows kept for the current step into its tables."""
        if not self._pending:
            return
        step = len(self.argmax) - 1
        table = self.argmax[-1].device
        by_length: dict[tuple[int, torch.device], list[tuple[int, Tensor]]] = {}
        for layer, rows in self._pending:
            by_length.setdefault((rows.shape[-1], rows.device), []).append((layer, rows))
        self._pending = []
        for (n_keys, device), group in by_length.items():
            layers = torch.tensor([layer for layer, _ in group], device=table)
            rows = torch.stack([r for _, r in group]).float()  # [layer, batch, head, key]
            offset = 0 if self.first_query is None else self.first_query + step + 1 - n_keys
            argmax = (rows.argmax(dim=-1) + offset).transpose(0, 1)  # [batch, layer, head]
            self.argmax[-1][:, layers] = argmax.to(table)
            for k, members in self._by_k.items():
                index_b = torch.tensor(members, device=device)
                values, index = rows.index_select(1, index_b).topk(min(k, n_keys), dim=-1)
                starts = torch.tensor([self.spans[b][0] - offset for b in members], device=device)
                starts = starts[None, :, None, None]  # [1, members, 1, 1]
                inside = (index >= starts) & (index < starts + k)
                mass = (values * inside).sum(dim=-1).transpose(0, 1)  # [members, layer, head]
                self.topk_mass[-1][index_b.to(table)[:, None], layers] = mass.to(table)
            for b, (start, end) in enumerate(self.spans):
                lo, hi = min(max(start - offset, 0), n_keys), min(max(end - offset, 0), n_keys)
                self.span_mass[-1][b, layers] = rows[:, b, :, lo:hi].sum(dim=-1).to(table)

    def trial(self, b: int, n_steps: int) -> _StepStats:
        """Row ``b``'s first ``n_steps`` steps, as one trial's :class:`_StepStats`."""
        self.flush()
        return _StepStats(
            self.n_layers,
            self.n_heads,
            self.spans[b],
            self.first_query,
            argmax=[t[b] for t in self.argmax[:n_steps]],
            topk_mass=[t[b] for t in self.topk_mass[:n_steps]],
            span_mass=[t[b] for t in self.span_mass[:n_steps]],
        )


def copy_events(
    argmax: Int[Tensor, "step layer head"],
    generated: Int[Tensor, " step"],
    context: Int[Tensor, " pos"],
    span: tuple[int, int],
) -> Bool[Tensor, "step layer head"]:
    """Where a head's argmax lands in ``span`` on a token equal to the one generated at that step."""
    start, end = span
    in_span = (argmax >= start) & (argmax < end)
    attended_token = context[argmax.clamp(0, context.shape[0] - 1)]  # [step, layer, head]
    return in_span & (attended_token == generated[:, None, None])


def retrieval_score(
    argmax: Int[Tensor, "step layer head"],
    events: Bool[Tensor, "step layer head"],
    span: tuple[int, int],
    count_repeats: bool = False,
) -> Float[Tensor, "layer head"]:
    """Distinct answer positions copied / span length (or all events / span length)."""
    start, end = span
    length = end - start
    if count_repeats:
        return events.sum(dim=0).float() / length
    offset = (argmax - start).clamp(0, length - 1)
    copied = torch.nn.functional.one_hot(offset, length).bool() & events[..., None]
    return copied.any(dim=0).sum(dim=-1).float() / length  # [layer, head]


def _scores(
    stats: _StepStats,
    generated: list[int],
    ids: Int[Tensor, " pos"],
    span: tuple[int, int],
    count_repeats: bool = False,
) -> tuple[dict[str, list[list[float]]], list[tuple[int, int, int, int]]]:
    """Every scorer's ``[layer][head]`` table and the copy events of one decoded answer."""
    stats.flush()
    shape = (stats.n_layers, stats.n_heads)
    if not generated:
        zeros = torch.zeros(shape).tolist()
        return {name: zeros for name in SCORERS}, []
    argmax = torch.stack(stats.argmax).cpu()  # [step, layer, head]
    out = torch.tensor(generated, dtype=torch.long)  # [step]
    events = copy_events(argmax, out, ids.cpu(), span)
    scores = {
        "retrieval": retrieval_score(argmax, events, span, count_repeats),
        "topk": torch.stack(stats.topk_mass).mean(dim=0).cpu(),
        "attention_mass": torch.stack(stats.span_mass).mean(dim=0).cpu(),
    }
    where = events.nonzero().tolist()  # [[step, layer, head], ...]
    event_list = [(s, layer, h, int(argmax[s, layer, h])) for s, layer, h in where]
    return {name: value.tolist() for name, value in scores.items()}, event_list
