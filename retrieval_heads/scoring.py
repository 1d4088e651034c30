"""The retrieval score, computed step by step while the model greedily writes its answer.

Wu et al. (2024): at each decode step, for every head, take the argmax of the head's attention row
for the current query. If it lands inside the needle's answer span on a token equal to the token
just generated, that head made a *copy event*. A head's trial score is the number of distinct
answer positions it copied divided by the span length, ``|g_h ∩ k| / |k|``
(``count_repeats=True`` reproduces the reference code, which adds ``1/|k|`` at every event).

Memory is linear in context: the prompt is prefilled by the model's efficient kernel with no
attention pattern kept, and only decode steps yield attention rows, where the query length is 1 and
each layer's row is ``[batch, head, key]``. With no decode hooks the rows come from
``HookedModel.step_rows`` (the efficient twin with a grouped-query attention function that hands
its probabilities over: about the cost of plain decoding); with decode hooks (interventions) every
step runs through the TransformerLens bridge and ``hook_pattern`` hooks take the rows. Each step's
rows are reduced at once to per-head statistics (argmax, top-k mass, span mass) and dropped.

Scorers, all from the same pass (each ``[layer, head]`` per trial, per query head):

- ``retrieval`` — the paper's copy-paste score;
- ``topk`` — HeadKV-style: per step, the attention mass on those of the top-``|k|`` keys that lie in
  the answer span, averaged over steps;
- ``attention_mass`` — per step, the attention mass on the answer span, averaged over steps.

Interventions plug in through ``intervention``: any object with ``prefill_hooks(model,
trial)``, ``decode_hooks(model, trial)`` and ``describe()`` (the protocol of
:mod:`retrieval_heads.intervention`: the ablation modes, the KV-window policy, or hand-written
hooks in a ``UserIntervention``); this module never imports their implementations. The older
``hooks`` argument, a function of the trial returning ``(prefill_hooks, decode_hooks)``, still
works.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from retrieval_heads.decoding import greedy
from retrieval_heads.grading import classify_failure, grade
from retrieval_heads.intervention import Intervention, check_intervention, is_trial_independent
from retrieval_heads.model import ContextLengthError, HookedModel, RowSink
from retrieval_heads.records import TrialRecord
from retrieval_heads.runner import Unit, model_info, run_sweep
from retrieval_heads.runner import model_name as runner_model_name
from retrieval_heads.scores import HeadScores
from retrieval_heads.sharding import Shard
from retrieval_heads.step_stats import (  # re-exported: scoring.<name> keeps working
    _scores,
    _StepStats,
)
from retrieval_heads.trials.builder import check_trial_tokens
from retrieval_heads.trials.trial import Trial

#: Default token budget for an answer: the reference code's (it stops at a newline too).
ANSWER_ROOM = 50
HookPairs = list[tuple[str, Callable]]
HooksFor = Callable[[Trial], tuple[HookPairs, HookPairs]]


class DetectionError(RuntimeError):
    """Detection produced nothing to score: no trial passed grading."""


@dataclass
class DecodeConfig:
    """How the answer is generated and graded."""

    max_new_tokens: int | None = None  # None: ANSWER_ROOM, or answer length + 8 if longer
    stop_at_eos: bool = True
    stop_strings: tuple[str, ...] = ("\n",)
    pass_threshold: float = 0.5  # ROUGE-1 recall
    count_repeats: bool = False

    def budget(self, trial: Trial, model: HookedModel) -> int:
        """Tokens to generate: as asked, else room for a model that restates the question first
        (``ANSWER_ROOM``, the reference code's 50, or the answer's length + 8 when that is more);
        within the context window. Decoding also stops at EOS and at a newline."""
        span = trial.answer_span
        wanted = self.max_new_tokens
        if wanted is None:
            wanted = max(ANSWER_ROOM, span[1] - span[0] + 8)
        return max(1, min(wanted, model.n_ctx - trial.context_length + 1))


def _is_stop(token: int, model: HookedModel, config: DecodeConfig) -> bool:
    tokenizer = model.tokenizer
    if config.stop_at_eos and token == tokenizer.eos_token_id:
        return True
    if config.stop_strings:
        text = tokenizer.decode([token])
        return any(s in text for s in config.stop_strings)
    return False


@torch.no_grad()
def greedy_decode(
    model: HookedModel,
    ids: Int[Tensor, " pos"],
    budget: int,
    config: DecodeConfig,
    *,
    prefill_hooks: HookPairs | Sequence = (),
    decode_hooks: HookPairs | Sequence = (),
    before_step: Callable[[], None] | None = None,
    row_sink: RowSink | None = None,
) -> tuple[list[int], str]:
    """Greedily answer the prompt ``ids``: ``(generated token ids, "stop" or "max_new_tokens")``.

    The last prompt token is fed as the first decode step, so the attention that produces the
    first answer token runs through ``decode_hooks`` too (as in the reference code). Stops at
    EOS or a stop string (that token is not returned) or after ``budget`` tokens;
    ``before_step`` runs before every step, the stopping one included. With ``row_sink`` (and
    no ``decode_hooks``) the steps run ``model.step_rows`` instead of the bridge, handing each
    layer's attention row to the sink. The loop is :func:`retrieval_heads.decoding.greedy`.
    """
    generated, reason = greedy(
        model,
        ids,
        budget,
        lambda token, _: ("stop", False) if _is_stop(token, model, config) else None,
        prefill_hooks=prefill_hooks,
        decode_hooks=decode_hooks,
        before_step=before_step,
        row_sink=row_sink,
    )
    return generated, reason or "max_new_tokens"


@torch.no_grad()
def score_trial(
    model: HookedModel,
    trial: Trial,
    config: DecodeConfig | None = None,
    hooks: HooksFor | None = None,
    *,
    lean: bool | None = None,
    intervention: Intervention | None = None,
) -> TrialRecord:
    """Greedily answer one trial and score every head on it (see the module docstring).

    ``intervention`` (an :class:`~retrieval_heads.intervention.Intervention`) changes the run:
    its ``prefill_hooks(model, trial)`` and ``decode_hooks(model, trial)`` are built for this
    trial. The record is the same as without one apart from what the hooks change (what the
    intervention was is recorded by :func:`detect`, in the run's config). ``hooks`` (a
    function ``trial -> (prefill_hooks, decode_hooks)``) is the older form of the same thing,
    kept for existing code; give one of the two, not both.

    ``lean`` chooses how decode steps yield attention rows: ``None`` (default) the lean step
    (``HookedModel.step_rows``) when no decode hook asks for the bridge and the model can
    run it, else the bridge with ``hook_pattern`` hooks; ``False`` always the bridge;
    ``True`` the lean step or an error. Both give the same record (up to float rounding in
    the attention-mass tables).
    """
    config = config or DecodeConfig()
    check_trial_tokens(trial, model.tokenizer, model.d_vocab, model.name)
    began = time.perf_counter()
    ids = torch.tensor(trial.input_ids, dtype=torch.long, device=model.device)  # [pos]
    prefill_hooks, decode_hooks = _trial_hooks(model, trial, hooks, intervention)
    stats = _StepStats(model.n_layers, model.n_heads, trial.answer_span, len(ids) - 1)
    if lean is None:
        lean = not decode_hooks and model.lean_decode
    elif lean and decode_hooks:
        raise ValueError("lean=True runs no decode hooks: they need the bridge (lean=False)")
    row_sink: RowSink | None
    if lean:
        pattern_hooks: HookPairs = []

        def row_sink(layer: int, row: Float[Tensor, "batch head key"]) -> None:
            stats.add(layer, row[0])

    else:
        row_sink = None
        pattern_hooks = [
            (model.hook_name(layer, "pattern"), stats.hook(layer))
            for layer in range(model.n_layers)
        ]
    generated, stopped_by = greedy_decode(
        model,
        ids,
        config.budget(trial, model),
        config,
        prefill_hooks=prefill_hooks,
        decode_hooks=[*pattern_hooks, *decode_hooks],
        before_step=lambda: stats.new_step(model.device),
        row_sink=row_sink,
    )
    return trial_record(
        model, trial, stats, generated, stopped_by, config, time.perf_counter() - began
    )


def trial_record(
    model: HookedModel,
    trial: Trial,
    stats: _StepStats,
    generated: list[int],
    stopped_by: str,
    config: DecodeConfig,
    elapsed_s: float,
) -> TrialRecord:
    """The record of one decoded trial: its answer graded, its steps' rows reduced to scores
    and copy events (:func:`score_trial`'s tail, shared with the batched scorer)."""
    stats.flush()
    if stopped_by == "stop":
        for table in (stats.argmax, stats.topk_mass, stats.span_mass):
            table.pop()  # the stop token is not part of the answer
    ids = torch.tensor(trial.input_ids, dtype=torch.long, device=model.device)  # [pos]
    scores, events_list = _scores(stats, generated, ids, trial.answer_span, config.count_repeats)
    text = model.tokenizer.decode(generated, skip_special_tokens=True).strip()
    answers = list(trial.answers) if len(trial.targets) > 1 else trial.answer
    verdict = grade(text, answers, threshold=config.pass_threshold)
    reason = None
    if not verdict.passed:
        distractors = [p.needle.answer for p in trial.distractors]
        reason = classify_failure(
            text, trial.answer, distractor_answers=distractors, stopped_by=stopped_by
        )
    params = dict(trial.params)
    params.update(
        context_length=trial.context_length,
        depth_percent=trial.depth_percent,
        needle_id=trial.target.needle.needle_id,
        answer_span=list(trial.answer_span),
        stopped_by=stopped_by,
    )
    return TrialRecord(
        trial_id=trial.trial_id,
        params=params,
        expected=trial.answer,
        generated_ids=generated,
        generated_text=text,
        passed=verdict.passed,
        recall=verdict.recall,
        reason=reason,
        scores=scores,
        copy_events=events_list,
        n_layers=model.n_layers,
        n_heads=model.n_heads,
        elapsed_s=round(elapsed_s, 4),
    )


def _check_one_way(hooks: HooksFor | None, intervention: Intervention | None) -> None:
    if hooks is not None and intervention is not None:
        raise ValueError(
            "give hooks= or intervention=, not both: intervention= replaces hooks= (wrap "
            "extra hooks in a UserIntervention and combine them with compose(...))"
        )
    if intervention is not None:
        check_intervention(intervention)


def _trial_hooks(
    model: HookedModel,
    trial: Trial,
    hooks: HooksFor | None,
    intervention: Intervention | None,
) -> tuple[HookPairs, HookPairs]:
    """``(prefill_hooks, decode_hooks)`` for ``trial``, from ``hooks`` or ``intervention``."""
    _check_one_way(hooks, intervention)
    if intervention is not None:
        prefill = intervention.prefill_hooks(model, trial)
        decode = intervention.decode_hooks(model, trial)
    elif hooks is not None:
        prefill, decode = hooks(trial)
    else:
        prefill, decode = [], []
    return list(prefill), list(decode)


def iter_detect(
    model: HookedModel,
    trials: Iterable[Trial],
    config: DecodeConfig | None = None,
    hooks: HooksFor | None = None,
    skip: Iterable[str] = (),
    *,
    intervention: Intervention | None = None,
) -> Iterator[TrialRecord]:
    """Score trials one by one (for notebooks and progress bars); ``skip`` lists done trial ids.

    ``intervention`` / ``hooks``: as in :func:`score_trial`."""
    _check_one_way(hooks, intervention)
    done = set(skip)
    for trial in trials:
        if trial.trial_id not in done:
            yield score_trial(model, trial, config, hooks, intervention=intervention)


def detect(
    model: HookedModel,
    trials: Sequence[Trial],
    *,
    out: str | Path | None = None,
    config: DecodeConfig | None = None,
    hooks: HooksFor | None = None,
    intervention: Intervention | None = None,
    model_name: str | None = None,
    run_config: dict | None = None,
    seed: int = 0,
    kind: str = "detect",
    progress: bool = False,
    require_pass: bool = True,
    shard: Shard | None = None,
    batch_size: int | None = 1,
    scorers: Sequence[str] = (),
) -> HeadScores | None:
    """Score every trial and aggregate per head (mean over passing trials, as in the paper).

    With ``out``, results go to a results directory as they finish (atomic; a rerun skips the
    trials already there). Raises :class:`DetectionError` when no trial passes and
    ``require_pass`` is set, with what the model answered, instead of returning empty scores.

    With ``shard`` (and ``out``), only the trials at the shard's positions of ``trials`` are
    scored, into ``out/shards/<i>-of-<N>/`` (see :mod:`retrieval_heads.sharding`); the return
    value is that share's scores (``None`` if it owns no trial), and no passing trial in the
    share is not an error: :func:`~retrieval_heads.sharding.merge` judges the whole run.

    ``intervention``: an :class:`~retrieval_heads.intervention.Intervention` run on every
    trial (an ablation such as ``UniformAblation(heads)``, a
    :class:`~retrieval_heads.kvcache.KVPolicy`, hand-written hooks in a
    :class:`~retrieval_heads.intervention.UserIntervention`); its ``describe()`` is recorded
    in the run's config as ``"intervention"`` (so a rerun with another intervention into the
    same ``out`` is refused). ``hooks`` (deprecated: use ``intervention``) is a function
    ``trial -> (prefill_hooks, decode_hooks)``; it leaves no trace in the config. Not both.

    ``batch_size``: trials of one length scored together
    (:func:`~retrieval_heads.batched.score_batch`; the same records, masses within float
    rounding); ``None`` picks it from the device's memory
    (:func:`~retrieval_heads.batched.auto_batch_size`), the intervention's hooks built once
    per batch. With ``hooks``, or an intervention whose hooks differ by trial or by row (not
    ``trial_independent``: a resample of a recording of several sequences, say), trials run
    one at a time.

    ``scorers``: other detectors to run on every trial beside the copy score and its
    attention-mass variants, each a ``[layer][head]`` table in the record's ``scores``
    (:data:`EXTRA_SCORERS`: ``"write"``, :func:`~retrieval_heads.logit_attribution.write_scores`
    on the answer generated; ``"query_focused"``, QRHead's calibrated score,
    :func:`~retrieval_heads.detectors.query_focused_scores`). Each costs about one more pass
    over the trial; they measure the unchanged model, so not with an intervention.
    """
    _check_one_way(hooks, intervention)
    scorers = tuple(dict.fromkeys(scorers))
    unknown = [name for name in scorers if name not in EXTRA_SCORERS]
    if unknown:
        raise ValueError(
            f"unknown scorer(s) {', '.join(map(repr, unknown))}: the scorers are "
            f"{', '.join(EXTRA_SCORERS)} (the copy score and its variants always run)"
        )
    if scorers and (hooks is not None or intervention is not None):
        raise ValueError(
            "scorers= measures the unchanged model: run it without an intervention or hooks"
        )
    config = config or DecodeConfig()
    run_config = dict(run_config or {})
    if scorers:  # a rerun with other scorers into the same out is refused
        run_config.setdefault("scorers", list(scorers))
    run_config.setdefault("decode", config.__dict__ | {"stop_strings": list(config.stop_strings)})
    if intervention is not None:
        run_config.setdefault("intervention", intervention.describe())
    check_lengths(model, trials)  # before a results directory is made for a run that cannot run

    def check(records: list[TrialRecord]) -> None:
        if require_pass and not any(r.passed for r in records):
            raise DetectionError(failure_summary(records))

    run_batch: Callable[[list[Unit]], list[TrialRecord]] | None = None
    size: int | Callable[[Unit], int] = 1
    if hooks is None and is_trial_independent(intervention) and batch_size != 1:
        from retrieval_heads.batched import score_batch, unit_batch_size

        def run_batch(units: list[Unit]) -> list[TrialRecord]:
            prefill, decode = [], []
            if intervention is not None:  # built once: the same for every trial and row
                prefill = intervention.prefill_hooks(model, None)
                decode = intervention.decode_hooks(model, None)
            trials = [u.item for u in units]
            records = score_batch(model, trials, config, prefill_hooks=prefill, decode_hooks=decode)
            return [
                with_scorers(model, t, r, scorers) for t, r in zip(trials, records, strict=True)
            ]

        size = unit_batch_size(model, batch_size)

    records = run_sweep(
        [Unit(t.trial_id, t) for t in trials],
        lambda unit: with_scorers(
            model,
            unit.item,
            score_trial(model, unit.item, config, hooks, intervention=intervention),
            scorers,
        ),
        run_batch=run_batch,
        batch_key=lambda unit: len(unit.item.input_ids),
        batch_size=size,
        out=out,
        model=model_name or runner_model_name(model),
        kind=kind,
        config=run_config,
        seed=seed,
        extra_meta=model_info(model),
        shard=shard,
        require_pass=require_pass,
        progress=progress,
        check=check,
    )
    if shard is not None:
        return HeadScores.from_records(records) if records else None
    return HeadScores.from_records(records)


#: Detectors :func:`detect` runs on request (``scorers=``, the CLI's ``--scorers``).
EXTRA_SCORERS = ("write", "query_focused")


def with_scorers(
    model: HookedModel, trial: Trial, record: TrialRecord, scorers: Sequence[str]
) -> TrialRecord:
    """``record`` with the tables of ``scorers`` (:data:`EXTRA_SCORERS`) added to its scores.

    ``"write"`` is 0 for every head on an empty answer (nothing was written)."""
    if not scorers:
        return record
    import dataclasses

    import numpy as np

    tables = dict(record.scores)
    for name in scorers:
        if name == "write":
            from retrieval_heads.logit_attribution import write_scores

            shape = (model.n_layers, model.n_heads)
            table = (
                write_scores(model, trial, record.generated_ids)
                if record.generated_ids
                else np.zeros(shape)
            )
        else:
            from retrieval_heads.detectors import query_focused_scores

            table = query_focused_scores(model, trial)
        tables[name] = np.asarray(table, dtype=np.float64).tolist()
    return dataclasses.replace(record, scores=tables)


def detection_failure(records: Sequence[TrialRecord]) -> DetectionError:
    """The error of a detection in which no trial passed (for merging shards of one)."""
    return DetectionError(failure_summary(records))


def check_lengths(model: HookedModel, trials: Iterable[Trial]) -> None:
    """Raise :class:`~retrieval_heads.model.ContextLengthError` if a trial exceeds ``n_ctx``.

    Only a sequence of trials is checked (an iterator is left unconsumed)."""
    n_ctx = getattr(model, "n_ctx", None)
    if not isinstance(n_ctx, int) or not isinstance(trials, Sequence):
        return
    too_long = sorted({len(t.input_ids) for t in trials if len(t.input_ids) > n_ctx})
    if too_long:
        shown = ", ".join(map(str, too_long[:5])) + (", ..." if len(too_long) > 5 else "")
        raise ContextLengthError(
            f"trials of {shown} tokens exceed the model's context window n_ctx={n_ctx}: use "
            f"lengths <= {n_ctx}, or load the model with a larger n_ctx if it can take one"
        )


def failure_summary(records: Sequence[TrialRecord], n: int = 5) -> str:
    """What the model answered, and where it failed: the message when no trial passes."""
    lines = [f"no trial passed grading ({len(records)} trials); what the model answered:"]
    for record in list(records)[:n]:
        p = record.params
        lines.append(
            f"  length {p.get('context_length')}, depth {p.get('depth_percent')}: "
            f"expected {record.expected!r}, got {record.generated_text!r} ({record.reason})"
        )
    cells = sorted(
        {(r.params.get("context_length"), r.params.get("depth_percent")) for r in records}
    )
    lines.append(f"failed (length, depth) cells: {cells[:20]}")
    lines.append(
        "check that the prompt template suits the model (a chat model may need --chat), "
        "that the context fits the model, and that --max-new-tokens covers the answer"
    )
    return "\n".join(lines)
