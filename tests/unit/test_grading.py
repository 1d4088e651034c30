"""Answer grading: ROUGE-1 recall as in the paper, RULER's string match, failure kinds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval_heads.grading import (
    FAILURE_KINDS,
    Grade,
    _shares_content_word,
    classify_failure,
    exact_match,
    grade,
    rouge1_recall,
    string_match_all,
)

ANSWER = "under the blue flowerpot beside the gate"


def test_rouge1_recall_with_stemming():
    assert rouge1_recall(ANSWER, ANSWER) == 1.0
    # "flowerpots" stems to "flowerpot": stemming is on, as in the paper.
    assert rouge1_recall("Under the blue flowerpots beside the gate.", ANSWER) == 1.0
    assert rouge1_recall("It is under the red flowerpot.", ANSWER) == pytest.approx(3 / 7)
    assert rouge1_recall("", ANSWER) == 0.0
    assert rouge1_recall("7083419", "7083419") == 1.0
    assert rouge1_recall("anything", "!!!") == 0.0  # no ROUGE tokens: verbatim containment
    assert rouge1_recall("it says !!!", "!!!") == 1.0


def test_grade_passes_at_threshold():
    g = grade("The key is under the blue flowerpot by the gate.", ANSWER)
    assert isinstance(g, Grade)
    assert g.passed and g.recall == pytest.approx(6 / 7) and not g.exact and g.substring == 0.0
    assert ">= 0.50" in g.reason
    half = "under the blue flowerpot"  # 4 of 7 words
    assert grade(half, ANSWER).passed
    assert not grade(half, ANSWER, threshold=0.6).passed
    assert "< 0.60" in grade(half, ANSWER, threshold=0.6).reason
    assert not grade("the gate", ANSWER).passed  # 2 of 7 (with "the" counted twice in the answer)
    exact = grade("Under the blue flowerpot, beside the gate!", ANSWER)
    assert exact.exact and exact.passed and exact.substring == 0.0


def test_exact_and_substring():
    assert exact_match(" 7083419. ", "7083419")
    assert not exact_match("It is 7083419", "7083419")
    assert string_match_all("It is 7083419.", "7083419") == 1.0
    assert string_match_all("the Silver GANNET", "the Silver Gannet") == 1.0
    assert string_match_all("1 and 3", ["1", "2", "3", "4"]) == 0.5
    assert grade("It is 7083419.", "7083419", metric="substring").passed
    assert not grade("It is 7083419.", "7083419", metric="exact").passed
    assert grade("7083419", "7083419", metric="exact").reason == "exact match"


def test_several_answers():
    answers = ["4345119", "7774476", "1975592"]
    g = grade("4345119, 7774476", answers)
    assert g.recall == pytest.approx(2 / 3) and g.substring == pytest.approx(2 / 3) and g.passed
    assert grade("4345119 7774476 1975592", answers).exact


def test_bad_arguments():
    with pytest.raises(ValueError, match="metric"):
        grade("x", "x", metric="bleu")
    with pytest.raises(ValueError, match="threshold"):
        grade("x", "x", threshold=1.5)
    with pytest.raises(ValueError, match="non-empty"):
        grade("x", [])


def test_classify_failure():
    context = "The fishing boat leaves the harbour first. The key to the shed is under the pot."
    assert classify_failure(ANSWER, ANSWER) == "correct"
    assert classify_failure("", ANSWER) == "empty"
    assert classify_failure("...!?", ANSWER) == "empty"
    assert classify_failure("gate gate gate gate", ANSWER) == "empty"
    assert classify_failure("7774476", "4345119", distractor_answers=["7774476"]) == "distractor"
    assert classify_failure("7774476", "4345119", distractor_answers=["1"]) == "not_in_context"
    assert classify_failure("the gate", ANSWER) == "partial"
    assert classify_failure("the fishing boat", "4345119", context=context) == "in_context"
    assert classify_failure("a purple zebra", "4345119", context=context) == "not_in_context"
    assert classify_failure("a purple zebra", "4345119") == "not_in_context"


@settings(max_examples=50, deadline=None, derandomize=True)
@given(prediction=st.text(max_size=40), answer=st.text(min_size=1, max_size=20))
def test_grading_never_crashes(prediction, answer):
    g = grade(prediction, answer)
    assert 0.0 <= g.recall <= 1.0 and g.substring in (0.0, 1.0)
    assert classify_failure(prediction, answer, distractor_answers=[answer[::-1]]) in FAILURE_KINDS
    if answer.casefold() in prediction.casefold():
        assert g.substring == 1.0


def test_an_answer_cut_by_the_budget_is_its_own_failure():
    """A chat model restating the question, stopped at the token budget, is not a partial
    retrieval: it is cut off. A finished wrong answer stays partial; a passing one is correct."""
    restated = "The key to the garden shed is hidden under the"
    assert classify_failure(restated, ANSWER) == "partial"
    assert classify_failure(restated, ANSWER, stopped_by="max_new_tokens") == "cut_off"
    assert classify_failure(restated, ANSWER, stopped_by="stop") == "partial"
    assert classify_failure(ANSWER, ANSWER, stopped_by="max_new_tokens") == "correct"
    # a distractor's answer is a distractor, however the decoding ended
    assert (
        classify_failure("the red kettle", ANSWER, distractor_answers=["the red kettle"],
                         stopped_by="max_new_tokens")
        == "distractor"
    )  # fmt: skip
    assert "cut_off" in FAILURE_KINDS


def test_function_words_alone_do_not_make_a_partial_answer():
    """SmolLM2 restating the question and naming the wrong place shares only "the" with the
    answer: a made-up or misplaced answer, not a partial one."""
    wrong = "The key to the garden shed hidden is the kitchen."
    assert rouge1_recall(wrong, ANSWER) > 0  # ROUGE sees "the"
    assert classify_failure(wrong, ANSWER) == "not_in_context"
    context = "Nobody hides the key to the garden shed in the kitchen."
    assert classify_failure(wrong, ANSWER, context=context) == "in_context"
    assert classify_failure("beside the old gate", ANSWER) == "partial"  # "gate" is the answer's
    # an answer of function words only: those are its content
    assert _shares_content_word("the end", "of the") and not _shares_content_word("end", "of the")
