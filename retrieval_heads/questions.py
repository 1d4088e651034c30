"""Questions for the chain-of-thought experiment, and the grading of free-text answers to them.

:func:`load_questions` reads a JSONL file of questions (one object per line; a bad line raises
:class:`QuestionError` naming the file and the line); :func:`parse_question` validates one::

    {"id": "apples", "kind": "numeric", "question": "...", "answer": "18"}
    {"kind": "choice", "question": "...", "choices": ["...", "...", "...", "..."], "answer": "B"}
    {"kind": "extractive", "context": "...", "question": "...", "answer": "the harbour"}

``kind`` is ``"numeric"`` (GSM8K-style), ``"choice"`` (MMLU-style: ``choices`` and an answer
letter, or the text of one choice) or ``"extractive"`` (MuSiQue-style: an optional ``context``;
``answer`` may be a list of aliases). ``id`` defaults to ``"line<N>"``; any other field is kept
in :attr:`Question.meta`.

Graders, plain strings in and a :class:`QAGrade` out: :func:`grade_numeric` (the last number, or
the first after "the answer is"), :func:`grade_choice` (the chosen letter),
:func:`grade_extractive` (SQuAD token F1 >= 0.5, or the answer contained as whole words), and
:func:`grade_question`, which picks one by the question's kind; :func:`final_answer`,
:func:`extract_number`, :func:`extract_choice` and :func:`token_f1` are their parts.

It never loads or runs a model, never imports torch, and never builds prompts or runs the
experiment (:mod:`retrieval_heads.cot` does, and re-exports every name here).
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "KINDS",
    "QAGrade",
    "Question",
    "QuestionError",
    "extract_choice",
    "extract_number",
    "final_answer",
    "grade_choice",
    "grade_extractive",
    "grade_numeric",
    "grade_question",
    "load_questions",
    "parse_question",
    "token_f1",
]

KINDS = ("numeric", "choice", "extractive")
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
