"""Head interventions: ablations as TransformerLens hooks, and activation patching per head.

This module never decides *which* heads to touch: callers pass them (top-K retrieval heads,
random heads of the same count, ...). Everything here is a list of ``(hook_name, fn)`` pairs
that ``HookedModel.prefill(ids, fwd_hooks=...)`` and ``HookedModel.step(state, tok,
fwd_hooks=...)`` accept, so an intervention plugs into any decode loop unchanged.

Ablation modes
--------------
Each mode is a class (:class:`UniformAblation`, :class:`ZeroAblation`, :class:`MeanAblation`,
:class:`ResampleAblation`, :class:`KnockoutAblation`; the mode's data is a constructor
argument) implementing the :class:`~retrieval_heads.intervention.Intervention` protocol, so
``detect(model, trials, intervention=UniformAblation(heads))`` runs it; ``Ablation(heads,
mode, ...)`` and :func:`ablate` build the class from the mode's name. Each mode acts on *query* heads (``hook_q``, ``hook_z``, ``hook_attn_scores`` and
``hook_pattern`` are per query head, also under grouped-query attention; use :func:`kv_group`
to ablate every query head that reads a kv head). Each mode installs one hook per layer (per
hook point) that edits all the selected heads of that layer at once through an index tensor.

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
    ``mean_z[layer, head]`` (``[n_layers, n_heads, d_head]``; see :func:`mean_head_z`). The
    head then writes the same thing at every position, whatever the context.
``resample``
    Replace ``z`` by the head's ``z`` on another trial (another needle and haystack), recorded
    with :func:`record_z` / :class:`ZRecorder`. Decode phase: decode step ``t`` receives the
    ``z`` recorded at the source run's decode step ``t`` (so prompts may differ in length);
    prefill phase: the ``z`` recorded at the same absolute positions (the caller guarantees
    equal prompt lengths).
``knockout``
    Block the head's attention to chosen key positions (e.g. the needle span): their scores
    are set to ``-inf`` at ``hook_attn_scores`` (pre-softmax), so the softmax renormalises
    over the other visible keys and the blocked ones get exactly zero weight. The key axis of
    ``hook_attn_scores`` always spans absolute positions ``0 .. keys so far - 1`` (chunked
    prefill and decode steps both extend a cache that starts at 0), so absolute positions
    index it directly; positions not yet visible are ignored. A query whose visible keys are
    all blocked attends to nothing: its pattern row is 0 (its ``z`` is 0).

Windowed attention (KV-cache compression, simulated)
----------------------------------------------------
:func:`window_hooks` keeps, for each chosen query head, only the first ``sink`` keys (attention
sinks) and the last ``window`` keys up to and including the query's own position; the other
keys' scores are set to ``-inf`` at ``hook_attn_scores``, so the softmax renormalises over the
kept ones, exactly as if their keys and values had been evicted from the cache. Which heads
keep the whole context is the caller's choice (:mod:`retrieval_heads.kvcache`).

Phases
------
``phase="decode"`` (the paper's choice): hooks only for ``step``; the prompt is read
un-ablated and ``prefill_hooks`` is empty. ``phase="all"``: the same hooks for prefill too
(prefill then runs the bridge in chunks instead of the fast path).

Activation patching
-------------------
:func:`patch_heads` measures, for each head, how much of the clean-vs-corrupted logit
difference (answer - wrong, last position) is recovered when that head's ``z`` at every
position of the corrupted run is replaced by its clean ``z``:
``(patched - corrupt) / (clean - corrupt)``.

TransformerLens' ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos`` works with
the bridge (the tests check that both give the same numbers), but it runs one forward pass per
head; :func:`patched_logits` instead runs every head of a layer in one batched forward pass
(copy ``i`` of the corrupted prompt gets head ``i`` patched), ``n_layers`` passes in all, and
accepts a subset of heads.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from retrieval_heads.heads import Head, parse_heads

if TYPE_CHECKING:
    from retrieval_heads.model import HookedModel

__all__ = [
    "MODES",
    "MODE_CLASSES",
    "PHASES",
    "Ablation",
    "KnockoutAblation",
    "MeanAblation",
    "Mode",
    "PatchedLogits",
    "Phase",
    "RecordedZ",
    "ResampleAblation",
    "UniformAblation",
    "ZRecorder",
    "ZeroAblation",
    "ablate",
    "kv_group",
    "mean_head_z",
    "patch_heads",
    "patched_logits",
    "record_z",
    "window_hooks",
    "window_mask",
]

Mode = Literal["uniform", "zero", "mean", "resample", "knockout"]
Phase = Literal["decode", "all"]

MODES: dict[str, str] = {
    "uniform": "zero the head's queries (hook_q): uniform attention over the visible keys",
    "zero": "zero the head's output z (hook_z)",
    "mean": "replace z by its mean over a reference set (needs mean_z)",
    "resample": "replace z by its z on another trial (needs resample=record_z(...))",
    "knockout": "block attention to chosen key positions (needs blocked_positions)",
}
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


def _as_batch(ids: Int[Tensor, "batch pos"] | Sequence[int], model: HookedModel) -> Tensor:
    ids = torch.as_tensor(ids, device=model.device)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.is_floating_point():
        raise ValueError(f"expected integer token ids [batch, pos], got {tuple(ids.shape)}")
    return ids


# --------------------------------------------------------------------------------------------
# Recording z (for resample ablations and for patching)


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


def _labels(heads: Iterable[Head]) -> str:
    labels = [h.dotted for h in heads]
    return ", ".join(labels[:12]) + (f", ... ({len(labels)} heads)" if len(labels) > 12 else "")


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


# --------------------------------------------------------------------------------------------
# Ablations


_NEEDS = {"mean": "mean_z", "resample": "resample", "knockout": "blocked_positions"}
_HINTS = {
    "mean_z": "a [n_layers, n_heads, d_head] tensor, e.g. mean_head_z(model, reference_ids)",
    "resample": "a RecordedZ from record_z(model, other_trial_ids, heads, n_steps=...)",
    "blocked_positions": "the absolute key positions to block, e.g. range(*needle_span)",
}


def check_uniform(model: HookedModel) -> None:
    """``uniform`` zeroes the query: on a model with ALiBi the position bias survives, and the
    "uniform" row would run from ~1e-4 to ~0.06. Refused rather than mislabelled."""
    if getattr(model, "score_bias", None) == "alibi":
        raise ValueError(
            f"{model.name} adds ALiBi position biases to its attention scores, which a zeroed "
            "query keeps, so 'uniform' ablation would not give uniform attention there: use "
            "--mode zero or mean"
        )


def _check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(
            f"unknown phase {phase!r}: use 'decode' (hooks on decode steps only, the "
            "paper's choice) or 'all' (prefill and decode)"
        )


class _ByMode(type):
    """``Ablation(heads, mode, ...)`` builds the mode's class; a mode class builds itself."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is Ablation:
            return _from_mode(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class Ablation(metaclass=_ByMode):
    """Ablate ``heads`` during ``phase``: the base of the mode classes, and their factory.

    ``Ablation(heads, mode, phase="decode", *, mean_z=, resample=, blocked_positions=,
    model=)`` returns the mode's class (:class:`UniformAblation`, :class:`ZeroAblation`,
    :class:`MeanAblation`, :class:`ResampleAblation`, :class:`KnockoutAblation`; ``mode`` is
    one of :data:`MODES`), checking that exactly the mode's data is given: ``mean_z`` (mode
    ``mean``), ``resample`` (mode ``resample``), ``blocked_positions`` (mode ``knockout``).
    Or build the class directly, its data a constructor argument:
    ``MeanAblation(heads, mean_z)``.

    ``heads``: ``Head``s or labels (``"3.5"``, ``"L3H5"``, a comma-separated string);
    duplicates are dropped. ``phase``: ``"decode"`` (hooks for ``step`` only) or ``"all"``.
    Pass ``model=`` to range-check the heads and data against a model on construction (also
    done whenever hooks are built).

    Every ablation is an :class:`~retrieval_heads.intervention.Intervention`:
    ``detect(model, trials, intervention=UniformAblation(heads))``. By hand::

        abl = Ablation(heads, "uniform", model=model)
        state = model.prefill(ids, fwd_hooks=abl.prefill_hooks(model))
        hooks = abl.decode_hooks(model)  # build once per run
        logits = model.step(state, token, fwd_hooks=hooks)
    """

    mode: ClassVar[str] = ""
    # The data of the other modes, None here (read by code written for one Ablation class).
    mean_z: Tensor | None = None
    resample: RecordedZ | None = None
    blocked_positions: tuple[int, ...] | None = None

    def __init__(
        self,
        heads: HeadLabels,
        *,
        phase: Phase = "decode",
        model: HookedModel | None = None,
    ) -> None:
        _check_phase(phase)
        self.heads: list[Head] = _parse(heads)
        self.phase: Phase = phase
        self._validate()
        if model is not None:
            self.check(model)

    def _validate(self) -> None:
        """Check the mode's data on construction (no model needed)."""

    def _check_model(self, model: HookedModel) -> None:
        """Check the mode's data against ``model``."""

    def _payload(self) -> dict[str, Any]:
        """The mode's data, as recorded by :meth:`describe`."""
        return {}

    def _layer_hooks(
        self, model: HookedModel, layer: int, heads: list[int], idx: _Index, phase: str
    ) -> Hooks:
        raise NotImplementedError

    def check(self, model: HookedModel) -> Ablation:
        """Range-check the heads (and the mode's data) against ``model``; return self."""
        for h in self.heads:
            h.check(model.n_layers, model.n_heads)
        self._check_model(model)
        return self

    # ---- the intervention protocol ----------------------------------------------------------

    def prefill_hooks(self, model: HookedModel, trial: Any = None) -> Hooks:
        """Hooks for ``model.prefill`` (empty in the decode phase). ``trial`` is not used."""
        self.check(model)
        return self._hooks(model, "prefill") if self.phase == "all" else []

    def decode_hooks(self, model: HookedModel, trial: Any = None) -> Hooks:
        """Hooks for ``model.step``. Build them once per run: ``resample`` counts the steps."""
        self.check(model)
        return self._hooks(model, "decode")

    def describe(self) -> dict[str, Any]:
        """``{"intervention": "ablation", "mode", "phase", "heads"}`` and the mode's data
        (its shape or positions, not the tensors)."""
        return {
            "intervention": "ablation",
            "mode": self.mode,
            "phase": self.phase,
            "heads": [h.dotted for h in self.heads],
            **self._payload(),
        }

    def _hooks(self, model: HookedModel, phase: str) -> Hooks:
        hooks: Hooks = []
        for layer, hs in _by_layer(self.heads).items():
            hooks.extend(self._layer_hooks(model, layer, hs, _Index(hs), phase))
        return hooks

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_labels(self.heads)!r}, phase={self.phase!r})"


