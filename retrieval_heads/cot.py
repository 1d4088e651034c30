"""Chain-of-thought vs direct answers under retrieval-head ablation, for real models.

Wu et al. (2024, section 5) report that masking retrieval heads leaves a model's direct answers to
knowledge questions (MMLU without chain of thought) largely intact, but hurts answers that must
re-read the prompt: chain-of-thought reasoning (GSM8K, MMLU with CoT) and extractive QA over a
given context (MuSiQue). This module is the harness for that experiment on any model:

- :func:`load_questions` reads a JSONL file of questions (one object per line; a bad line raises
  :class:`QuestionError` naming the file and the line)::

      {"id": "apples", "kind": "numeric", "question": "...", "answer": "18"}
      {"kind": "choice", "question": "...", "choices": ["...", "...", "...", "..."], "answer": "B"}
      {"kind": "extractive", "context": "...", "question": "...", "answer": "the harbour"}

  ``kind`` is ``"numeric"`` (GSM8K-style), ``"choice"`` (MMLU-style: ``choices`` and an answer
  letter, or the text of one choice) or ``"extractive"`` (MuSiQue-style: an optional
  ``context``; ``answer`` may be a list of aliases). ``id`` defaults to ``"line<N>"``; any other
  field is kept in :attr:`Question.meta`.
- :func:`build_prompt` writes each question twice: direct (``"Answer:"``) and with the
  chain-of-thought trigger (``"Answer: Let's think step by step."``), or through the model's
  chat template (``chat=True``);
- :func:`run` answers every question both ways, greedily (:func:`generate`: ``model.prefill``
  then ``model.step``), with nothing ablated, the top-K retrieval heads ablated, and K random
  non-retrieval heads ablated (``draws`` seeded draws; hooks from
  :func:`retrieval_heads.interventions.ablate`), into a resumable results directory;
- graders, plain strings in and a :class:`QAGrade` out (no model, no torch):
  :func:`grade_numeric` (the last number, or the first after "the answer is"),
  :func:`grade_choice` (the chosen letter), :func:`grade_extractive` (SQuAD token F1 >= 0.5);
- :func:`summarize` / :func:`format_summary`: accuracy per kind x prompting x condition, mean ±
  std over random draws (:func:`retrieval_heads.analysis.summarise_k_sweep` on each group).

Records are :class:`~retrieval_heads.records.TrialRecord` s (``kind="cot"`` results directory;
zero score tables, no copy events), their ``params`` holding the question, ``prompting``
(``"direct"`` or ``"cot"``), the condition (``k``, ``selection``, ``draw``, ``ablated``,
``mode``, ``phase``), the extracted answer and the grade. Record ids are
``"<question id>|<prompting>|<selection>|k=<K>|draw=<d>"``.
"""

from __future__ import annotations

import json
import math
import re
import string
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

KINDS = ("numeric", "choice", "extractive")
PROMPTINGS = ("direct", "cot")
COT_TRIGGER = "Let's think step by step."
LETTERS = "ABCDEFGHIJ"
F1_THRESHOLD = 0.5


class QuestionError(ValueError):
    """A question file or record is malformed; the message names the file and line."""


# ---------------------------------------------------------------------------------------------
# questions


@dataclass(frozen=True)
class Question:
    """One question. ``answer`` is normalised: a number's text for ``"numeric"``, a letter for
    ``"choice"``; ``answers`` holds every accepted answer (aliases, for ``"extractive"``)."""

    id: str
    question: str
    kind: str
    answers: tuple[str, ...]
    context: str | None = None
    choices: tuple[str, ...] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def answer(self) -> str:
        return self.answers[0]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "kind": self.kind, "question": self.question}
        if self.context is not None:
            out["context"] = self.context
        if self.choices is not None:
            out["choices"] = list(self.choices)
        out["answer"] = self.answer if len(self.answers) == 1 else list(self.answers)
        return {**out, **dict(self.meta)}


