"""Head ablations: one class per mode, each an intervention built from the hooks of
:mod:`retrieval_heads.head_hooks`.

Each mode is a class (:class:`UniformAblation`, :class:`ZeroAblation`, :class:`MeanAblation`,
:class:`ResampleAblation`, :class:`KnockoutAblation`; the mode's data is a constructor
argument) implementing the :class:`~retrieval_heads.intervention.Intervention` protocol, so
``detect(model, trials, intervention=UniformAblation(heads))`` runs it; ``Ablation(heads,
mode, ...)`` and :func:`ablate` build the class from the mode's name (the base class lives in
:mod:`retrieval_heads.ablation_base`, with :data:`MODES` and :func:`check_uniform`). Each
mode acts on *query* heads (``hook_q``, ``hook_z``, ``hook_attn_scores`` and ``hook_pattern``
are per query head, also under grouped-query attention; use
:func:`~retrieval_heads.head_hooks.kv_group` to ablate every query head that reads a kv head),
with one hook per layer (per hook point).

Ablation modes
--------------
``uniform`` (Wu et al. 2024's ablation)
    Zero the head's query vectors at ``hook_q`` (after the q projection and its bias, before
    RoPE). RoPE, QK-norms, query scalings and soft-capping all map a zero query to zero, so
    every attention score of the head is 0 and, after the causal mask, its softmax is uniform
    over the visible keys: query position ``p`` attends ``1 / (p + 1)`` to each of keys
    ``0 .. p``. The head still writes to the residual stream: the plain mean of the values it
    sees. (Exceptions: additive score biases — ALiBi — and attention sinks survive a zero
    query, so there the pattern is not exactly uniform.)
``zero``
    Set the head's output ``z`` (``hook_z``: the attention-weighted values, before ``W_O``)
    to 0, so the head writes nothing to the residual stream (a model's output bias ``b_O`` is
    shared by all heads and stays).
``mean``
    Replace ``z`` by a fixed vector per head, its mean over a reference set:
    ``mean_z[layer, head]`` (``[n_layers, n_heads, d_head]``; see
    :func:`~retrieval_heads.head_z.mean_head_z`). The head then writes the same thing at every
    position, whatever the context.
``resample``
    Replace ``z`` by the head's ``z`` on another trial (another needle and haystack), recorded
    with :func:`~retrieval_heads.head_z.record_z` / :class:`~retrieval_heads.head_z.ZRecorder`.
    Decode phase: decode step ``t`` receives the ``z`` recorded at the source run's decode step
    ``t`` (so prompts may differ in length); prefill phase: the ``z`` recorded at the same
    absolute positions (the caller guarantees equal prompt lengths).
``knockout``
    Block the head's attention to chosen key positions (e.g. the needle span): their scores
    are set to ``-inf`` at ``hook_attn_scores`` (pre-softmax), so the softmax renormalises
    over the other visible keys and the blocked ones get exactly zero weight. The key axis of
    ``hook_attn_scores`` always spans absolute positions ``0 .. keys so far - 1`` (chunked
    prefill and decode steps both extend a cache that starts at 0), so absolute positions
    index it directly; positions not yet visible are ignored. A query whose visible keys are
    all blocked attends to nothing: its pattern row is 0 (its ``z`` is 0).

``phase="decode"`` (the paper's choice): hooks only for ``step``; the prompt is read un-ablated
and ``prefill_hooks`` is empty. ``phase="all"``: the same hooks for prefill too (prefill then
runs the bridge in chunks instead of the fast path). It never decides *which* heads to ablate
(callers pass them: top-K retrieval heads, random heads of the same count, ...;
:mod:`retrieval_heads.selection` picks them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from retrieval_heads.ablation_base import MODES, Ablation, Mode, _check_phase, check_uniform
from retrieval_heads.head_hooks import (
    HeadLabels,
    Hooks,
    Phase,
    _empty_rows_hook,
    _knockout_hook,
    _labels,
    _mean_hook,
    _parse,
    _replay_decode_hook,
    _replay_prefill_hook,
    _zero_heads_hook,
)
from retrieval_heads.head_z import RecordedZ

if TYPE_CHECKING:
    from retrieval_heads.model import HookedModel

__all__ = [
    "MODES",
    "MODE_CLASSES",
    "Ablation",
    "KnockoutAblation",
    "MeanAblation",
    "Mode",
    "ResampleAblation",
    "UniformAblation",
    "ZeroAblation",
    "ablate",
    "check_uniform",
]

_NEEDS = {"mean": "mean_z", "resample": "resample", "knockout": "blocked_positions"}
_HINTS = {
    "mean_z": "a [n_layers, n_heads, d_head] tensor, e.g. mean_head_z(model, reference_ids)",
    "resample": "a RecordedZ from record_z(model, other_trial_ids, heads, n_steps=...)",
    "blocked_positions": "the absolute key positions to block, e.g. range(*needle_span)",
}


class UniformAblation(Ablation):
    """Zero the heads' queries (``hook_q``): uniform attention over the visible keys (Wu et
    al. 2024's ablation; refused on ALiBi models, where a zero query keeps the bias)."""

    mode: ClassVar[str] = "uniform"

    def __init__(
        self, heads: HeadLabels, *, phase: Phase = "decode", model: HookedModel | None = None
    ) -> None:
        self._setup(heads, phase, model)

    def _check_model(self, model: HookedModel) -> None:
        if self.heads:
            check_uniform(model)

    def _layer_hooks(self, model, layer, heads, idx, phase) -> Hooks:
        return [(model.hook_name(layer, "q"), _zero_heads_hook(idx))]


