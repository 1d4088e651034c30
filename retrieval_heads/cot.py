"""Chain-of-thought vs direct answers under retrieval-head ablation, for real models.

Wu et al. (2024, section 5) report that masking retrieval heads leaves a model's direct answers to
knowledge questions (MMLU without chain of thought) largely intact, but hurts answers that must
re-read the prompt: chain-of-thought reasoning (GSM8K, MMLU with CoT) and extractive QA over a
given context (MuSiQue). This module is the harness for that experiment on any model:

- the questions and their graders live in :mod:`retrieval_heads.questions`
  (:func:`~retrieval_heads.questions.load_questions`, the JSONL format, :class:`Question`,
  :class:`QAGrade`, :func:`~retrieval_heads.questions.grade_question` and the graders per
  kind: numeric, choice, extractive); every name there is re-exported here, so
  ``cot.load_questions`` and ``from retrieval_heads.cot import grade_numeric`` keep working;
- :func:`build_prompt` writes each question twice: direct (``"Answer:"``) and with the
  chain-of-thought trigger (``"Answer: Let's think step by step."``), or through the model's
  chat template (``chat=True``); :func:`encode_prompt` tokenizes it;
- :func:`run` answers every question both ways, greedily (:func:`generate`: ``model.prefill``
  then ``model.step``), with nothing ablated, the top-K retrieval heads ablated, and K random
  non-retrieval heads ablated (``draws`` seeded draws; hooks from
  :func:`retrieval_heads.interventions.ablate`), into a resumable results directory
  (:func:`retrieval_heads.runner.run_sweep`); :func:`question_promptings` says which
  promptings a question runs with;
- :func:`summarize` / :func:`format_summary`: accuracy per kind x prompting x condition, mean ±
  std over random draws (:func:`retrieval_heads.analysis.summarise_k_sweep` on each group).

Records are :class:`~retrieval_heads.records.TrialRecord` s (``kind="cot"`` results directory;
no head scores, no copy events), their ``params`` holding the question, ``prompting``
(``"direct"`` or ``"cot"``), the extracted answer and the grade, and their ``condition`` a
:class:`~retrieval_heads.conditions.HeadAblation` (``k``, ``selection``, ``draw``, ``heads``,
``mode``, ``phase``). Record ids are ``"<question id>|<prompting>|<selection>|k=<K>|draw=<d>"``.

It never grades an answer itself (:mod:`retrieval_heads.questions` does), never chooses heads
(:mod:`retrieval_heads.selection` does) and imports torch and the model-side modules only inside
the functions that run a model.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval_heads import questions as questions_module
from retrieval_heads.questions import (
    KINDS,
    LETTERS,
    QAGrade,
    Question,
    QuestionError,
    extract_choice,
    extract_number,
    final_answer,
    grade_choice,
    grade_extractive,
    grade_numeric,
    grade_question,
    load_questions,
    parse_question,
    token_f1,
)

__all__ = [
    "COT_TRIGGER",
    "KINDS",
    "PROMPTINGS",
    "CotRun",
    "Generation",
    "QAGrade",
    "Question",
    "QuestionError",
    "build_prompt",
    "extract_choice",
    "extract_number",
    "final_answer",
    "format_summary",
    "generate",
    "grade_choice",
    "grade_extractive",
    "grade_numeric",
    "grade_question",
    "load_questions",
    "parse_question",
    "question_promptings",
    "run",
    "summarize",
    "token_f1",
]


PROMPTINGS = ("direct", "cot")
COT_TRIGGER = "Let's think step by step."

# Re-exports of the names questions.py took over (questions, their grading), for code written
# as ``cot.<name>``: the public ones are imported above, the module's constants and helpers
# follow.
F1_THRESHOLD = questions_module.F1_THRESHOLD  # retrieval_heads/questions.py
_NUMBER = questions_module._NUMBER  # retrieval_heads/questions.py
_MARKER = questions_module._MARKER  # retrieval_heads/questions.py
_parse_number = questions_module._parse_number  # retrieval_heads/questions.py
_format_number = questions_module._format_number  # retrieval_heads/questions.py
_choice_letter = questions_module._choice_letter  # retrieval_heads/questions.py
_normalize = questions_module._normalize  # retrieval_heads/questions.py


# ---------------------------------------------------------------------------------------------
# prompts and generation


def _body(question: Question) -> str:
    parts = []
    if question.context:
        parts.append(f"{question.context.strip()}\n")
    parts.append(f"Question: {question.question}")
    if question.choices:
        parts += [f"{LETTERS[i]}. {c}" for i, c in enumerate(question.choices)]
    return "\n".join(parts)


def build_prompt(
    question: Question, cot: bool, *, tokenizer: Any = None, chat: bool = False
) -> str:
    """The prompt text: the context, the question (and its choices), then ``"Answer:"`` (direct)
    or ``"Answer: Let's think step by step."`` (chain of thought). ``chat=True`` puts the same
    request in the user turn of ``tokenizer``'s chat template instead."""
    if not chat:
        return f"{_body(question)}\nAnswer:" + (f" {COT_TRIGGER}" if cot else "")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True needs a tokenizer with a chat template")
    ask = (
        f"{COT_TRIGGER} End with 'The answer is ...'."
        if cot
        else "Reply with the answer only, no explanation."
    )
    messages = [{"role": "user", "content": f"{_body(question)}\n\n{ask}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer: Any, text: str, *, chat: bool = False) -> list[int]:
    """Token ids of a prompt: with the tokenizer's special tokens (its BOS), except for chat
    templates, which write their own."""
    ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
    return [int(i) for i in ids]


@dataclass(frozen=True)
class Generation:
    ids: tuple[int, ...]
    text: str
    stopped_by: str  # "eos", "stop:<string>", "max_new_tokens", "n_ctx"


def generate(
    model: Any,
    prompt_ids: Sequence[int],
    *,
    hooks: Sequence[tuple[str, Any]] = (),
    prefill_hooks: Sequence[tuple[str, Any]] = (),
    max_new_tokens: int = 64,
    stop_strings: Sequence[str] = (),
) -> Generation:
    """Greedy decoding: prefill all but the last prompt token (with ``prefill_hooks``, none by
    default), then feed it and every generated token through ``model.step`` with ``hooks``, so
    a decode-phase ablation acts on every token of the answer. Stops at EOS, when the text
    contains a stop string (cut there), at ``max_new_tokens`` or at the model's context. The
    loop is :func:`retrieval_heads.decoding.greedy`."""
    import torch

    from retrieval_heads.decoding import greedy

    if len(prompt_ids) < 2:
        raise ValueError(
            "the prompt needs at least 2 tokens (the last one is the first decode step)"
        )
    if len(prompt_ids) > model.n_ctx:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model takes {model.n_ctx}")
    tokenizer = model.tokenizer
    eos = tokenizer.eos_token_id
    ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=model.device)
    budget = min(max_new_tokens, model.n_ctx - len(prompt_ids) + 1)
    text = ""  # the text of the tokens kept so far, cut at a stop string

    def stop(token: int, kept: list[int]) -> tuple[str, bool] | None:
        nonlocal text
        if eos is not None and token == eos:
            return "eos", False
        text = tokenizer.decode([*kept, token], skip_special_tokens=True)
        hit = [s for s in stop_strings if s and s in text]
        if not hit:
            return None
        first = min(hit, key=text.index)
        text = text[: text.index(first)]
        return f"stop:{first!r}", True

    out, stopped_by = greedy(
        model, ids, budget, stop, prefill_hooks=prefill_hooks, decode_hooks=hooks
    )
    if stopped_by is None:
        stopped_by = "n_ctx" if budget < max_new_tokens else "max_new_tokens"
    return Generation(tuple(out), text.strip(), stopped_by)


# ---------------------------------------------------------------------------------------------
# the experiment


@dataclass
class CotRun:
    """Records of a run and their summary (:func:`summarize`)."""

    records: list[Any]
    rows: dict[tuple[str, str], list[Any]]
    conditions: list[Any]
    notes: list[str]

    def table(self) -> str:
        return format_summary(self.rows)

    def accuracy(self, kind: str, prompting: str, selection: str, k: int) -> float:
        for row in self.rows[(kind, prompting)]:
            if row.selection == selection and row.k == k:
                return row.accuracy
        raise KeyError(f"no row for {kind}/{prompting}, selection {selection!r}, K={k}")


DIRECT_STOPS = ("\nQuestion:", "\n\n")
COT_STOPS = ("\nQuestion:", "\n\n\n")


def question_promptings(question: Question, prompting: Sequence[str]) -> list[str]:
    """The promptings to run ``question`` with: ``prompting``, or those of them the question
    names in its own ``"prompting"`` field (a string or a list), e.g. ``"cot"`` for a
    reasoning question and ``"direct"`` for a fact recalled from the weights."""
    own = question.meta.get("prompting")
    if own is None:
        return list(prompting)
    own = [own] if isinstance(own, str) else list(own)
    bad = [p for p in own if p not in PROMPTINGS]
    if bad:
        raise QuestionError(
            f"question {question.id!r}: prompting must be among {PROMPTINGS}, got {bad}"
        )
    return [p for p in prompting if p in own]


def run(
    model: Any,
    questions: Sequence[Question],
    scores: Any,
    ks: Iterable[int] = (0, 10),
    *,
    draws: int = 2,
    seed: int = 0,
    prompting: Sequence[str] = PROMPTINGS,
    mode: str = "uniform",
    phase: str = "decode",
    chat: bool = False,
    max_new_tokens: Mapping[str, int] | None = None,
    threshold: float = 0.1,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> CotRun:
    """Answer every question directly and with chain of thought, under every condition.

    Conditions (:func:`retrieval_heads.selection.plan_conditions`, matched-layer controls off):
    K=0 (nothing ablated), and for each K>0 the top-K heads of ``scores`` (a
    :class:`~retrieval_heads.scores.HeadScores` or ``[layer, head]`` array of this model) and
    ``draws`` seeded draws of K random heads scoring <= ``threshold``. ``mode`` and ``phase``
    are :func:`~retrieval_heads.interventions.ablate`'s (``"uniform"``/``"zero"``; phase
    ``"decode"``, the default: decode steps only, so the prompt is read intact and the answer
    is written without those heads; ``"all"``: the prompt too). ``max_new_tokens`` per prompting (default direct 24, cot 256). With ``out``, a
    resumable results directory (``kind="cot"``); a rerun skips the records already there.
    """
    from retrieval_heads import analysis
    from retrieval_heads.conditions import HeadAblation
    from retrieval_heads.interventions import ablate
    from retrieval_heads.records import TrialRecord
    from retrieval_heads.runner import Unit, run_sweep
    from retrieval_heads.selection import plan_conditions

    if mode not in ("uniform", "zero"):
        raise ValueError(f"mode must be 'uniform' or 'zero' (needle-free modes), got {mode!r}")
    bad = [p for p in prompting if p not in PROMPTINGS]
    if bad or not prompting:
        raise ValueError(f"prompting must be a non-empty subset of {PROMPTINGS}, got {prompting}")
    questions = list(questions)
    if not questions:
        raise ValueError("no questions")
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise ValueError("question ids repeat")
    budgets = {"direct": 24, "cot": 256, **dict(max_new_tokens or {})}
    table = analysis.score_table(scores)
    if table.shape != (model.n_layers, model.n_heads):
        raise ValueError(
            f"the scores are {table.shape[0]}x{table.shape[1]} heads, the model "
            f"{model.n_layers}x{model.n_heads}"
        )
    conditions, notes = plan_conditions(
        table, list(ks), draws=draws, seed=seed, threshold=threshold, include_matched=False
    )
    tokenizer = model.tokenizer
    ways = {q.id: question_promptings(q, prompting) for q in questions}
    prompts = {
        (q.id, p): encode_prompt(
            tokenizer, build_prompt(q, p == "cot", tokenizer=tokenizer, chat=chat), chat=chat
        )
        for q in questions
        for p in ways[q.id]
    }
    config = {
        "experiment": "cot",
        "questions": [q.to_dict() for q in questions],
        "prompting": list(prompting),
        "ks_requested": list(ks) if not isinstance(ks, list) else ks,
        "draws": draws,
        "seed": seed,
        "mode": mode,
        "phase": phase,
        "chat": chat,
        "threshold": threshold,
        "max_new_tokens": budgets,
        "conditions": [c.to_dict() for c in conditions],
        "notes": notes,
    }
    name = getattr(model, "name", None) or "model"
    built: dict[int, tuple[list, list]] = {}

    def run_unit(unit: Unit) -> TrialRecord:
        (q, p), (position, condition) = unit.item, unit.condition
        if position not in built:  # a condition's hooks, built when its first unit runs
            hooks: tuple[list, list] = ([], [])
            if condition.heads:
                ablation = ablate(model, list(condition.heads), mode, phase=phase)
                hooks = (ablation.prefill_hooks(model), ablation.decode_hooks(model))
            built[position] = hooks
        prefill_hooks, decode_hooks = built[position]
        began = time.perf_counter()
        gen = generate(
            model,
            prompts[(q.id, p)],
            prefill_hooks=prefill_hooks,
            hooks=decode_hooks,
            max_new_tokens=budgets[p],
            stop_strings=DIRECT_STOPS if p == "direct" else COT_STOPS,
        )
        verdict = grade_question(q, gen.text, cot=p == "cot")
        params = {
            "task": "cot",
            "question_id": q.id,
            "kind": q.kind,
            "prompting": p,
            "extracted": verdict.extracted,
            "score": verdict.score,
            "grade_reason": verdict.reason,
            "prompt_tokens": len(prompts[(q.id, p)]),
            "stopped_by": gen.stopped_by,
        }
        return TrialRecord(
            trial_id=unit.record_id,
            params=params,
            expected=" | ".join(q.answers),
            generated_ids=list(gen.ids),
            generated_text=gen.text,
            passed=verdict.passed,
            recall=float(verdict.score),
            reason=None if verdict.passed else verdict.reason,
            scores={},  # no head scores: nothing is copied from a context
            copy_events=[],
            n_layers=model.n_layers,
            n_heads=model.n_heads,
            elapsed_s=round(time.perf_counter() - began, 4),
            condition=HeadAblation.of(condition, mode, phase),
        )

    units = [
        Unit(f"{q.id}|{p}|{condition.tag}", (q, p), (position, condition))
        for position, condition in enumerate(conditions)
        for q in questions
        for p in ways[q.id]
    ]
    final = run_sweep(
        units,
        run_unit,
        out=out,
        model=name,
        kind="cot",
        config=config,
        seed=seed,
        overwrite=overwrite,
        progress="cot" if progress else False,
    )
    return CotRun(final, summarize(final), conditions, notes)


def summarize(records: Iterable[Any]) -> dict[tuple[str, str], list[Any]]:
    """``{(kind, prompting): [KSweepRow, ...]}`` plus ``("all", prompting)`` over every kind:
    accuracy (share passed) and mean score per K and selection, mean ± std over draws."""
    from retrieval_heads import analysis

    groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for r in records:
        groups[(r.params["kind"], r.params["prompting"])].append(r)
        groups[("all", r.params["prompting"])].append(r)
    order = {k: i for i, k in enumerate((*KINDS, "all"))}
    porder = {p: i for i, p in enumerate(PROMPTINGS)}
    keys = sorted(groups, key=lambda kp: (order.get(kp[0], 99), porder.get(kp[1], 99)))
    return {key: analysis.summarise_k_sweep(groups[key]) for key in keys}


def format_summary(rows: Mapping[tuple[str, str], Sequence[Any]]) -> str:
    """The summary as a fixed-width table: kind, prompting, K, selection, draws, answers,
    accuracy and mean score (± std over draws)."""
    from retrieval_heads import analysis

    body = [
        [kind, prompting, *analysis.k_sweep_cells(r)]
        for (kind, prompting), group in rows.items()
        for r in group
    ]
    headers = ["kind", "prompting", "K", "selection", "draws", "answers", "accuracy", "score"]
    return analysis.format_table(body, headers)
