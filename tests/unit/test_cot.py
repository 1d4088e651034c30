"""The chain-of-thought harness without a model: graders, prompts and the question loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrieval_heads import cot
from retrieval_heads.cot import (
    Question,
    QuestionError,
    build_prompt,
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

SHIPPED = Path(__file__).resolve().parents[2] / "experiments" / "questions.jsonl"
CHOICES = ["London", "Paris", "Rome", "Oslo"]


# ---------------------------------------------------------------------------------------------
# numeric (GSM8K-style)


@pytest.mark.parametrize(
    ("text", "cot_", "want"),
    [
        ("7 trays of 8 is 56, minus 5 is 51. The answer is 51.", True, 51),
        ("7 x 8 = 56 rolls, 56 - 5 = 51 rolls", True, 51),  # no marker: the last number
        ("The answer is 51 (7 x 8 - 5).", True, 51),  # after the marker: the first number
        ("51 rolls. Then on Tuesday it bakes 3 more", False, 51),  # direct: the first number
        ("The answer is $1,250.", True, 1250),
        ("It loses -3.5 degrees", True, -3.5),
        ("Final answer: 9", True, 9),
        ("she counts 1,2,3 then stops at 7", True, 7),  # "1,2,3" is not one thousand-number
    ],
)
def test_extract_number(text, cot_, want):
    assert extract_number(text, cot_) == pytest.approx(want)


def test_extract_number_none():
    assert extract_number("no digits here", True) is None
    assert extract_number("w15 w36 x2", True) is None  # digits inside words are not numbers
    assert grade_numeric("no digits here", "5").passed is False
    assert grade_numeric("no digits here", "5").extracted is None


def test_grade_numeric():
    ok = grade_numeric("So the answer is 18.", "18")
    assert ok.passed and ok.score == 1.0 and ok.extracted == "18"
    assert grade_numeric("So the answer is 18.0", 18).passed
    bad = grade_numeric("The answer is 17.", "18")
    assert not bad.passed and bad.score == 0.0 and bad.extracted == "17"
    with pytest.raises(ValueError, match="not a number"):
        grade_numeric("18", "eighteen")


# ---------------------------------------------------------------------------------------------
# choice (MMLU-style)


@pytest.mark.parametrize(
    ("text", "cot_", "want"),
    [
        ("B", False, "B"),
        ("B. Paris", False, "B"),
        ("(C) Rome", False, "C"),
        ("A farmer would say Paris, so the answer is (B).", True, "B"),
        ("Let us see. The answer is: D", True, "D"),
        ("Paris is the capital of France.", False, "B"),  # the text of one choice
        ("London or Paris, hard to say", False, None),  # two choices: unclear
        ("I do not know", False, None),
        ("The answer is E", True, None),  # E is not among four choices
    ],
)
def test_extract_choice(text, cot_, want):
    assert extract_choice(text, CHOICES, cot=cot_) == want


def test_grade_choice():
    assert grade_choice("The answer is (B).", "B", CHOICES).passed
    miss = grade_choice("The answer is (C).", "B", CHOICES)
    assert not miss.passed and miss.extracted == "C"
    assert grade_choice("b", "B", 4, cot=False).passed is False  # lower case is not a letter


# ---------------------------------------------------------------------------------------------
# extractive (MuSiQue-style)


def test_token_f1():
    assert token_f1("the Old Harbour!", "old harbour") == 1.0  # articles, case, punctuation
    assert token_f1("old harbour gate", "old harbour") == pytest.approx(0.8)
    assert token_f1("", "old harbour") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("cat", "dog") == 0.0


def test_grade_extractive():
    g = grade_extractive("It was built there, so the answer is the Marlow canal.", "Marlow canal")
    assert g.passed and g.score == 1.0 and g.extracted == "the Marlow canal"
    aliases = grade_extractive("Marlow", ["the Marlow canal", "Marlow"], cot=False)
    assert aliases.passed and aliases.score == 1.0
    # A sentence that contains the answer passes, whatever its F1 (chat models answer so) ...
    long = grade_extractive("near the old harbour in the north of the town", "old harbour")
    assert long.passed and 0 < long.score < 0.5 and long.reason.startswith("contains")
    sentence = grade_extractive("The capital of Canada is Ottawa.", "Ottawa", cot=False)
    assert sentence.passed and sentence.score < 0.5
    # ... as whole words only, and a wrong sentence still fails
    assert not grade_extractive("Ottawas are a family of rivers", "Ottawa", cot=False).passed
    assert not grade_extractive("It was John F. Kennedy.", "George Washington", cot=False).passed
    near = grade_extractive("a harbour in the north, far from the old town", "old harbour")
    assert not near.passed and 0 < near.score < 0.5  # both words, not the answer: F1 decides


def test_final_answer_segments():
    assert final_answer("step one\nstep two\nThe answer is 4.\nmore") == ("4.", True)
    assert final_answer("first line\nlast line", cot=True) == ("last line", False)
    assert final_answer("first line\nlast line", cot=False) == ("first line", False)
    assert final_answer("   ") == ("", False)


def test_grading_is_deterministic_and_by_kind():
    q = parse_question({"kind": "numeric", "question": "2+2?", "answer": 4})
    assert grade_question(q, "The answer is 4") == grade_question(q, "The answer is 4")
    c = parse_question({"kind": "choice", "question": "?", "choices": CHOICES, "answer": "Paris"})
    assert c.answer == "B" and grade_question(c, "(B)", cot=False).passed
    e = parse_question({"kind": "extractive", "question": "?", "answer": ["x y", "z"]})
    assert e.answers == ("x y", "z") and grade_question(e, "z", cot=False).passed


# ---------------------------------------------------------------------------------------------
# prompts


def test_prompts_differ_only_by_the_trigger():
    q = parse_question(
        {"kind": "choice", "question": "Capital of France?", "choices": CHOICES, "answer": "B"}
    )
    direct, chain = build_prompt(q, False), build_prompt(q, True)
    assert direct.endswith("\nAnswer:") and "A. London\nB. Paris" in direct
    assert chain == direct + " " + cot.COT_TRIGGER
    ctx = parse_question({"kind": "extractive", "question": "Q?", "context": "C.", "answer": "a"})
    assert build_prompt(ctx, False).startswith("C.\n\nQuestion: Q?")
    with pytest.raises(ValueError, match="chat template"):
        build_prompt(q, True, chat=True)


# ---------------------------------------------------------------------------------------------
# the loader


def write(tmp_path: Path, lines: list) -> Path:
    path = tmp_path / "q.jsonl"
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n",
        encoding="utf-8",
    )
    return path


GOOD = {"id": "a", "kind": "numeric", "question": "1+1?", "answer": "2"}


def test_shipped_question_set():
    questions = load_questions(SHIPPED)
    assert len(questions) == 12
    kinds = [q.kind for q in questions]
    assert {k: kinds.count(k) for k in cot.KINDS} == {"numeric": 4, "choice": 4, "extractive": 4}
    assert len({q.id for q in questions}) == 12
    assert all(q.context for q in questions if q.kind == "extractive")
    assert all(q.answer in "ABCD" and len(q.choices) == 4 for q in questions if q.kind == "choice")


REAL_SET = Path(__file__).resolve().parents[2] / "experiments" / "questions" / "cot_vs_facts.jsonl"


def test_real_model_question_set_pairs_reasoning_with_recall():
    """40 arithmetic questions answered step by step, 40 facts answered directly from the
    weights (no context): the paper's chain-of-thought vs parametric comparison."""
    questions = load_questions(REAL_SET)
    ways = {q.id: cot.question_promptings(q, cot.PROMPTINGS) for q in questions}
    numeric = [q for q in questions if q.kind == "numeric"]
    facts = [q for q in questions if q.kind == "extractive"]
    assert len(numeric) == 40 and len(facts) == 40 and len(questions) == 80
    assert all(ways[q.id] == ["cot"] for q in numeric)
    assert all(ways[q.id] == ["direct"] and q.context is None for q in facts)
    assert len({q.id for q in questions}) == 80