class ZeroAblation(Ablation):
    """Zero the heads' output ``z`` (``hook_z``): they write nothing to the residual stream."""

    mode: ClassVar[str] = "zero"

    def __init__(
        self, heads: HeadLabels, *, phase: Phase = "decode", model: HookedModel | None = None
    ) -> None:
        self._setup(heads, phase, model)

    def _layer_hooks(self, model, layer, heads, idx, phase) -> Hooks:
        return [(model.hook_name(layer, "z"), _zero_heads_hook(idx))]


class MeanAblation(Ablation):
    """Replace the heads' ``z`` by ``mean_z[layer, head]`` (``[n_layers, n_heads, d_head]``,
    e.g. :func:`mean_head_z` over a reference set)."""

    mode: ClassVar[str] = "mean"

    def __init__(
        self,
        heads: HeadLabels,
        mean_z: Tensor | None = None,
        *,
        phase: Phase = "decode",
        model: HookedModel | None = None,
    ) -> None:
        if mean_z is None:
            raise ValueError(f"MeanAblation needs mean_z: {_HINTS['mean_z']}")
        self.mean_z = mean_z
        self._setup(heads, phase, model)

    def _validate(self) -> None:
        self._check_mean_z(None)

    def _check_model(self, model: HookedModel) -> None:
        self._check_mean_z(model)

    def _check_mean_z(self, model: HookedModel | None) -> None:
        mean_z = self.mean_z
        if not isinstance(mean_z, Tensor) or mean_z.ndim != 3:
            raise ValueError(
                f"mean_z must be a [n_layers, n_heads, d_head] tensor, got "
                f"{tuple(mean_z.shape) if isinstance(mean_z, Tensor) else type(mean_z).__name__}"
            )
        if model is not None:
            want = (model.n_layers, model.n_heads, model.d_head)
            if tuple(mean_z.shape) != want:
                raise ValueError(f"mean_z has shape {tuple(mean_z.shape)}, the model needs {want}")
        for h in self.heads:
            h.check(mean_z.shape[0], mean_z.shape[1])
        if self.heads:
            layers = torch.tensor([h.layer for h in self.heads])
            heads = torch.tensor([h.head for h in self.heads])
            bad = ~torch.isfinite(mean_z.detach().cpu()[layers, heads]).all(dim=-1)
            if bad.any():
                missing = [h for h, b in zip(self.heads, bad.tolist(), strict=True) if b]
                raise ValueError(
                    f"mean_z is not finite for heads {_labels(missing)}: compute it for them "
                    "(mean_head_z(..., heads=...))"
                )

    def _payload(self) -> dict[str, Any]:
        assert self.mean_z is not None
        return {"mean_z_shape": list(self.mean_z.shape)}

    def _layer_hooks(self, model, layer, heads, idx, phase) -> Hooks:
        assert self.mean_z is not None
        return [(model.hook_name(layer, "z"), _mean_hook(idx, self.mean_z[layer, heads]))]


class ResampleAblation(Ablation):
    """Replace the heads' ``z`` by their ``z`` on another trial, ``resample`` (a
    :class:`RecordedZ` from :func:`record_z`): step by step when decoding, position by
    position in the prompt (phase ``"all"``, equal prompt lengths)."""

    mode: ClassVar[str] = "resample"
    trial_independent: ClassVar[bool] = False  # its hooks are built for one trial

    def __init__(
        self,
        heads: HeadLabels,
        resample: RecordedZ | None = None,
        *,
        phase: Phase = "decode",
        model: HookedModel | None = None,
    ) -> None:
        if resample is None:
            raise ValueError(f"ResampleAblation needs resample: {_HINTS['resample']}")
        self.resample = resample
        self._setup(heads, phase, model)

    def _validate(self) -> None:
        rec = self.resample
        if not isinstance(rec, RecordedZ):
            raise ValueError(f"resample= must be a RecordedZ, got {type(rec).__name__}")
        missing = [h for h in self.heads if h not in set(rec.heads)]
        if missing:
            raise ValueError(f"the resample recording lacks heads {_labels(missing)}")
        layers = {h.layer for h in self.heads}
        if layers and not layers <= set(rec.decode):
            raise ValueError(
                "the resample recording has no decode steps: record_z(..., n_steps=N) with N at "
                "least the number of steps you will decode"
            )
        if self.phase == "all" and layers and not layers <= set(rec.prefill):
            raise ValueError(
                "phase='all' replays the prompt too: record it with record_z(..., phase='all')"
            )

    def _check_model(self, model: HookedModel) -> None:
        assert self.resample is not None
        for store in (self.resample.prefill, self.resample.decode):
            for z in store.values():
                if z.shape[-1] != model.d_head:
                    raise ValueError(
                        f"the resample recording has d_head {z.shape[-1]}, the model "
                        f"{model.d_head}: it was recorded on another model"
                    )

    def _payload(self) -> dict[str, Any]:
        assert self.resample is not None
        return {
            "resample_steps": self.resample.n_steps,
            "resample_prompt_length": self.resample.prompt_length,
        }

    def _layer_hooks(self, model, layer, heads, idx, phase) -> Hooks:
        rec = self.resample
        assert rec is not None
        cols = [rec.columns(layer).index(h) for h in heads]
        if phase == "prefill":
            fn = _replay_prefill_hook(model, idx, rec.prefill[layer][:, :, cols])
        else:
            fn = _replay_decode_hook(model, idx, rec.decode[layer][:, :, cols])
        return [(model.hook_name(layer, "z"), fn)]


