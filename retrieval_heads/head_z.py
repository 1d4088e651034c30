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

    @property
    def batch(self) -> int:
        """Recorded sequences (rows of the batch axis; 1 when nothing was recorded)."""
        for store in (self.decode, self.prefill):
            if store:
                return next(iter(store.values())).shape[0]
        return 1

    def check(self, heads: Sequence[Head], phase: str, d_head: int | None = None) -> None:
        """Raise ``ValueError`` unless this recording can replay ``heads`` in ``phase``
        (``"decode"``: the decode steps; ``"all"``: the prompt too) on a model of ``d_head``."""
        missing = [h for h in heads if h not in set(self.heads)]
        if missing:
            raise ValueError(f"the resample recording lacks heads {_labels(missing)}")
        layers = {h.layer for h in heads}
        if layers and not layers <= set(self.decode):
            raise ValueError(
                "the resample recording has no decode steps: record_z(..., n_steps=N) with N at "
                "least the number of steps you will decode"
            )
        if phase == "all" and layers and not layers <= set(self.prefill):
            raise ValueError(
                "phase='all' replays the prompt too: record it with record_z(..., phase='all')"
            )
        if d_head is None:
            return
        for store in (self.prefill, self.decode):
            for z in store.values():
                if z.shape[-1] != d_head:
                    raise ValueError(
                        f"the resample recording has d_head {z.shape[-1]}, the model "
                        f"{d_head}: it was recorded on another model"
                    )

    @classmethod
    def stack(cls, recordings: Sequence[RecordedZ]) -> RecordedZ:
        """The recordings as one, their rows one after another along the batch axis: what a
        batch replays when its row ``i`` replays ``recordings[i]``.

        They must record the same heads and phases, and prompts of one length. Their decode
        steps may differ: the shorter ones are padded at the end with zeros, steps a batch
        runs on a row only after that row has stopped (it steps until its last row stops;
        rows never mix), so each row must stop within its own recording, as alone it would
        have had to (the caller's check). ``tokens`` and ``logits`` are kept when every
        recording has them, of one shape."""
        recs = list(recordings)
        if not recs:
            raise ValueError("no recordings to stack")
        first = recs[0]
        for rec in recs[1:]:
            if rec.heads != first.heads:
                raise ValueError(
                    f"recordings of other heads cannot be stacked: {_labels(first.heads)} "
                    f"and {_labels(rec.heads)}"
                )
            if set(rec.prefill) != set(first.prefill) or set(rec.decode) != set(first.decode):
                raise ValueError("recordings of other phases or layers cannot be stacked")
            if rec.prompt_length != first.prompt_length:
                raise ValueError(
                    f"recordings of prompts of {first.prompt_length} and {rec.prompt_length} "
                    "tokens cannot be stacked: a batch replays prompts of one length"
                )
        steps = max(rec.n_steps for rec in recs)

        def padded(z: Float[Tensor, "b steps k d"]) -> Tensor:
            return torch.cat([z, z.new_zeros(z.shape[0], steps - z.shape[1], *z.shape[2:])], 1)

        def joined(values: list[Tensor | None]) -> Tensor | None:
            kept = [v for v in values if v is not None]
            if len(kept) < len(values) or len({tuple(v.shape[1:]) for v in kept}) != 1:
                return None
            return torch.cat(kept)

        try:
            prefill = {
                layer: torch.cat([r.prefill[layer] for r in recs]) for layer in first.prefill
            }
            decode = {
                layer: torch.cat([padded(r.decode[layer]) for r in recs]) for layer in first.decode
            }
        except RuntimeError as err:  # another d_head: recorded on another model
            raise ValueError(f"the recordings' z do not stack ({err})") from None
        tokens = joined([r.tokens for r in recs])
        return RecordedZ(
            list(first.heads), prefill, decode, tokens, joined([r.logits for r in recs])
        )

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


def check_mean_z(mean_z: Any, heads: Sequence[Head], model: HookedModel | None = None) -> None:
    """Raise ``ValueError`` unless ``mean_z`` is a ``[n_layers, n_heads, d_head]`` tensor (of
    ``model``'s shape, when given) that is finite for every one of ``heads``."""
    if not isinstance(mean_z, Tensor) or mean_z.ndim != 3:
        raise ValueError(
            f"mean_z must be a [n_layers, n_heads, d_head] tensor, got "
            f"{tuple(mean_z.shape) if isinstance(mean_z, Tensor) else type(mean_z).__name__}"
        )
    if model is not None:
        want = (model.n_layers, model.n_heads, model.d_head)
        if tuple(mean_z.shape) != want:
            raise ValueError(f"mean_z has shape {tuple(mean_z.shape)}, the model needs {want}")
    for h in heads:
        h.check(mean_z.shape[0], mean_z.shape[1])
    if heads:
        layers = torch.tensor([h.layer for h in heads])
        index = torch.tensor([h.head for h in heads])
        bad = ~torch.isfinite(mean_z.detach().cpu()[layers, index]).all(dim=-1)
        if bad.any():
            missing = [h for h, b in zip(heads, bad.tolist(), strict=True) if b]
            raise ValueError(
                f"mean_z is not finite for heads {_labels(missing)}: compute it for them "
                "(mean_head_z(..., heads=...))"
            )
