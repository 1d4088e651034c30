"""Answering one trial, and the record of one trial run under an ablation.

- :func:`answer_trial` — greedily answer a trial and grade it, without scoring heads: for trials
  whose answer is not copied from a needle (memorised facts, chains), where a retrieval score
  means nothing. Decoding is :func:`~retrieval_heads.scoring.greedy_decode`, as in
  :func:`~retrieval_heads.scoring.score_trial`, so ablation hooks act on exactly the same steps;
- ``_run_trial`` — one trial under one condition, as the ablation runner
  (:mod:`retrieval_heads.causal`) records it: NIAH trials scored
  (:func:`~retrieval_heads.scoring.score_trial`), the other tasks answered
  (:func:`answer_trial`), then the record's condition, id and params set.

A task is ``params["task"]``, one of :data:`TASKS` (``"niah"`` when absent). Grading by task:
NIAH trials as in detection (ROUGE-1 recall >= 0.5, the paper's criterion); facts by exact match
(an answer is a region and a town; half of it is not the fact); chains by the hop list
(``passed``: every hop right and in order; ``recall``: the share of hops right).

A record of ``_run_trial`` carries its condition as a typed
:class:`~retrieval_heads.conditions.HeadAblation` (``k``, ``selection``, ``draw``, ``heads`` as
``"L.H"`` labels, ``mode``, ``phase``, the id's ``tag``); its trial id is
``"<trial id>|<tag>"``, the tag defaulting to ``"<selection>|k=<K>|draw=<d>"``; and in
``params`` its ``task``, ``base_trial_id``, ``answer_class``
(:func:`~retrieval_heads.grading.classify_failure` with the prompt's context, so ``in_context``
is possible; ``"partial"`` when the answer passes ROUGE but not the task's stricter criterion),
``exact`` (for every task), plus the mode's extras (``blocked``, ``resample_from``,
``mean_reference``).

It never builds hooks (callers pass them; :mod:`retrieval_heads.ablation_hooks` builds an
ablation's), never chooses heads or runs a sweep (:mod:`retrieval_heads.causal` does), and never
imports :mod:`retrieval_heads.tiny`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from retrieval_heads.conditions import HeadAblation
from retrieval_heads.grading import classify_failure, exact_match, grade
from retrieval_heads.model import HookedModel
from retrieval_heads.records import TrialRecord
from retrieval_heads.scoring import (
    ANSWER_ROOM,
    DecodeConfig,
    HooksFor,
    greedy_decode,
    score_trial,
)
from retrieval_heads.selection import Condition
from retrieval_heads.trials.trial import Trial

__all__ = ["TASKS", "answer_trial"]

TASKS = ("niah", "fact", "chain")


def _task(trial: Trial) -> str:
    return str(trial.params.get("task", "niah"))


def _hops(text: str) -> list[str]:
    return [" ".join(part.split()) for part in text.split(",") if part.strip()]


def _budget(trial: Trial, model: HookedModel, config: DecodeConfig) -> int:
    """How many steps a trial decodes: scoring's budget for a trial with needles; for one
    without, the same rule on its answer's length; never past the model's context."""
    if trial.needles:
        return config.budget(trial, model)
    wanted = config.max_new_tokens
    if wanted is None:
        n_answer = len(model.tokenizer(trial.answer, add_special_tokens=False)["input_ids"])
        wanted = max(ANSWER_ROOM, n_answer + 8)  # the rule of DecodeConfig.budget
    return max(1, min(wanted, model.n_ctx - trial.context_length + 1))


@torch.no_grad()
def answer_trial(
    model: HookedModel,
    trial: Trial,
    config: DecodeConfig | None = None,
    hooks: HooksFor | None = None,
) -> TrialRecord:
    """Greedily answer a trial and grade it, without scoring heads.

    For trials whose answer is not copied from a needle (memorised facts: ``needles=()``),
    where a retrieval score means nothing; the record has no head scores (``scores`` is empty)
    and no copy events. Decoding is :func:`~retrieval_heads.scoring.greedy_decode`, as in
    ``score_trial`` (the last prompt token is fed as the first decode step; stop at EOS or a
    stop string), so ablation hooks act on exactly the same steps. Grading depends on ``params["task"]`` (see the module docstring).
    """
    config = config or DecodeConfig()
    began = time.perf_counter()
    ids = torch.tensor(trial.input_ids, dtype=torch.long, device=model.device)
    prefill_hooks, decode_hooks = hooks(trial) if hooks else ([], [])
    generated, stopped_by = greedy_decode(
        model,
        ids,
        _budget(trial, model, config),
        config,
        prefill_hooks=prefill_hooks,
        decode_hooks=decode_hooks,
    )
    text = model.tokenizer.decode(generated, skip_special_tokens=True).strip()
    passed, recall = _grade(trial, text, config)
    params = dict(trial.params)
    params.update(
        context_length=trial.context_length,
        depth_percent=trial.depth_percent,
        stopped_by=stopped_by,
    )
    return TrialRecord(
        trial_id=trial.trial_id,
        params=params,
        expected=trial.answer,
        generated_ids=generated,
        generated_text=text,
        passed=passed,
        recall=recall,
        reason=None if passed else classify_failure(text, trial.answer, stopped_by=stopped_by),
        scores={},
        copy_events=[],
        n_layers=model.n_layers,
        n_heads=model.n_heads,
        elapsed_s=round(time.perf_counter() - began, 4),
    )


def _grade(trial: Trial, text: str, config: DecodeConfig) -> tuple[bool, float]:
    task = _task(trial)
    if task == "chain":
        want = [" ".join(h.split()) for h in trial.params["hops"]]
        got = _hops(text)
        right = sum(1 for a, b in zip(got, want, strict=False) if a == b)
        return got == want, right / len(want)
    verdict = grade(text, trial.answer, threshold=config.pass_threshold)
    if task == "fact":
        return verdict.exact, verdict.recall
    return verdict.passed, verdict.recall


def _context_text(model: HookedModel, trial: Trial) -> str:
    start, end = trial.context_span
    return model.tokenizer.decode(list(trial.input_ids[start:end]), skip_special_tokens=True)


def _run_trial(
    model: HookedModel,
    trial: Trial,
    condition: Condition,
    *,
    mode: str,
    phase: str,
    config: DecodeConfig,
    hooks: HooksFor | None,
    extras: Callable[[Trial], dict[str, Any]],
    tag: str | None = None,
    extra_params: Mapping[str, Any] | None = None,
    scored: TrialRecord | None = None,
) -> TrialRecord:
    """One trial under ``condition`` as an ablation record (``scored``: its record from the
    scorer already, when it ran in a batch)."""
    task = _task(trial)
    if scored is not None:
        record = scored
    elif task == "niah":
        record = score_trial(model, trial, config, hooks)
    else:
        record = answer_trial(model, trial, config, hooks)
    distractors = [p.needle.answer for p in trial.distractors] if task == "niah" else []
    answer_class = (
        "correct"
        if record.passed
        else classify_failure(
            record.generated_text,
            trial.answer,
            distractor_answers=distractors,
            context=_context_text(model, trial),
            threshold=config.pass_threshold,
            stopped_by=record.params.get("stopped_by"),
        )
    )
    if not record.passed and answer_class == "correct":
        answer_class = "partial"  # passes ROUGE but not the task's stricter criterion
    params = dict(record.params)
    params.update(
        task=task,
        base_trial_id=trial.trial_id,
        answer_class=answer_class,
        exact=exact_match(record.generated_text, trial.answer),
        **extras(trial),
        **dict(extra_params or {}),
    )
    ablation = HeadAblation.of(condition, mode, phase, tag)
    return dataclasses.replace(
        record,
        trial_id=f"{trial.trial_id}|{ablation.tag}",
        params=params,
        reason=None if answer_class == "correct" else answer_class,
        condition=ablation,
    )
