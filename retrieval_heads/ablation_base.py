"""What every head ablation shares: the :class:`Ablation` base class of the mode classes of
:mod:`retrieval_heads.ablation`.

An ablation is its heads (query heads, parsed and sorted) and its phase (``"decode"``: hooks
for ``step`` only; ``"all"``: for prefill too); the base class implements the
:class:`~retrieval_heads.intervention.Intervention` protocol from the per-layer hooks each mode
builds, says whether its hooks treat every row of a batch alike (``trial_independent``) and
stacks per-trial ablations into one for a batch (:meth:`Ablation.stack`). ``Ablation(heads,
mode, ...)`` builds the mode's class (:func:`retrieval_heads.ablation._from_mode`). Also here:
the mode names (:data:`MODES`) and :func:`check_uniform`.

It builds no hook function itself (:mod:`retrieval_heads.head_hooks` does) and never decides
which heads to ablate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import Tensor

from retrieval_heads.head_hooks import (
    PHASES,
    HeadLabels,
    Hooks,
    Phase,
    _by_layer,
    _Index,
    _labels,
    _parse,
)
from retrieval_heads.head_z import RecordedZ
from retrieval_heads.heads import Head

if TYPE_CHECKING:
    from retrieval_heads.model import HookedModel

__all__ = ["MODES", "Ablation", "Mode", "check_uniform"]

Mode = Literal["uniform", "zero", "mean", "resample", "knockout"]

MODES: dict[str, str] = {
    "uniform": "zero the head's queries (hook_q): uniform attention over the visible keys",
    "zero": "zero the head's output z (hook_z)",
    "mean": "replace z by its mean over a reference set (needs mean_z)",
    "resample": "replace z by its z on another trial (needs resample=record_z(...))",
    "knockout": "block attention to chosen key positions (needs blocked_positions)",
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
            from retrieval_heads.ablation import _from_mode

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

    if TYPE_CHECKING:
        # Ablation(...)'s signature for type checkers, which never read a metaclass's __call__.
        def __new__(
            cls,
            heads: HeadLabels,
            mode: Mode | str,
            phase: Phase | str = "decode",
            *,
            mean_z: Tensor | None = None,
            resample: RecordedZ | None = None,
            blocked_positions: Iterable[int] | None = None,
            model: HookedModel | None = None,
        ) -> Ablation: ...

    def _setup(self, heads: HeadLabels, phase: Phase, model: HookedModel | None) -> None:
        """Each mode's ``__init__``, its data set: keep the heads and phase, check it all."""
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

    @property
    def trial_independent(self) -> bool:
        """Whether the hooks treat every row of a batch alike (so batches of trials may run
        under one ablation); they never depend on the trial."""
        return True

    @classmethod
    def stack(cls, parts: Sequence[Ablation]) -> Ablation | None:
        """One ablation whose hooks treat batch row ``i`` as ``parts[i]`` treats its trial run
        alone, or ``None`` when the parts cannot share a batch (run them one by one): parts of
        other classes, heads or phases, or data the mode cannot hold row by row."""
        parts = list(parts)
        if not parts:
            raise ValueError("no ablations to stack")
        first = parts[0]
        if any(
            type(p) is not type(first) or p.heads != first.heads or p.phase != first.phase
            for p in parts
        ):
            return None
        return first if len(parts) == 1 else first._stack(parts)

    def _stack(self, parts: list[Ablation]) -> Ablation | None:
        """:meth:`stack` of ``parts`` of this class, heads and phase: the same hooks for all."""
        return self

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
