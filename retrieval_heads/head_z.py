"""The ``z`` of attention heads over a run: recorded, or averaged over a reference set.

``z`` (``hook_z``: the attention-weighted values, before ``W_O``) is what a head writes to the
residual stream, through its output projection.

- :class:`ZRecorder` — hooks recording the ``z`` of chosen heads while a run goes through
  ``model.prefill`` / ``model.step``; :class:`RecordedZ` — what it recorded;
- :func:`record_z` — a greedy or teacher-forced decode, recorded: the source of a ``resample``
  ablation (:class:`~retrieval_heads.ablation.ResampleAblation`);
- :func:`mean_head_z` — each head's mean ``z`` over a reference set: the data of a ``mean``
  ablation (:class:`~retrieval_heads.ablation.MeanAblation`).

It never edits an activation (the hooks of :mod:`retrieval_heads.head_hooks` do).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from retrieval_heads.head_hooks import (
    PHASES,
    HeadLabels,
    Hooks,
    _as_batch,
    _by_layer,
    _Index,
    _labels,
    _parse,
)
from retrieval_heads.heads import Head

if TYPE_CHECKING:
    from retrieval_heads.model import HookedModel

__all__ = ["RecordedZ", "ZRecorder", "mean_head_z", "record_z"]


@dataclass
class RecordedZ:
    """The ``z`` of chosen heads over one run (see :func:`record_z`).

    ``prefill[layer]`` is ``[batch, prompt_len, k, d_head]`` and ``decode[layer]`` is
    ``[batch, n_steps, k, d_head]``, where the ``k`` columns are ``columns(layer)`` (that
    layer's recorded heads, ascending). A phase that was not recorded is an empty dict.
    ``tokens`` are the tokens fed at the decode steps (``[batch, n_steps]``), ``logits``
    the run's last logits (``[batch, vocab]``).
    """

    heads: list[Head]
    prefill: dict[int, Tensor] = field(default_factory=dict)
    decode: dict[int, Tensor] = field(default_factory=dict)
    tokens: Tensor | None = None
    logits: Tensor | None = None

    def columns(self, layer: int) -> list[int]:
        """The recorded heads of ``layer``, in the order of the ``k`` axis."""
        return _by_layer(self.heads).get(layer, [])

    @property
    def prompt_length(self) -> int:
        """Recorded prefill positions (0 when the prefill was not recorded)."""
        return next(iter(self.prefill.values())).shape[1] if self.prefill else 0

    @property
    def n_steps(self) -> int:
        """Recorded decode steps."""
        return next(iter(self.decode.values())).shape[1] if self.decode else 0

    def z(self, head: Head | str, phase: Literal["prefill", "decode"] = "decode") -> Tensor:
        """One head's recorded ``z``: ``[batch, positions or steps, d_head]``."""
        head = Head.parse(head)
        if head not in self.heads:
            raise KeyError(f"head {head} was not recorded; recorded: {_labels(self.heads)}")
        store = self.prefill if phase == "prefill" else self.decode
        if head.layer not in store:
            raise KeyError(f"the {phase} phase was not recorded")
        return store[head.layer][:, :, self.columns(head.layer).index(head.head)]


class ZRecorder:
    """Record the ``z`` of chosen heads (default: all) while a run goes through hooks.

    ``prefill_hooks()`` records every prompt position (chunks are joined by
    ``position_offset``); ``decode_hooks()`` records one entry per ``step``. Pass them to
    ``model.prefill`` / ``model.step`` yourself, or let :func:`record_z` drive a greedy or
    teacher-forced decode. ``result()`` returns a :class:`RecordedZ`. Memory: ``k`` heads x
    positions x ``d_head`` per recorded layer.
    """

    def __init__(self, model: HookedModel, heads: HeadLabels | None = None) -> None:
        self.model = model
        self.heads = model.heads() if heads is None else _parse(heads)
        for h in self.heads:
            h.check(model.n_layers, model.n_heads)
        self._layers = {layer: _Index(hs) for layer, hs in _by_layer(self.heads).items()}
        self._prefill: dict[int, list[tuple[int, Tensor]]] = {}
        self._decode: dict[int, list[Tensor]] = {}

    def _hooks(self, sink: Callable[[int, int, Tensor], None]) -> Hooks:
        def make(layer: int, idx: _Index):
            def hook(z: Tensor, hook: Any) -> None:
                sink(layer, self.model.position_offset, z.index_select(2, idx.on(z.device)))

            return hook

        return [
            (self.model.hook_name(layer, "z"), make(layer, idx))
            for layer, idx in self._layers.items()
        ]

    def prefill_hooks(self) -> Hooks:
        """Hooks for ``model.prefill``: record ``z`` at every prompt position."""
        self._prefill = {}
        return self._hooks(
            lambda layer, offset, z: self._prefill.setdefault(layer, []).append((offset, z))
        )

    def decode_hooks(self) -> Hooks:
        """Hooks for ``model.step``: record ``z`` at each decode step, in order."""
        self._decode = {}

        def sink(layer: int, offset: int, z: Tensor) -> None:
            if z.shape[1] != 1:
                raise RuntimeError("ZRecorder.decode_hooks() are for model.step (one query)")
            self._decode.setdefault(layer, []).append(z)

        return self._hooks(sink)

    def result(self, tokens: Tensor | None = None, logits: Tensor | None = None) -> RecordedZ:
        prefill = {}
        for layer, chunks in self._prefill.items():
            chunks = sorted(chunks, key=lambda c: c[0])
            expected = 0
            for offset, z in chunks:
                if offset != expected:
                    raise RuntimeError(
                        f"recorded prefill chunks are not contiguous (chunk at {offset}, expected "
                        f"{expected}): record one prefill per ZRecorder"
                    )
                expected += z.shape[1]
            prefill[layer] = torch.cat([z for _, z in chunks], dim=1)
        decode = {layer: torch.cat(zs, dim=1) for layer, zs in self._decode.items()}
        return RecordedZ(list(self.heads), prefill, decode, tokens, logits)


@torch.no_grad()
def record_z(
    model: HookedModel,
    input_ids: Int[Tensor, "batch pos"] | Sequence[int],
    heads: HeadLabels | None = None,
    *,
    n_steps: int = 0,
    tokens: Int[Tensor, "batch steps"] | Sequence[int] | None = None,
    phase: Literal["decode", "all"] = "decode",
) -> RecordedZ:
    """Run ``input_ids`` and decode, recording the ``z`` of ``heads`` (default: all).

    Decodes ``n_steps`` greedy tokens, or feeds ``tokens`` (teacher forcing: ``[steps]`` or
    ``[batch, steps]``; ``n_steps`` is then their length). Step ``t`` feeds token ``t`` (the
    first is the argmax of the prefill's logits when greedy) and records the ``z`` of that
    step, the same step the ``resample`` replay overwrites. ``phase="all"`` also records the
    prompt (running the bridge over it instead of the fast path).
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}: use one of {', '.join(PHASES)}")
    ids = _as_batch(input_ids, model)
    rec = ZRecorder(model, heads)
    state = model.prefill(ids, fwd_hooks=rec.prefill_hooks() if phase == "all" else ())
    forced = None
    if tokens is not None:
        forced = torch.as_tensor(tokens, device=model.device)
        if forced.ndim == 1:
            forced = forced[None].expand(ids.shape[0], -1)
        if forced.ndim != 2 or forced.shape[0] != ids.shape[0]:
            raise ValueError(
                f"tokens must be [steps] or [batch={ids.shape[0]}, steps], got {tuple(forced.shape)}"
            )
        n_steps = forced.shape[1]
    hooks = rec.decode_hooks()
    fed = []
    for t in range(n_steps):
        token = forced[:, t] if forced is not None else state.last_logits.argmax(-1)
        model.step(state, token, fwd_hooks=hooks)
        fed.append(token)
    fed_tokens = torch.stack(fed, dim=1) if fed else ids.new_zeros(ids.shape[0], 0)
    return rec.result(tokens=fed_tokens, logits=state.last_logits)


@torch.no_grad()
def mean_head_z(
    model: HookedModel,
    input_ids: Iterable[Int[Tensor, "batch pos"] | Sequence[int]] | Tensor,
    heads: HeadLabels | None = None,
    positions: Literal["all", "last"] = "all",
) -> Float[Tensor, "layer head d_head"]:
    """Each head's mean ``z`` over a reference set, for ``Ablation(mode="mean")``.

    ``input_ids`` is a list of sequences or batches (``[pos]`` or ``[batch, pos]``; a single
    ``[batch, pos]`` tensor is one batch), run one at a time. ``positions="all"`` averages
    over every token of every sequence (token-weighted; the prompt runs through the bridge in
    chunks, so memory is O(chunk x context)); ``"last"`` over the last token of each sequence
    (the prefix runs the fast path). Returns float32 ``[n_layers, n_heads, d_head]``; heads
    not in ``heads`` (default: all) are NaN, so using them by mistake fails loudly.
    """
    if positions not in ("all", "last"):
        raise ValueError(f"positions must be 'all' or 'last', got {positions!r}")
    selected = model.heads() if heads is None else _parse(heads)
    for h in selected:
        h.check(model.n_layers, model.n_heads)
    by_layer = {layer: _Index(hs) for layer, hs in _by_layer(selected).items()}
    sums = torch.zeros(model.n_layers, model.n_heads, model.d_head, dtype=torch.float64)
    count = 0
    batches = [input_ids] if isinstance(input_ids, Tensor) else list(input_ids)

    def make(layer: int, idx: _Index):
        def hook(z: Tensor, hook: Any) -> None:
            i = idx.on(z.device)
            sums[layer, idx.values] += z.index_select(2, i).double().sum(dim=(0, 1)).cpu()

        return hook

    for batch in batches:
        ids = _as_batch(batch, model)
        if positions == "all":
            hooks = [
                (model.hook_name(layer, "z"), make(layer, idx)) for layer, idx in by_layer.items()
            ]
            if hooks:
                model.prefill(ids, fwd_hooks=hooks)
            count += ids.numel()
        else:
            for row in ids:
                z, _ = model.head_outputs(row, [row.shape[0] - 1])  # [layer, 1, head, d_head]
                sums += z[:, 0].double().cpu()
                count += 1
    if count == 0:
        raise ValueError("mean_head_z needs at least one sequence")
    mean = (sums / count).float()
    keep = torch.zeros(model.n_layers, model.n_heads, dtype=torch.bool)
    for h in selected:
        keep[h.layer, h.head] = True
    mean[~keep] = math.nan
    return mean.to(model.device)
