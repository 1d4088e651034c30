"""Hooks that edit chosen attention heads: the building blocks of every head intervention.

Each builder here returns ``(hook_name, fn)`` pairs, or one ``fn``, that
``HookedModel.prefill(ids, fwd_hooks=...)`` and ``HookedModel.step(state, tok, fwd_hooks=...)``
accept. A hook edits all the selected heads of one layer at once through an index tensor
(:class:`_Index`): it zeroes them (``hook_q`` or ``hook_z``), replaces their ``z`` by fixed
values or by a recorded run's, blocks their attention to chosen keys, or gives them a windowed
view of the cache. What to edit is the caller's choice: the ablation modes of
:mod:`retrieval_heads.ablation`, the KV-window policy of :mod:`retrieval_heads.kvcache`.

Also here: parsing and grouping head labels (:func:`kv_group` expands kv heads to the query
heads that read them), token ids as a batch, the ``Phase`` names, and :func:`first_key` (the
absolute position of key 0 of the scores now running).

Windowed attention (KV-cache compression, simulated)
----------------------------------------------------
:func:`window_hooks` keeps, for each chosen query head, only the first ``sink`` keys (attention
sinks) and the last ``window`` keys up to and including the query's own position; the other
keys' scores are set to ``-inf`` at ``hook_attn_scores``, so the softmax renormalises over the
kept ones, exactly as if their keys and values had been evicted from the cache. Which heads
keep the whole context is the caller's choice (:mod:`retrieval_heads.kvcache`).

It never decides which heads to touch, and records nothing (:mod:`retrieval_heads.head_z`
records ``z``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from retrieval_heads.heads import Head, parse_heads

if TYPE_CHECKING:
    from retrieval_heads.model import HookedModel

__all__ = ["PHASES", "Phase", "first_key", "kv_group", "window_hooks", "window_mask"]

Phase = Literal["decode", "all"]
PHASES: tuple[Phase, ...] = ("decode", "all")

HeadLabels = Iterable[Head | str | tuple[int, int]] | str
Hooks = list[tuple[str, Callable[..., Any]]]


def _parse(heads: HeadLabels) -> list[Head]:
    """Parse head labels, drop duplicates, sort layer-major."""
    return sorted(set(parse_heads(heads if isinstance(heads, str) else list(heads))))


def _by_layer(heads: Iterable[Head]) -> dict[int, list[int]]:
    """``{layer: sorted head indices}`` for the layers that have selected heads."""
    out: dict[int, list[int]] = {}
    for h in sorted(set(heads)):
        out.setdefault(h.layer, []).append(h.head)
    return out


class _Index:
    """A head-index tensor per device, built on first use (device_map models span devices)."""

    def __init__(self, values: Sequence[int]) -> None:
        self.values = list(values)
        self._on: dict[torch.device, Tensor] = {}

    def on(self, device: torch.device) -> Tensor:
        if device not in self._on:
            self._on[device] = torch.tensor(self.values, dtype=torch.long, device=device)
        return self._on[device]


def kv_group(model: HookedModel, heads: HeadLabels) -> list[Head]:
    """Expand a selection of *kv* heads to the query heads that read them.

    ``Head(layer, kv)`` here names kv head ``kv`` (range-checked against ``n_kv_heads``);
    the result lists every query head ``h`` of that layer with ``model.kv_head_of(h) == kv``
    (sorted). Without grouped-query attention this is the identity.
    """
    g = model.group_size
    out: set[Head] = set()
    for kv in _parse(heads):
        if not (0 <= kv.layer < model.n_layers and 0 <= kv.head < model.n_kv_heads):
            raise ValueError(
                f"kv head {kv} is out of range: the model has layers 0-{model.n_layers - 1} "
                f"and kv heads 0-{model.n_kv_heads - 1} per layer"
            )
        out.update(Head(kv.layer, q) for q in range(kv.head * g, (kv.head + 1) * g))
    return sorted(out)


def _as_batch(
    ids: Int[Tensor, "batch pos"] | Sequence[int] | Sequence[Sequence[int]], model: HookedModel
) -> Tensor:
    ids = torch.as_tensor(ids, device=model.device)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.is_floating_point():
        raise ValueError(f"expected integer token ids [batch, pos], got {tuple(ids.shape)}")
    return ids


def _labels(heads: Iterable[Head]) -> str:
    labels = [h.dotted for h in heads]
    return ", ".join(labels[:12]) + (f", ... ({len(labels)} heads)" if len(labels) > 12 else "")


# The hook functions: each edits the selected heads (axis 2 of [batch, pos, head, d] for
# hook_q/hook_z, axis 1 of [batch, head, q, k] for scores/pattern) and returns a new tensor.


def _zero_heads_hook(idx: _Index):
    def hook(act: Tensor, hook: Any) -> Tensor:
        return act.index_fill(2, idx.on(act.device), 0.0)

    return hook


def _mean_hook(idx: _Index, values: Tensor):
    def hook(z: Tensor, hook: Any) -> Tensor:
        z = z.clone()
        z[:, :, idx.on(z.device)] = values.to(z.device, z.dtype)
        return z

    return hook


def _check_batch(source: Tensor, z: Tensor) -> None:
    if source.shape[0] not in (1, z.shape[0]):
        raise ValueError(
            f"the resample recording has batch {source.shape[0]}, the run {z.shape[0]}: record "
            "one sequence (it is broadcast) or as many as you run"
        )


def _replay_prefill_hook(model: HookedModel, idx: _Index, source: Tensor):
    def hook(z: Tensor, hook: Any) -> Tensor:
        start, n = model.position_offset, z.shape[1]
        if start + n > source.shape[1]:
            raise ValueError(
                f"the resample recording covers {source.shape[1]} prompt positions, this prompt "
                f"reaches {start + n}: prefill replay needs prompts of equal length"
            )
        _check_batch(source, z)
        z = z.clone()
        z[:, :, idx.on(z.device)] = source[:, start : start + n].to(z.device, z.dtype)
        return z

    return hook


def _replay_decode_hook(model: HookedModel, idx: _Index, source: Tensor):
    clock: dict[str, Any] = {"position": None, "step": -1}

    def hook(z: Tensor, hook: Any) -> Tensor:
        if z.shape[1] != 1:
            raise RuntimeError("decode hooks are for model.step; use prefill_hooks for prefill")
        position = model.position_offset
        if clock["position"] is not None and position != clock["position"] + 1:
            raise RuntimeError(
                "resample decode hooks replay one run step by step, but this step is at position "
                f"{position} after {clock['position']}: build new hooks with "
                "decode_hooks(model) for each run"
            )
        clock["position"], clock["step"] = position, clock["step"] + 1
        step = clock["step"]
        if step >= source.shape[1]:
            raise ValueError(
                f"the resample recording has {source.shape[1]} decode steps and this is step "
                f"{step}: record at least as many steps as you decode"
            )
        _check_batch(source, z)
        z = z.clone()
        z[:, :, idx.on(z.device)] = source[:, step : step + 1].to(z.device, z.dtype)
        return z

    return hook


def _blocked_mask(rows: Sequence[Sequence[int]]) -> Bool[Tensor, "row position"]:
    """``True`` at each row's blocked absolute positions (columns ``0 .. max position``)."""
    width = 1 + max((max(row) for row in rows if row), default=-1)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        mask[r, list(row)] = True
    return mask