class UniformAblation(Ablation):
    """Zero the heads' queries (``hook_q``): uniform attention over the visible keys (Wu et
    al. 2024's ablation; refused on ALiBi models, where a zero query keeps the bias)."""

    mode: ClassVar[str] = "uniform"

    def _check_model(self, model: HookedModel) -> None:
        if self.heads:
            check_uniform(model)

    def _layer_hooks(self, model, layer, heads, idx, phase) -> Hooks:
        return [(model.hook_name(layer, "q"), _zero_heads_hook(idx))]


class ZeroAblation(Ablation):
    """Zero the heads' output ``z`` (``hook_z``): they write nothing to the residual stream."""

    mode: ClassVar[str] = "zero"

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
        super().__init__(heads, phase=phase, model=model)

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
        super().__init__(heads, phase=phase, model=model)

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
        super().__init__(heads, phase=phase, model=model)

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
    cls = MODE_CLASSES[mode]
    args = (data[_NEEDS[mode]],) if mode in _NEEDS else ()
    return cls(heads, *args, phase=phase, model=model)  # type: ignore[arg-type]


def ablate(
    model: HookedModel,
    heads: HeadLabels,
    mode: Mode = "uniform",
    *,
    phase: Phase = "decode",
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


def _knockout_hook(model: HookedModel, idx: _Index, blocked: Tensor):
    def hook(scores: Tensor, hook: Any) -> Tensor | None:
        n_keys = scores.shape[-1]
        cols = blocked - first_key(model, scores)  # absolute positions -> this row's keys
        cols = cols[(cols >= 0) & (cols < n_keys)].to(scores.device)
        if cols.numel() == 0:
            return None
        heads = idx.on(scores.device)
        sub = scores.index_select(1, heads)  # [batch, k, query, key]
        # The causal mask is finfo.min, not -inf: make it -inf so a row whose visible keys are
        # all blocked is all -inf (NaN after softmax, zeroed by _empty_rows_hook) instead of
        # spreading its attention over future keys.
        sub = sub.masked_fill(sub <= torch.finfo(sub.dtype).min / 2, -math.inf)
        sub[..., cols] = -math.inf
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


# --------------------------------------------------------------------------------------------
# Activation patching


@dataclass
class PatchedLogits:
    """Last-position logits of a clean run, a corrupted run, and per-head patched runs.

    ``patched[layer, head]`` are the corrupted run's logits with that head's ``z`` at every
    position replaced by its clean ``z``; NaN for heads that were not patched.
    """

    clean: Float[Tensor, " vocab"]
    corrupt: Float[Tensor, " vocab"]
    patched: Float[Tensor, "layer head vocab"]
    heads: list[Head]


def _noop(act: Tensor, hook: Any) -> None:
    return None


@torch.no_grad()
def patched_logits(
    model: HookedModel,
    clean_ids: Int[Tensor, "1 pos"] | Sequence[int],
    corrupt_ids: Int[Tensor, "1 pos"] | Sequence[int],
    heads: HeadLabels | None = None,
    *,
    batch_size: int | None = None,
) -> PatchedLogits:
    """Patch each head's clean ``z`` (all positions) into the corrupted run, one head at a time.

    One sequence each, of equal length. The heads of a layer run as one batch of copies of
    the corrupted prompt (copy ``i`` has head ``i`` patched), at most ``batch_size`` copies
    per forward pass (default: all heads of the layer). All runs go through the bridge, so
    clean, corrupted and patched logits come from the same computation.
    """
    clean = _as_batch(clean_ids, model)
    corrupt = _as_batch(corrupt_ids, model)
    if clean.shape[0] != 1 or corrupt.shape[0] != 1:
        raise ValueError("patching takes one clean and one corrupted sequence (batch of 1)")
    if clean.shape[1] != corrupt.shape[1]:
        raise ValueError(
            f"clean and corrupted prompts must have the same length to patch position by "
            f"position: got {clean.shape[1]} and {corrupt.shape[1]} tokens"
        )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    selected = model.heads() if heads is None else _parse(heads)
    noop = [(model.hook_name(0, "z"), _noop)]  # any hook: run the bridge, not the fast path
    recorder = ZRecorder(model, selected)
    clean_logits = model.prefill(clean, fwd_hooks=recorder.prefill_hooks() or noop).last_logits
    source = recorder.result().prefill
    corrupt_logits = model.prefill(corrupt, fwd_hooks=noop).last_logits
    patched = torch.full(
        (model.n_layers, model.n_heads, clean_logits.shape[-1]),
        math.nan,
        dtype=clean_logits.dtype,
        device=clean_logits.device,
    )
    for layer, hs in _by_layer(selected).items():
        size = batch_size or len(hs)
        for start in range(0, len(hs), size):
            group = hs[start : start + size]
            cols = list(range(start, start + len(group)))  # recorded columns = sorted heads
            fn = _patch_copies_hook(model, _Index(group), source[layer][0][:, cols])
            state = model.prefill(
                corrupt.expand(len(group), -1), fwd_hooks=[(model.hook_name(layer, "z"), fn)]
            )
            patched[layer, group] = state.last_logits
    return PatchedLogits(clean_logits[0], corrupt_logits[0], patched, selected)


def _patch_copies_hook(model: HookedModel, idx: _Index, clean_z: Tensor):
    """Copy ``i`` of the batch gets head ``idx[i]``'s clean z (``clean_z``: [pos, k, d])."""

    def hook(z: Tensor, hook: Any) -> Tensor:
        start, n = model.position_offset, z.shape[1]
        heads = idx.on(z.device)
        copies = torch.arange(len(idx.values), device=z.device)
        z = z.clone()
        z[copies, :, heads] = clean_z[start : start + n].transpose(0, 1).to(z.device, z.dtype)
        return z

    return hook


@torch.no_grad()
def patch_heads(
    model: HookedModel,
    clean_ids: Int[Tensor, "1 pos"] | Sequence[int],
    corrupt_ids: Int[Tensor, "1 pos"] | Sequence[int],
    answer_token: int,
    wrong_token: int,
    heads: HeadLabels | None = None,
    *,
    batch_size: int | None = None,
) -> Float[Tensor, "layer head"]:
    """Per-head recovery of the logit difference by activation patching.

    ``ld = logit[answer_token] - logit[wrong_token]`` at the last position; returns
    ``(ld_patched - ld_corrupt) / (ld_clean - ld_corrupt)`` per head (1: patching the head
    alone restores the clean difference; 0: no effect), NaN for heads not in ``heads``
    (default: all). When the clean and corrupted differences are equal (e.g. the same
    prompt twice) the recovery is undefined: every entry is NaN and a ``RuntimeWarning``
    says so (patching then changes nothing; :func:`patched_logits` gives the raw logits).
    """
    for name, token in (("answer_token", answer_token), ("wrong_token", wrong_token)):
        if not 0 <= int(token) < model.d_vocab:
            raise ValueError(f"{name} {token} is not a token id (0-{model.d_vocab - 1})")
    run = patched_logits(model, clean_ids, corrupt_ids, heads, batch_size=batch_size)

    def diff(logits: Tensor) -> Tensor:
        return (logits[..., answer_token] - logits[..., wrong_token]).float()

    clean, corrupt, patched = diff(run.clean), diff(run.corrupt), diff(run.patched)
    denominator = clean - corrupt
    scale = max(1.0, abs(clean.item()), abs(corrupt.item()))
    if abs(denominator.item()) <= 1e-5 * scale:
        warnings.warn(
            f"the clean and corrupted logit differences are equal ({clean.item():.4g}): "
            "recovery is undefined, returning NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        return torch.full_like(patched, math.nan)
    return (patched - corrupt) / denominator