class KnockoutAblation(Ablation):
    """Block the heads' attention to ``blocked_positions`` (absolute key positions, e.g. the
    needle span): ``-inf`` at ``hook_attn_scores``, the softmax renormalises over the rest."""

    mode: ClassVar[str] = "knockout"
    trial_independent: ClassVar[bool] = False  # its hooks are built for one trial

    def __init__(
        self,
        heads: HeadLabels,
        blocked_positions: Iterable[int] | None = None,
        *,
        phase: Phase = "decode",
        model: HookedModel | None = None,
    ) -> None:
        if blocked_positions is None:
            raise ValueError(
                f"KnockoutAblation needs blocked_positions: {_HINTS['blocked_positions']}"
            )
        positions = sorted({int(p) for p in blocked_positions})
        if not positions:
            raise ValueError("blocked_positions is empty: give the key positions to block")
        if positions[0] < 0:
            raise ValueError(f"blocked_positions must be >= 0, got {positions[0]}")
        self.blocked_positions = tuple(positions)
        self._setup(heads, phase, model)

    def _payload(self) -> dict[str, Any]:
        return {"blocked_positions": list(self.blocked_positions or ())}

    def _layer_hooks(self, model, layer, heads, idx, phase) -> Hooks:
        blocked = torch.tensor(self.blocked_positions, dtype=torch.long)
        return [
            (model.hook_name(layer, "attn_scores"), _knockout_hook(model, idx, blocked)),
            (model.hook_name(layer, "pattern"), _empty_rows_hook(idx)),
        ]


#: The class of each mode.
MODE_CLASSES: dict[str, type[Ablation]] = {
    cls.mode: cls
    for cls in (UniformAblation, ZeroAblation, MeanAblation, ResampleAblation, KnockoutAblation)
}


def _from_mode(
    heads: HeadLabels,
    mode: Mode | str,
    phase: Phase | str = "decode",
    mean_z: Tensor | None = None,
    resample: RecordedZ | None = None,
    blocked_positions: Iterable[int] | None = None,
    model: HookedModel | None = None,
) -> Ablation:
    """``Ablation(heads, mode, ...)``: check the mode's name and data, build its class."""
    if mode not in MODES:
        listing = "; ".join(f"{m}: {d}" for m, d in MODES.items())
        raise ValueError(f"unknown ablation mode {mode!r}; the modes are: {listing}")
    _check_phase(phase)
    data = {"mean_z": mean_z, "resample": resample, "blocked_positions": blocked_positions}
    for needs_it, name in _NEEDS.items():
        given = data[name] is not None
        if needs_it == mode and not given:
            raise ValueError(f"mode {needs_it!r} needs {name}=: {_HINTS[name]}")
        if needs_it != mode and given:
            raise ValueError(f"{name}= is only used by mode {needs_it!r}, not {mode!r}")
    cls: Callable[..., Ablation] = MODE_CLASSES[mode]
    args = (data[_NEEDS[mode]],) if mode in _NEEDS else ()
    return cls(heads, *args, phase=phase, model=model)


def ablate(
    model: HookedModel,
    heads: HeadLabels,
    mode: Mode | str = "uniform",
    *,
    phase: Phase | str = "decode",
    mean_z: Tensor | None = None,
    resample: RecordedZ | None = None,
    blocked_positions: Sequence[int] | None = None,
) -> Ablation:
    """The ablation of ``mode`` checked against ``model``: ``ablate(model, "14.7,16.19")``."""
    return _from_mode(
        _parse(heads),
        mode,
        phase,
        mean_z=mean_z,
        resample=resample,
        blocked_positions=blocked_positions,
        model=model,
    )