def _knockout_hook(model: HookedModel, idx: _Index, blocked: Bool[Tensor, "row position"]):
    """Block key positions: batch row ``r`` the positions ``blocked[r]`` marks, every row the
    same ones when ``blocked`` has one row (see :func:`_blocked_mask`)."""

    def hook(scores: Float[Tensor, "batch head query key"], hook: Any) -> Tensor | None:
        if blocked.shape[0] not in (1, scores.shape[0]):
            raise ValueError(
                f"the knockout blocks positions for {blocked.shape[0]} rows, the run has "
                f"{scores.shape[0]}: give one row of positions (every row) or one per row"
            )
        n_keys, start = scores.shape[-1], first_key(model, scores)  # key j: position start + j
        seen = blocked[:, start : start + n_keys]  # [row, visible blocked keys]
        if not seen.any():
            return None
        mask = torch.zeros(blocked.shape[0], n_keys, dtype=torch.bool)
        mask[:, : seen.shape[1]] = seen
        heads = idx.on(scores.device)
        sub = scores.index_select(1, heads)  # [batch, k, query, key]
        # The causal mask is finfo.min, not -inf: make it -inf so a row whose visible keys are
        # all blocked is all -inf (NaN after softmax, zeroed by _empty_rows_hook) instead of
        # spreading its attention over future keys.
        sub = sub.masked_fill(sub <= torch.finfo(sub.dtype).min / 2, -math.inf)
        sub = sub.masked_fill(mask.to(sub.device)[:, None, None, :], -math.inf)
        return scores.index_copy(1, heads, sub)

    return hook


