"""The intervention protocol: what the scorer asks of anything that changes a forward pass.

An intervention is any object with three methods (no base class to inherit)::

    prefill_hooks(model, trial) -> [(hook_name, fn), ...]   # for model.prefill
    decode_hooks(model, trial)  -> [(hook_name, fn), ...]   # for model.step, built once per run
    describe() -> dict                                       # JSON-able: what is recorded

:func:`~retrieval_heads.scoring.detect` and :func:`~retrieval_heads.scoring.score_trial` take
one as ``intervention=``: they build its hooks for every trial (``trial`` may be ignored) and
``detect`` records ``describe()`` in the results' config under ``"intervention"``.

Implementations in the package: the ablation modes of :mod:`retrieval_heads.interventions`
(:class:`~retrieval_heads.interventions.UniformAblation`, ``ZeroAblation``, ``MeanAblation``,
``ResampleAblation``, ``KnockoutAblation``, all made by ``Ablation(heads, mode=...)`` too) and
the KV-window policy :class:`~retrieval_heads.kvcache.KVPolicy`. :class:`UserIntervention`
wraps hand-written hooks, and :func:`compose` runs several interventions together.

An intervention may also say ``trial_independent = True``: its hooks do not depend on the trial
and treat every row of a batch alike (an ablation of fixed heads, a KV window, a resample of
one recorded sequence), so trials of one length may run in one batch with hooks built once
(``trial=None``); without it, trials run one by one (:func:`is_trial_independent`).

Interventions built for one trial each (a resample of that trial's source, a knockout of its
needle) may still share a batch: a class may offer ``stack(parts)`` (a classmethod), one
intervention whose hooks, built once for the batch (``trial=None``), treat batch row ``i`` as
``parts[i]`` treats its trial run alone, or ``None`` when these parts cannot share a batch.
:func:`stack_interventions` asks for it, and says ``None`` (run them one by one) for parts of
different classes or a class without ``stack``; identical trial-independent parts need none.

Decode hooks keep the scorer on the TransformerLens bridge (the lean decode step runs no
hooks); an intervention whose ``decode_hooks`` is empty leaves the lean step on.

This module imports neither torch nor the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from retrieval_heads.model import HookedModel
    from retrieval_heads.trials.trial import Trial

__all__ = [
    "HookList",
    "Intervention",
    "UserIntervention",
    "compose",
    "is_trial_independent",
    "stack_interventions",
]

HookList = list[tuple[str, Callable[..., Any]]]
#: Static hooks, or a function ``(model, trial) -> hooks`` building them for each trial.
HookSource = Sequence[tuple[str, Callable[..., Any]]] | Callable[[Any, Any], Sequence]


@runtime_checkable
class Intervention(Protocol):
    """Anything that gives hooks per trial and says what it is (see the module docstring)."""

    def prefill_hooks(self, model: HookedModel, trial: Trial | None = None) -> HookList:
        """Hooks for ``model.prefill`` on ``trial`` (``[]``: the fast prefill runs)."""
        ...

    def decode_hooks(self, model: HookedModel, trial: Trial | None = None) -> HookList:
        """Hooks for ``model.step`` on ``trial``; built once per run (they may count steps)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What this intervention is, as a JSON-able dict (recorded with the results)."""
        ...


def _build(source: HookSource, model: Any, trial: Any) -> HookList:
    hooks = source(model, trial) if callable(source) else source
    return list(hooks)


class UserIntervention:
    """Hand-written hooks as an :class:`Intervention`.

    ``prefill`` and ``decode`` are lists of ``(hook_name, fn)`` pairs, used on every trial
    as they are, or functions ``(model, trial) -> list`` that build them per trial (do that
    for stateful hooks, which must start afresh on each run). ``description`` is what
    ``describe()`` returns besides ``{"intervention": "user"}`` (JSON-able; say what the
    hooks do, since the results cannot record functions). ``trial_independent=True`` says the
    (listed, not built) hooks treat every row of a batch alike, so trials may run in batches::

        fired = UserIntervention(decode=[(model.hook_name(0, "z"), my_hook)],
                                 description={"what": "log layer 0's z"})
        detect(model, trials, intervention=fired)
    """

    def __init__(
        self,
        decode: HookSource = (),
        prefill: HookSource = (),
        *,
        description: dict[str, Any] | None = None,
        trial_independent: bool = False,
    ) -> None:
        for name, source in (("decode", decode), ("prefill", prefill)):
            if not callable(source) and not isinstance(source, Sequence):
                raise TypeError(
                    f"{name}= must be a list of (hook_name, fn) pairs or a function "
                    f"(model, trial) -> list, got {type(source).__name__}"
                )
        self.decode = decode
        self.prefill = prefill
        self.description = dict(description or {})
        self.trial_independent = bool(trial_independent) and not (
            callable(decode) or callable(prefill)
        )

    def prefill_hooks(self, model: HookedModel, trial: Trial | None = None) -> HookList:
        return _build(self.prefill, model, trial)

    def decode_hooks(self, model: HookedModel, trial: Trial | None = None) -> HookList:
        return _build(self.decode, model, trial)

    def describe(self) -> dict[str, Any]:
        return {"intervention": "user", **self.description}

    def __repr__(self) -> str:
        return f"UserIntervention({self.description!r})"


class Composed:
    """Several interventions at once (see :func:`compose`)."""

    def __init__(self, parts: Sequence[Intervention]) -> None:
        self.parts = list(parts)
        self.trial_independent = all(is_trial_independent(part) for part in self.parts)

    def prefill_hooks(self, model: HookedModel, trial: Trial | None = None) -> HookList:
        return [pair for part in self.parts for pair in part.prefill_hooks(model, trial)]

    def decode_hooks(self, model: HookedModel, trial: Trial | None = None) -> HookList:
        return [pair for part in self.parts for pair in part.decode_hooks(model, trial)]

    def describe(self) -> dict[str, Any]:
        return {"intervention": "compose", "parts": [part.describe() for part in self.parts]}

    def __repr__(self) -> str:
        return f"compose({', '.join(map(repr, self.parts))})"


def compose(*interventions: Intervention) -> Composed:
    """One intervention running ``interventions`` together, their hooks in the order given
    (hooks on the same point run in that order: a later one sees the earlier one's output)."""
    check_intervention(*interventions)
    return Composed(interventions)


def check_intervention(*interventions: Any) -> None:
    """Raise ``TypeError`` naming what is missing for an object that is not an
    :class:`Intervention`."""
    for obj in interventions:
        if not isinstance(obj, Intervention):
            missing = [
                m
                for m in ("prefill_hooks", "decode_hooks", "describe")
                if not callable(getattr(obj, m, None))
            ]
            raise TypeError(
                f"{type(obj).__name__} is not an intervention: it lacks {', '.join(missing)} "
                "(an intervention has prefill_hooks(model, trial), decode_hooks(model, trial) "
                "and describe(); wrap plain hooks in UserIntervention)"
            )


def is_trial_independent(intervention: Any) -> bool:
    """Whether ``intervention``'s hooks may be built once and run on a batch of trials
    (``None``, no intervention, may)."""
    return intervention is None or bool(getattr(intervention, "trial_independent", False))


def stack_interventions(parts: Sequence[Any]) -> Any | None:
    """One intervention whose hooks (built once, ``trial=None``) treat batch row ``i`` as
    ``parts[i]`` treats its trial run alone, or ``None`` when the parts cannot share a batch
    (run them one by one): parts of different classes, a class without ``stack``, or a
    ``stack`` that refuses them (other heads, another phase; see the module docstring)."""
    parts = list(parts)
    if not parts:
        raise ValueError("no interventions to stack")
    first = parts[0]
    if all(part is first for part in parts) and is_trial_independent(first):
        return first
    stack = getattr(type(first), "stack", None)
    if not callable(stack) or any(type(part) is not type(first) for part in parts):
        return None
    return stack(parts)