# a number not glued to a word before it ("w15", "x2" are not numbers); "1,234" is one number
_NUMBER = re.compile(r"(?<![A-Za-z_\d.])-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _parse_number(text: str) -> float | None:
    """A number written in ``text`` ("1,234", "$18", "-2.5", "3."), or None."""
    cleaned = text.strip().replace("$", "").replace(",", "").rstrip(".").strip()
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _choice_letter(answer: str, choices: Sequence[str]) -> str | None:
    letters = LETTERS[: len(choices)]
    text = answer.strip()
    bare = text.strip("().: ").upper()
    if len(bare) == 1 and bare in letters:
        return bare
    matches = [i for i, c in enumerate(choices) if _normalize(c) == _normalize(text)]
    return letters[matches[0]] if len(matches) == 1 else None


def parse_question(data: Any, where: str = "question", default_id: str = "q") -> Question:
    """Validate one question object (see the module docstring); errors start with ``where``."""

    def fail(message: str) -> QuestionError:
        return QuestionError(f"{where}: {message}")

    if not isinstance(data, Mapping):
        raise fail(f"expected a JSON object, got {type(data).__name__}")
    missing = [k for k in ("question", "answer", "kind") if k not in data]
    if missing:
        raise fail(f"missing field(s) {missing} (a question needs question, answer and kind)")
    kind = data["kind"]
    if kind not in KINDS:
        raise fail(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    question = data["question"]
    if not isinstance(question, str) or not question.strip():
        raise fail("question must be a non-empty string")
    qid = data.get("id", default_id)
    if isinstance(qid, int) and not isinstance(qid, bool):
        qid = str(qid)
    if not isinstance(qid, str) or not qid.strip() or "|" in qid:
        raise fail(f"id must be a non-empty string without '|', got {qid!r}")
    context = data.get("context")
    if context is not None and not isinstance(context, str):
        raise fail(f"context must be a string, got {type(context).__name__}")
    choices = data.get("choices")
    if kind == "choice":
        if (
            not isinstance(choices, list)
            or not 2 <= len(choices) <= len(LETTERS)
            or not all(isinstance(c, str) and c.strip() for c in choices)
        ):
            raise fail(f"choices must be a list of 2 to {len(LETTERS)} non-empty strings")
        choices = tuple(choices)
    elif choices is not None:
        raise fail(f"choices are only for kind 'choice', not {kind!r}")
    raw = data["answer"]
    raw_list = raw if isinstance(raw, list) and kind == "extractive" else [raw]
    if not raw_list:
        raise fail("answer is an empty list")
    answers: list[str] = []
    for value in raw_list:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise fail(f"answer must be a string or a number, got {value!r}")
        text = str(value).strip()
        if not text:
            raise fail("answer is empty")
        if kind == "numeric":
            number = _parse_number(text)
            if number is None:
                raise fail(f"a numeric answer must be a number, got {value!r}")
            text = _format_number(number)
        elif kind == "choice":
            assert choices is not None
            letter = _choice_letter(text, choices)
            if letter is None:
                raise fail(
                    f"answer {value!r} is neither a letter among {LETTERS[: len(choices)]} nor "
                    "the text of exactly one choice"
                )
            text = letter
        answers.append(text)
    known = {"id", "kind", "question", "answer", "context", "choices"}
    meta = {k: v for k, v in data.items() if k not in known}
    return Question(qid.strip(), question.strip(), kind, tuple(answers), context, choices, meta)


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def load_questions(path: str | Path) -> list[Question]:
    """Questions from a JSONL file: one object per line, blank lines and ``#`` lines skipped.

    Raises :class:`QuestionError` naming the file and line for invalid JSON, a missing or bad
    field, or an id used twice; and for a file with no questions.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QuestionError(f"cannot read question file {path}: {exc}") from exc
    out: list[Question] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}, line {number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QuestionError(
                f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from exc
        q = parse_question(data, where, default_id=f"line{number}")
        if q.id in seen:
            raise QuestionError(f"{where}: id {q.id!r} is already used on line {seen[q.id]}")
        seen[q.id] = number
        out.append(q)
    if not out:
        raise QuestionError(f"question file {path} holds no questions")
    return out


# ---------------------------------------------------------------------------------------------
# grading


@dataclass(frozen=True)
class QAGrade:
    """``passed``; ``score`` (1/0, or the token F1 for extractive answers); ``extracted``: the
    answer read from the text (None when none could be read); ``reason`` in words."""

    passed: bool
    score: float
    extracted: str | None
    reason: str


_MARKER = re.compile(r"(?:final\s+)?answer\s*(?:is|:|=)\s*:?", re.IGNORECASE)


def final_answer(text: str, cot: bool = True) -> tuple[str, bool]:
    """``(segment, marked)``: where the answer is in a generation.

    After the last "answer is" / "answer:" (to the end of its line) when there is one
    (``marked``); otherwise the last non-empty line for chain-of-thought text, the first for a
    direct answer.
    """
    matches = list(_MARKER.finditer(text))
    if matches:
        rest = text[matches[-1].end() :]
        line = rest.strip().splitlines()[0] if rest.strip() else ""
        return line.strip(), True
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "", False
    return (lines[-1] if cot else lines[0]), False


def extract_number(text: str, cot: bool = True) -> float | None:
    """The answer number: the first after an answer marker, else the last (CoT) or first
    (direct) number of the text's answer segment (:func:`final_answer`), else of the text."""
    segment, marked = final_answer(text, cot)
    for source, first in ((segment, marked or not cot), (text, not cot)):
        found = [_parse_number(m.group()) for m in _NUMBER.finditer(source)]
        found = [x for x in found if x is not None]
        if found:
            return found[0] if first else found[-1]
    return None


def grade_numeric(prediction: str, answer: str | float, *, cot: bool = True) -> QAGrade:
    """GSM8K-style: the extracted number equals ``answer`` (to 1e-6, relative)."""
    want = _parse_number(str(answer))
    if want is None:
        raise ValueError(f"the reference answer {answer!r} is not a number")
    got = extract_number(prediction, cot)
    if got is None:
        return QAGrade(False, 0.0, None, "no number in the answer")
    ok = math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)
    shown = _format_number(got)
    return QAGrade(ok, float(ok), shown, f"{shown} {'==' if ok else '!='} {_format_number(want)}")


def extract_choice(text: str, choices: Sequence[str] | int = 4, *, cot: bool = True) -> str | None:
    """The chosen letter: after an answer marker, else a leading letter ("B", "(B)", "B."),
    else the last "(X)", else the one choice whose text the answer contains. None if unclear."""
    n = choices if isinstance(choices, int) else len(choices)
    letters = LETTERS[:n]
    letter_re = re.compile(rf"(?<![A-Za-z])\(?([{letters}])\)?(?![A-Za-z'])")
    segment, marked = final_answer(text, cot)
    if marked:
        m = letter_re.search(segment)
        if m:
            return m.group(1)
    stripped = text.strip()
    m = re.match(rf"\(?([{letters}])(?:[).:,]|\s|$)", stripped)
    if m and not (m.group(1) == "A" and re.match(r"A\s+[a-z]", stripped)):
        return m.group(1)
    parens = re.findall(rf"\(([{letters}])\)", text)
    if parens:
        return parens[-1]
    if not isinstance(choices, int):
        body = _normalize(segment if marked else text)
        hits = [i for i, c in enumerate(choices) if _normalize(c) and _normalize(c) in body]
        if len(hits) == 1:
            return letters[hits[0]]
    return None


def grade_choice(
    prediction: str, answer: str, choices: Sequence[str] | int = 4, *, cot: bool = True
) -> QAGrade:
    """MMLU-style: the extracted letter equals ``answer`` (a letter)."""
    got = extract_choice(prediction, choices, cot=cot)
    if got is None:
        return QAGrade(False, 0.0, None, "no choice letter in the answer")
    ok = got == answer.strip().upper()
    return QAGrade(ok, float(ok), got, f"chose {got}, the answer is {answer}")


def _normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD token F1 between normalised prediction and answer (1.0 when both are empty)."""
    pred, gold = _normalize(prediction).split(), _normalize(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def grade_extractive(
    prediction: str,
    answer: str | Sequence[str],
    *,
    cot: bool = True,
    threshold: float = F1_THRESHOLD,
) -> QAGrade:
    """Extractive QA (and facts from the weights): passes when the answer segment's best token
    F1 against any alias reaches ``threshold`` (default 0.5), or when the segment contains an
    alias as whole words after SQuAD's normalisation. A chat model answers in a sentence ("The
    capital of Canada is Ottawa."), whose F1 against "Ottawa" is 0.33 although it is right."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    segment, _ = final_answer(prediction, cot)
    segment = segment.rstrip(".")
    best = max(token_f1(segment, a) for a in answers)
    padded = f" {_normalize(segment)} "
    contained = [a for a in answers if _normalize(a) and f" {_normalize(a)} " in padded]
    if contained:
        return QAGrade(True, best, segment, f"contains {contained[0]!r} (token F1 {best:.2f})")
    ok = best >= threshold
    return QAGrade(ok, best, segment, f"token F1 {best:.2f} {'>=' if ok else '<'} {threshold:.2f}")


def grade_question(question: Question, prediction: str, *, cot: bool = True) -> QAGrade:
    """Grade ``prediction`` by the question's kind."""
    if question.kind == "numeric":
        return grade_numeric(prediction, question.answer, cot=cot)
    if question.kind == "choice":
        assert question.choices is not None
        return grade_choice(prediction, question.answer, question.choices, cot=cot)
    return grade_extractive(prediction, question.answers, cot=cot)


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
                ablation = ablate(model, list(condition.heads), mode, phase=phase)  # type: ignore[arg-type]  # checked by ablate
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
