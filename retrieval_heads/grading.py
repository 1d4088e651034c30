"""Answer grading: did the model reproduce the needle's answer?

The paper (Wu et al. 2024) counts a trial as retrieved when the ROUGE-1 recall (with stemming) of
the generated text against the answer span is at least 50%; we use the same ``rouge-score``
package so numbers are comparable. RULER's ``string_match_all`` (the share of reference answers
found verbatim, case-insensitive) and an exact match are reported alongside, since recall alone
forgives extra words and a model that lists every number in the context scores full recall.

Everything here takes plain strings, so results and analyses can re-grade without a model.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_THRESHOLD",
    "FAILURE_KINDS",
    "Grade",
    "classify_failure",
    "exact_match",
    "grade",
    "rouge1_recall",
    "string_match_all",
]

DEFAULT_THRESHOLD = 0.5
METRICS = ("recall", "substring", "exact")
#: What :func:`classify_failure` can return.
FAILURE_KINDS = (
    "correct",
    "empty",
    "distractor",
    "cut_off",
    "partial",
    "in_context",
    "not_in_context",
)
#: How a decode loop says the answer ran into its token budget.
BUDGET_STOP = "max_new_tokens"


@dataclass(frozen=True)
class Grade:
    """The verdict on one answer.

    ``recall``: ROUGE-1 recall with stemming against the answer(s), in [0, 1]. ``exact``: the
    answer's words and nothing else (case and punctuation ignored). ``substring``: RULER's
    ``string_match_all``, the share of answers contained verbatim (1.0 or 0.0 for one answer).
    ``reason`` says in words why it passed or failed.
    """

    passed: bool
    recall: float
    exact: bool
    substring: float
    reason: str


@functools.cache
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def _refs(answer: str | Sequence[str]) -> list[str]:
    refs = [answer] if isinstance(answer, str) else list(answer)
    if not refs or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"answer must be a string or a non-empty list of strings, got {answer!r}")
    return refs


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def _rouge_tokens(text: str) -> list[str]:
    """ROUGE's own tokenization (lower-case, alphanumeric, Porter-stemmed)."""
    scorer = _scorer()
    return list(scorer._tokenizer.tokenize(text))


def rouge1_recall(prediction: str, answer: str | Sequence[str]) -> float:
    """ROUGE-1 recall of ``prediction`` against the answer(s) (joined), with stemming.

    An answer with no token ROUGE can see (punctuation only, or a script its tokenizer drops) falls
    back to verbatim containment, 1.0 or 0.0, rather than an uninformative 0.
    """
    target = " ".join(_refs(answer))
    if not _rouge_tokens(target):
        return 1.0 if target.strip().casefold() in prediction.casefold() else 0.0
    return float(_scorer().score(target, prediction)["rouge1"].recall)


def exact_match(prediction: str, answer: str | Sequence[str]) -> bool:
    """The prediction's words equal the answers' words in order (case and punctuation ignored)."""
    return _words(prediction) == _words(" ".join(_refs(answer)))


def string_match_all(prediction: str, answer: str | Sequence[str]) -> float:
    """RULER's ``string_match_all``: the share of answers found in the prediction (any case)."""
    refs = _refs(answer)
    lowered = prediction.casefold()
    return sum(1.0 for r in refs if r.casefold() in lowered) / len(refs)


def grade(
    prediction: str,
    answer: str | Sequence[str],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    metric: str = "recall",
) -> Grade:
    """Grade ``prediction`` against ``answer`` (one string, or several for multi-value/-query).

    Passes when ``metric`` reaches ``threshold``: ``"recall"`` (the paper's criterion, default
    ``>= 0.5``), ``"substring"`` (RULER's score) or ``"exact"`` (threshold ignored).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within [0, 1], got {threshold}")
    recall = rouge1_recall(prediction, answer)
    exact = exact_match(prediction, answer)
    substring = string_match_all(prediction, answer)
    if metric == "exact":
        passed = exact
        reason = "exact match" if exact else "not an exact match"
    else:
        score = recall if metric == "recall" else substring
        label = "rouge1 recall" if metric == "recall" else "substring match"
        passed = score >= threshold
        reason = f"{label} {score:.2f} {'>=' if passed else '<'} {threshold:.2f}"
    return Grade(passed=passed, recall=recall, exact=exact, substring=substring, reason=reason)


#: Words whose overlap with the answer says nothing: "The key is hidden in the kitchen" shares
#: "the" with "under the blue flowerpot", which makes it no partial answer.
FUNCTION_WORDS = frozenset(
    "a an the of in on at to for from by with and or is are was were be it its this that "
    "there these those as".split()
)


def _shares_content_word(prediction: str, answer: str | Sequence[str]) -> bool:
    """Whether the prediction has a word of the answer that is not a function word (ROUGE's
    stemmed tokens); an answer made only of function words counts them all."""
    target = set(_rouge_tokens(" ".join(_refs(answer))))
    content = target - FUNCTION_WORDS or target
    return bool(content & set(_rouge_tokens(prediction)))


def _degenerate(prediction: str) -> bool:
    """Nothing, or nothing but punctuation, or one word over and over."""
    words = _words(prediction)
    return not words or (len(words) > 1 and len(set(words)) == 1)


def classify_failure(
    prediction: str,
    answer: str | Sequence[str],
    *,
    distractor_answers: Sequence[str] = (),
    context: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    stopped_by: str | None = None,
) -> str:
    """Why an answer failed, for the hallucination analysis; plain strings in, a label out.

    In order: ``"correct"`` (it passes after all), ``"empty"`` (empty or degenerate: only
    punctuation, or one word repeated), ``"distractor"`` (it matches a distractor needle's answer
    better than the target's), ``"cut_off"`` (the decode loop stopped it at its token budget,
    ``stopped_by="max_new_tokens"``, before it had answered: a budget too small for the model's
    way of answering, not a retrieval failure), ``"partial"`` (a word of the answer that is not
    a function word, :data:`FUNCTION_WORDS`) (some of the answer's words, not enough),
    ``"in_context"`` (the answer's words are absent but most of its words occur in ``context``:
    copied from the wrong place; needs ``context``), ``"not_in_context"`` (made up).
    """
    verdict = grade(prediction, answer, threshold=threshold)
    if verdict.passed:
        return "correct"
    if _degenerate(prediction):
        return "empty"
    for other in distractor_answers:
        other_recall = rouge1_recall(prediction, other)
        if other_recall >= threshold and other_recall > verdict.recall:
            return "distractor"
    if stopped_by == BUDGET_STOP:
        return "cut_off"
    if verdict.substring > 0 or _shares_content_word(prediction, answer):
        return "partial"
    if context is not None:
        words = _rouge_tokens(prediction)
        seen = set(_rouge_tokens(context))
        if words and sum(w in seen for w in words) / len(words) >= threshold:
            return "in_context"
    return "not_in_context"