def _empty_rows_hook(idx: _Index):
    def hook(pattern: Tensor, hook: Any) -> Tensor:
        heads = idx.on(pattern.device)
        return pattern.index_copy(1, heads, pattern.index_select(1, heads).nan_to_num(nan=0.0))

    return hook


# --------------------------------------------------------------------------------------------
# Windowed attention (simulated KV-cache eviction)


def window_mask(
    n_queries: int,
    n_keys: int,
    sink: int,
    window: int,
    device: torch.device | str = "cpu",
    first_key: int = 0,
) -> Bool[Tensor, "query key"]:
    """Which keys a windowed head still sees: ``True`` for the first ``sink`` positions and the
    last ``window`` positions up to each query's own.

    The queries are the last ``n_queries`` of ``n_keys`` keys, and key ``j`` sits at absolute
    position ``first_key + j``: 0 for a cache that holds the whole context (a decode step is
    then query ``n_keys - 1``; a prefill chunk continues a cache that starts at 0), more for a
    sliding-window layer's cache, which keeps only its last keys (see :func:`first_key`).
    Query ``q`` keeps key ``k`` when ``k < sink`` or ``q - window < k <= q`` (absolute
    positions). Keys after ``q`` are left to the causal mask. ``window >= 1`` keeps the
    query's own key, so no row is ever empty.
    """
    if sink < 0 or window < 1:
        raise ValueError(f"need sink >= 0 and window >= 1, got sink={sink}, window={window}")
    if n_queries > n_keys:
        raise ValueError(f"{n_queries} queries cannot follow {n_keys} keys")
    keys = first_key + torch.arange(n_keys, device=device)[None, :]  # [1, key]
    queries = keys[:, n_keys - n_queries :].T  # [query, 1]
    return (keys < sink) | (keys > queries - window)


def first_key(model: HookedModel, scores: Tensor) -> int:
    """The absolute position of key 0 of an attention-scores (or pattern) tensor
    ``[..., query, key]`` of the forward pass now running.

    The queries end at ``model.position_offset + n_queries - 1`` and the keys end there too, so
    key 0 is ``that + 1 - n_keys``: 0 when the layer's cache holds the whole context, the
    number of dropped keys for a sliding-window layer (Gemma 2/3: its cache keeps only the
    last ``sliding_window`` keys, and a row's index is not a position)."""
    return model.position_offset + scores.shape[-2] - scores.shape[-1]


def window_hooks(model: HookedModel, heads: HeadLabels, sink: int, window: int) -> Hooks:
    """Hooks that give each of ``heads`` (query heads) a sink + recent-window view of the cache.

    One ``hook_attn_scores`` hook per layer with a chosen head; every other head's scores pass
    through untouched (the hook rewrites only the chosen heads' slice). Works for prefill
    chunks and decode steps alike (see :func:`window_mask`).
    """
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ValueError(f"sink must be an integer >= 0 (tokens kept at the start), got {sink!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (recent tokens kept), got {window!r}")
    selected = _parse(heads)
    for h in selected:
        h.check(model.n_layers, model.n_heads)
    return [
        (model.hook_name(layer, "attn_scores"), _window_hook(model, _Index(hs), sink, window))
        for layer, hs in _by_layer(selected).items()
    ]


def _window_hook(model: HookedModel, idx: _Index, sink: int, window: int):
    def hook(scores: Float[Tensor, "batch head query key"], hook: Any) -> Tensor:
        n_queries, n_keys = scores.shape[-2], scores.shape[-1]
        start = first_key(model, scores)
        keep = window_mask(n_queries, n_keys, sink, window, scores.device, start)
        heads = idx.on(scores.device)
        sub = scores.index_select(1, heads).masked_fill(~keep, -math.inf)  # [batch, k, q, key]
        return scores.index_copy(1, heads, sub)

    return hook