def test_question_promptings_restrict_and_refuse():
    q = parse_question({**GOOD, "prompting": "cot"})
    assert cot.question_promptings(q, ["direct", "cot"]) == ["cot"]
    assert cot.question_promptings(q, ["direct"]) == []
    assert cot.question_promptings(parse_question(GOOD), ["direct", "cot"]) == ["direct", "cot"]
    with pytest.raises(cot.QuestionError, match="prompting must be among"):
        cot.question_promptings(parse_question({**GOOD, "prompting": ["think"]}), ["cot"])


def test_loader_reads_defaults_and_keeps_extra_fields(tmp_path):
    path = write(
        tmp_path,
        [
            "# a comment",
            GOOD,
            "",
            {"kind": "extractive", "question": "Q?", "answer": "x", "source": "mine"},
        ],
    )
    a, b = load_questions(path)
    assert isinstance(a, Question) and a.answer == "2" and a.id == "a"
    assert b.id == "line4" and b.meta == {"source": "mine"} and b.context is None


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ({"kind": "numeric", "question": "Q?"}, r"missing field\(s\) \['answer'\]"),
        ({"kind": "essay", "question": "Q?", "answer": "x"}, "kind must be one of"),
        ({"kind": "numeric", "question": "  ", "answer": "1"}, "question must be"),
        ({"kind": "numeric", "question": "Q?", "answer": "many"}, "must be a number"),
        ({"kind": "choice", "question": "Q?", "answer": "A"}, "choices must be"),
        ({"kind": "choice", "question": "Q?", "choices": ["x", "y"], "answer": "C"}, "neither"),
        ({"kind": "numeric", "question": "Q?", "answer": "1", "choices": ["a"]}, "only for kind"),
        ({"kind": "extractive", "question": "Q?", "answer": []}, "empty list"),
        ({"kind": "extractive", "question": "Q?", "answer": "x", "context": 3}, "context must"),
        ({"id": "a|b", "kind": "numeric", "question": "Q?", "answer": "1"}, "id must be"),
        (GOOD, "id 'a' is already used on line 1"),
    ],
)
def test_loader_names_the_bad_line(tmp_path, bad, message):
    path = write(tmp_path, [GOOD, bad])
    with pytest.raises(QuestionError, match=message) as info:
        load_questions(path)
    assert f"{path}, line 2: " in str(info.value)


def test_loader_rejects_empty_and_missing_files(tmp_path):
    with pytest.raises(QuestionError, match="holds no questions"):
        load_questions(write(tmp_path, ["", "# nothing"]))
    with pytest.raises(QuestionError, match="cannot read"):
        load_questions(tmp_path / "absent.jsonl")


def test_question_round_trips_through_to_dict():
    q = parse_question(
        {"id": "x", "kind": "choice", "question": "Q?", "choices": CHOICES, "answer": "rome"}
    )
    assert parse_question(q.to_dict()) == q


def test_cot_keeps_every_name_questions_took_over():
    """``cot.<name>`` and ``from retrieval_heads.cot import <name>`` still give the questions and
    graders now living in ``questions.py``, the same objects, and ``cot`` stays torch-free."""
    import subprocess
    import sys

    from retrieval_heads import questions

    moved = [*questions.__all__, "LETTERS", "F1_THRESHOLD", "_normalize", "_parse_number"]
    for name in [*moved, "_format_number", "_choice_letter", "_NUMBER", "_MARKER"]:
        assert getattr(cot, name) is getattr(questions, name), name
    assert set(questions.__all__) <= set(cot.__all__)
    code = "import sys, retrieval_heads.cot\nprint('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"
