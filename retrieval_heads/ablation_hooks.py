"""The hooks of a head ablation, trial by trial: what an ablation mode does to each trial.

:func:`ablation_hooks` turns heads, a mode and a phase into the scorer's per-trial hook function
``hooks(trial) -> (prefill_hooks, decode_hooks)`` and the params it adds to each record
(``extras(trial)``), building one :class:`~retrieval_heads.interventions.Ablation` per trial:

- ``uniform``, ``zero`` — the same hooks for every trial;
- ``mean`` — the given mean ``z`` (:func:`~retrieval_heads.interventions.mean_head_z`);
- ``knockout`` — every target needle's span blocked (the whole needle sentence); the record's
  ``blocked`` lists the spans;
- ``resample`` — the ``z`` of another trial replayed: :func:`resample_sources` picks it (another
  needle, another haystack window), ``_Recordings`` records every head's ``z`` on it once per
  (source, phase, steps) with :func:`retrieval_heads.decoding.greedy`, as many steps as the
  longer of the two answers' budgets; the record's ``resample_from`` names it.

:func:`trial_ablations` gives the same as a :class:`TrialAblations` (``build(trial)``,
``hooks(trial)``, ``extras(trial)``), which also stacks the ablations of a batch of trials
into one whose row ``i`` acts as trial ``i``'s (:meth:`TrialAblations.stacked`): every mode
batches, a knockout with per-row positions, a resample with the sources' recordings stacked.

``_check_mode`` refuses an unknown mode or phase, and ``uniform`` on a model with ALiBi position
biases (:func:`~retrieval_heads.interventions.check_uniform`), before anything runs. The
ablation runner (:mod:`retrieval_heads.causal`) builds a :class:`TrialAblations` once per
condition; :mod:`retrieval_heads.answering` answers a trial under its hooks.

It never decodes or grades an answer (:mod:`retrieval_heads.answering` does), never chooses
heads (:mod:`retrieval_heads.selection` does) and never imports :mod:`retrieval_heads.tiny`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from retrieval_heads.answering import _budget
from retrieval_heads.decoding import greedy
from retrieval_heads.heads import Head, parse_heads
from retrieval_heads.intervention import stack_interventions
from retrieval_heads.interventions import MODES, PHASES, Ablation, ZRecorder, check_uniform
from retrieval_heads.model import HookedModel
from retrieval_heads.scoring import DecodeConfig, HooksFor
from retrieval_heads.trials.trial import Trial

__all__ = ["TrialAblations", "ablation_hooks", "resample_sources", "trial_ablations"]


def resample_sources(trials: Sequence[Trial], phase: str = "decode") -> dict[str, Trial]:
    """For each trial, the trial whose ``z`` a resample ablation replays.

    The next trial in the list (cyclically) with another target needle and another haystack
    window (another length or haystack offset); failing that, the next with another needle. In
    phase ``"all"`` the prompt is replayed too, so the source must have the same length.
    """
    out: dict[str, Trial] = {}
    n = len(trials)
    for i, trial in enumerate(trials):
        order = [trials[(i + j) % n] for j in range(1, n)]
        if phase == "all":
            order = [t for t in order if len(t.input_ids) == len(trial.input_ids)]
        other_needle = [t for t in order if _needle_key(t) != _needle_key(trial)]
        other_hay = [t for t in other_needle if _haystack_key(t) != _haystack_key(trial)]
        pick = next(iter(other_hay or other_needle), None)
        if pick is None:
            raise ValueError(
                f"trial {trial.trial_id}: no other trial with another needle"
                + (" and the same length" if phase == "all" else "")
                + " to resample from"
            )
        out[trial.trial_id] = pick
    return out


def _needle_key(trial: Trial) -> Any:
    if trial.needles:
        return trial.target.needle.needle_id
    return ("answer", trial.answer)


def _haystack_key(trial: Trial) -> Any:
    p = trial.params
    return (p.get("haystack"), p.get("haystack_offset"), trial.context_length)


def _check_mode(mode: str, phase: str, model: HookedModel) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; the modes are {', '.join(MODES)}")
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; use one of {', '.join(PHASES)}")
    if mode == "uniform":
        check_uniform(model)


class _Recordings:
    """The ``z`` of every head on resample sources, recorded once per (source, phase)."""

    def __init__(self, model: HookedModel, config: DecodeConfig) -> None:
        self.model = model
        self.config = config
        self._store: dict[tuple[str, str, int], Any] = {}

    @torch.no_grad()
    def get(self, source: Trial, phase: str, n_steps: int) -> Any:
        key = (source.trial_id, phase, n_steps)
        if key not in self._store:
            model = self.model
            ids = torch.tensor(source.input_ids, dtype=torch.long, device=model.device)
            rec = ZRecorder(model)
            # As in score_trial (the same loop): prefill all but the last prompt token, feed it
            # as step 0, then n_steps steps in all, never stopping early.
            greedy(
                model,
                ids,
                n_steps,
                prefill_hooks=rec.prefill_hooks() if phase == "all" else (),
                decode_hooks=rec.decode_hooks(),
            )
            self._store[key] = rec.result()
        return self._store[key]


class TrialAblations:
    """The ablation of ``heads`` built for each trial of a sweep (see :func:`ablation_hooks`),
    and for a batch of them (:meth:`stacked`)."""

    def __init__(
        self,
        model: HookedModel,
        heads: list[Head],
        mode: str,
        phase: str,
        *,
        trials: Sequence[Trial],
        mean_z: Tensor | None,
        config: DecodeConfig,
        recordings: _Recordings,
    ) -> None:
        self.model, self.heads, self.mode, self.phase = model, heads, mode, phase
        self.mean_z, self.config, self.recordings = mean_z, config, recordings
        self.sources = resample_sources(trials, phase) if mode == "resample" else {}

    def build(self, trial: Trial) -> Ablation:
        """The ablation of ``trial`` (a resample's source is recorded on first use)."""
        model, heads, mode, phase = self.model, self.heads, self.mode, self.phase
        if mode == "knockout":
            if not trial.targets:
                raise ValueError(f"trial {trial.trial_id} has no needle to knock out")
            blocked = sorted({p for t in trial.targets for p in range(*t.span)})
            return Ablation(heads, mode, phase, blocked_positions=blocked, model=model)
        if mode == "mean":
            return Ablation(heads, mode, phase, mean_z=self.mean_z, model=model)
        if mode == "resample":
            if trial.trial_id not in self.sources:
                raise ValueError(f"trial {trial.trial_id} is not among the trials given")
            source = self.sources[trial.trial_id]
            recorded = self.recordings.get(source, phase, self._steps(trial))
            return Ablation(heads, mode, phase, resample=recorded, model=model)
        return Ablation(heads, mode, phase, model=model)

    def _steps(self, trial: Trial) -> int:
        """A resample's recorded steps: the longer of the trial's and its source's budgets."""
        source = self.sources[trial.trial_id]
        return max(
            _budget(trial, self.model, self.config), _budget(source, self.model, self.config)
        )

    def hooks(self, trial: Trial) -> tuple[list, list]:
        """``(prefill_hooks, decode_hooks)`` for ``trial`` (the scorer's ``hooks=``)."""
        ablation = self.build(trial)
        return ablation.prefill_hooks(self.model), ablation.decode_hooks(self.model)

    def extras(self, trial: Trial) -> dict[str, Any]:
        """What the mode did on ``trial``, for its record's params."""
        if self.mode == "knockout":
            return {"blocked": [list(t.span) for t in trial.targets]}
        if self.mode == "resample":
            return {"resample_from": self.sources[trial.trial_id].trial_id}
        return {}

    def stacked(self, trials: Sequence[Trial]) -> Ablation | None:
        """One ablation whose batch row ``i`` acts as ``build(trials[i])`` does on that trial
        alone (:meth:`~retrieval_heads.ablation_base.Ablation.stack`), or ``None`` when they
        cannot share a batch (run them one by one). Each resample row's recording covers its
        budget (:meth:`_steps`), so no row still running reaches the padding of a shorter one
        (:meth:`~retrieval_heads.head_z.RecordedZ.stack`)."""
        parts = [self.build(trial) for trial in trials]
        for trial, part in zip(trials, parts, strict=True):
            rec = part.resample
            if rec is not None and rec.n_steps < _budget(trial, self.model, self.config):
                return None  # it could outrun its recording, where alone it raises
        return stack_interventions(parts)


def trial_ablations(
    model: HookedModel,
    heads: Iterable[Head | str] | str,
    mode: str = "uniform",
    *,
    phase: str = "decode",
    trials: Sequence[Trial] = (),
    mean_z: Tensor | None = None,
    config: DecodeConfig | None = None,
    _recordings: _Recordings | None = None,
) -> TrialAblations | None:
    """The :class:`TrialAblations` of ``heads`` (``None`` when no head is ablated), checked:
    the mode and phase, the heads against the model, ``mean`` given ``mean_z``, every trial a
    resample source (see :func:`ablation_hooks`)."""
    _check_mode(mode, phase, model)
    selected = sorted(set(parse_heads(heads if isinstance(heads, str) else list(heads))))
    for h in selected:
        h.check(model.n_layers, model.n_heads)
    config = config or DecodeConfig()
    if not selected:
        return None
    if mode == "mean" and mean_z is None:
        raise ValueError("mode 'mean' needs mean_z= (see interventions.mean_head_z)")
    recordings = _recordings or _Recordings(model, config)
    return TrialAblations(
        model,
        selected,
        mode,
        phase,
        trials=trials,
        mean_z=mean_z,
        config=config,
        recordings=recordings,
    )


def ablation_hooks(
    model: HookedModel,
    heads: Iterable[Head | str] | str,
    mode: str = "uniform",
    *,
    phase: str = "decode",
    trials: Sequence[Trial] = (),
    mean_z: Tensor | None = None,
    config: DecodeConfig | None = None,
    _recordings: _Recordings | None = None,
) -> tuple[HooksFor | None, Callable[[Trial], dict[str, Any]]]:
    """``(hooks, extras)``: the scorer's per-trial hook function and the params it adds.

    ``hooks(trial) -> (prefill_hooks, decode_hooks)`` (``None`` when no head is ablated);
    ``extras(trial)`` says what the mode did on that trial. ``knockout`` blocks every target
    needle's span (the whole needle sentence); ``mean`` needs ``mean_z``; ``resample`` replays
    the source of :func:`resample_sources` over ``trials``.
    """
    per_trial = trial_ablations(
        model,
        heads,
        mode,
        phase=phase,
        trials=trials,
        mean_z=mean_z,
        config=config,
        _recordings=_recordings,
    )
    if per_trial is None:
        return None, lambda trial: {}
    return per_trial.hooks, per_trial.extras
