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

Batches: the hooks act on every row of a batch. Those of ``uniform``, ``zero``, ``mean``, a
``resample`` of a one-sequence recording and a ``knockout`` of one set of positions treat every
row alike (``trial_independent``); :meth:`Ablation.stack` makes one ablation whose row ``i``
acts as ``parts[i]`` acts on its trial alone (a resample of the stacked recordings, a knockout
of per-row positions), so ablations built trial by trial run in batches too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from retrieval_heads.ablation_base import MODES, Ablation, Mode, _check_phase, check_uniform
from retrieval_heads.head_hooks import (
    HeadLabels,
    Hooks,
    Phase,
    _blocked_mask,
    _empty_rows_hook,
    _knockout_hook,
    _mean_hook,
    _parse,
    _replay_decode_hook,
    _replay_prefill_hook,
    _zero_heads_hook,
)
from retrieval_heads.head_z import RecordedZ, check_mean_z

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
        check_mean_z(self.mean_z, self.heads)

    def _check_model(self, model: HookedModel) -> None:
        check_mean_z(self.mean_z, self.heads, model)

    def _stack(self, parts: list[Ablation]) -> Ablation | None:
        mine = self.mean_z
        assert mine is not None
        same = (
            p.mean_z is mine or (p.mean_z is not None and torch.equal(p.mean_z, mine))
            for p in parts
        )
        return self if all(same) else None

    def _payload(self) -> dict[str, Any]:
        assert self.mean_z is not None
        return {"mean_z_shape": list(self.mean_z.shape)}

    def _layer_hooks(self, model, layer, heads, idx, phase) -> Hooks:
        assert self.mean_z is not None
        return [(model.hook_name(layer, "z"), _mean_hook(idx, self.mean_z[layer, heads]))]


class ResampleAblation(Ablation):
    """Replace the heads' ``z`` by their ``z`` on another trial, ``resample`` (a
    :class:`RecordedZ` from :func:`record_z`): step by step when decoding, position by
    position in the prompt (phase ``"all"``, equal prompt lengths). A recording of one sequence
    replays it on every row of a batch; one of ``n`` sequences replays row ``i`` on row ``i``
    (:meth:`RecordedZ.stack`)."""

    mode: ClassVar[str] = "resample"

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

    @property
    def trial_independent(self) -> bool:
        """A recording of one sequence is replayed on every row alike."""
        assert self.resample is not None
        return self.resample.batch == 1

    def _validate(self) -> None:
        rec = self.resample
        if not isinstance(rec, RecordedZ):
            raise ValueError(f"resample= must be a RecordedZ, got {type(rec).__name__}")
        rec.check(self.heads, self.phase)

    def _check_model(self, model: HookedModel) -> None:
        assert self.resample is not None
        self.resample.check(self.heads, self.phase, model.d_head)

    def _stack(self, parts: list[Ablation]) -> Ablation | None:
        """The parts' recordings stacked (each of one sequence); a decode-phase replay drops
        their prompts, which it never reads."""
        recs = [p.resample for p in parts if p.resample is not None and p.resample.batch == 1]
        if len(recs) < len(parts):
            return None  # a part that replays several sequences is no one trial's
        if self.phase == "decode":
            recs = [dataclasses.replace(rec, prefill={}) for rec in recs]
        try:
            stacked = RecordedZ.stack(recs)
        except ValueError:  # other heads recorded, prompts of other lengths: one by one
            return None
        return ResampleAblation(self.heads, stacked, phase=self.phase)

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
    needle span): ``-inf`` at ``hook_attn_scores``, the softmax renormalises over the rest.
    Or, with ``rows`` instead, batch row ``i`` blocks ``rows[i]`` (:meth:`stack`'s form;
    ``blocked_positions`` is then every position some row blocks)."""

    mode: ClassVar[str] = "knockout"
    rows: tuple[tuple[int, ...], ...] | None = None

    def __init__(
        self,
        heads: HeadLabels,
        blocked_positions: Iterable[int] | None = None,
        *,
        rows: Sequence[Iterable[int]] | None = None,
        phase: Phase = "decode",
        model: HookedModel | None = None,
    ) -> None:
        if (blocked_positions is None) == (rows is None):
            raise ValueError(
                "KnockoutAblation needs blocked_positions (or rows, one list per batch row): "
                + _HINTS["blocked_positions"]
            )
        per_row = [_positions(row) for row in rows] if rows is not None else []
        if len(per_row) > 1:
            self.rows = tuple(per_row)
        self.blocked_positions = _positions(
            blocked_positions if blocked_positions is not None else [p for r in per_row for p in r]
        )
        self._setup(heads, phase, model)

    @property
    def trial_independent(self) -> bool:
        """One set of positions is blocked on every row alike."""
        return self.rows is None

    def _stack(self, parts: list[Ablation]) -> Ablation | None:
        if any(getattr(p, "rows", None) is not None for p in parts):
            return None  # each part must block one trial's positions
        if all(p.blocked_positions == self.blocked_positions for p in parts):
            return self
        rows = [p.blocked_positions or () for p in parts]
        return KnockoutAblation(self.heads, rows=rows, phase=self.phase)

    def _payload(self) -> dict[str, Any]:
        rows = {"rows": [list(r) for r in self.rows]} if self.rows is not None else {}
        return {"blocked_positions": list(self.blocked_positions or ()), **rows}

    def _layer_hooks(self, model, layer, heads, idx, phase) -> Hooks:
        blocked = _blocked_mask(self.rows or [self.blocked_positions or ()])
        return [
            (model.hook_name(layer, "attn_scores"), _knockout_hook(model, idx, blocked)),
            (model.hook_name(layer, "pattern"), _empty_rows_hook(idx)),
        ]


def _positions(positions: Iterable[int]) -> tuple[int, ...]:
    """Blocked key positions, checked (some, none negative), deduplicated and sorted."""
    out = sorted({int(p) for p in positions})
    if not out:
        raise ValueError("blocked_positions is empty: give the key positions to block")
    if out[0] < 0:
        raise ValueError(f"blocked_positions must be >= 0, got {out[0]}")
    return tuple(out)


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
