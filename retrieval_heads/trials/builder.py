"""Building one trial: needles inserted at sentence boundaries of a haystack window, spans, ids.

Retrieval heads are found and tested on prompts that hide a *needle* (a sentence holding a fact)
inside a long *haystack* of unrelated text and then ask for the fact. The reference code of
Wu et al. (2024) finds sentence boundaries by looking for one tokenizer's period ids, drops trials
it cannot build and depends on one haystack. This module (with the tokenizer adapter of
:mod:`~retrieval_heads.trials.tokens`) instead:

- finds sentence boundaries by **decoding** tokens, so it works for any Hugging Face tokenizer
  (word-level, byte-level BPE, SentencePiece-style), and falls back to a plain token boundary —
  recorded in ``Trial.boundary`` and warned about — when the haystack has no sentence boundary;
- records exactly where every needle and every answer span sits (token ``[start, end)``), so the
  retrieval score can check "did this head attend to the token it is copying";
- fails loudly (:class:`TrialError`) with the trial's parameters instead of skipping a trial.

How a prompt is assembled (pieces tokenized apart, then concatenated, so spans are exact)::

    [BOS] + template-before-context + haystack[:a] + needle + haystack[a:] + template-after-context

The part after the context holds the question. Each later piece is tokenized as a *continuation*
(behind an anchor whose ids are then dropped), so SentencePiece's dummy prefix or BPE's missing
leading space do not distort it; for ordinary text the result equals tokenizing the whole prompt.
The haystack is one long token stream per (haystack, tokenizer), tokenized once and cached; a
trial is a window of it that ends at a sentence end (the question follows a whole sentence) and
is cut at its start to reach the exact length. Depths are measured in haystack tokens; a placed
needle's actual depth is the share of the *other* context tokens that precede it, so 0 and 100
mean first and last.

Owns :func:`build_trial`, trial ids, :func:`check_trial_tokens` and
:class:`BoundaryFallbackWarning`. It never loops over a grid (:mod:`~retrieval_heads.trials.grid`
does) and knows no synthetic world.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from retrieval_heads.seeding import seeded_rng
from retrieval_heads.trials.base import TrialError
from retrieval_heads.trials.haystacks import Haystack, _EmptyHaystack
from retrieval_heads.trials.needles import Needle, NeedleSet
from retrieval_heads.trials.template import PromptTemplate
from retrieval_heads.trials.tokens import _canon, _find, _Tok
from retrieval_heads.trials.trial import PlacedNeedle, Trial

__all__ = [
    "DEFAULT_MAX_OFFSET",
    "BoundaryFallbackWarning",
    "build_trial",
    "check_trial_tokens",
]

#: How far (in tokens) the seed may shift a trial's haystack window: it ends at a seeded sentence
#: end among this many tokens past the earliest possible end (at most one pass of a shorter
#: haystack); 0 always takes the earliest, like the reference code's "start of the haystack".
DEFAULT_MAX_OFFSET = 16384


class BoundaryFallbackWarning(UserWarning):
    """A needle went in at a plain token boundary: the haystack window has no sentence end."""


def _as_set(needle: Needle | NeedleSet | Sequence[Needle]) -> NeedleSet:
    if isinstance(needle, NeedleSet):
        return needle
    if isinstance(needle, Needle):
        return NeedleSet((needle,))
    needles = tuple(needle)
    if not needles or not all(isinstance(n, Needle) for n in needles):
        raise TrialError(f"expected a Needle, a NeedleSet or a list of Needles, got {needle!r}")
    return NeedleSet(needles, kind="multi" if len(needles) > 1 else "single")


def _default_question(targets: Sequence[Needle]) -> str:
    questions = list(dict.fromkeys(n.question for n in targets))
    return " ".join(questions)


def build_trial(
    tokenizer: Any,
    haystack: Haystack,
    needle: Needle | NeedleSet | Sequence[Needle],
    *,
    length: int,
    depth_percent: float,
    distractors: Sequence[Needle] = (),
    template: PromptTemplate | None = None,
    seed: int = 0,
    n_ctx: int | None = None,
    question: str | None = None,
    max_offset: int = DEFAULT_MAX_OFFSET,
) -> Trial:
    """Build one trial of exactly ``length`` tokens with the needle at ``depth_percent``.

    ``needle`` is one target, several targets (a list: multi-value / multi-query), or a
    :class:`NeedleSet` (its distractors are added to ``distractors``). The first target goes in at
    the sentence boundary nearest before ``depth_percent`` of the haystack tokens (the context's
    start counts as one); other targets and distractors at other seeded random sentence
    boundaries. The haystack window ends at a sentence end chosen from ``seed`` (within
    ``max_offset`` tokens of the earliest possible one; ``max_offset=0``: the earliest), so one
    seed gives the same haystack to every depth and needle of one length, and the question always
    follows a whole sentence; the window may open mid-sentence. ``length`` counts everything:
    BOS, template, question, haystack and needles. ``n_ctx`` (the model's context window) only
    bounds ``length``. Raises :class:`TrialError` when the trial cannot be built; warns
    :class:`BoundaryFallbackWarning` (and sets ``Trial.boundary = "token"``) when the window has
    no sentence boundary to use.
    """
    needle_set = _as_set(needle)
    template = template or PromptTemplate()
    targets = needle_set.targets
    others = tuple(needle_set.distractors) + tuple(distractors)
    question = question or needle_set.question or _default_question(targets)
    all_ids = [n.needle_id for n in (*targets, *others)]
    where = (
        f"(needle={all_ids[0] if len(all_ids) == 1 else all_ids}, length={length}, "
        f"depth_percent={depth_percent}, seed={seed}, haystack={haystack.name!r})"
    )

    def fail(message: str) -> TrialError:
        return TrialError(f"cannot build trial {where}: {message}")

    if len(set(all_ids)) != len(all_ids):
        raise fail(f"needle ids repeat: {all_ids}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise fail(f"length must be a positive integer, got {length!r}")
    if not isinstance(depth_percent, (int, float)) or not 0 <= depth_percent <= 100:
        raise fail(f"depth_percent must be within 0..100, got {depth_percent!r}")
    if n_ctx is not None and length > n_ctx:
        raise fail(f"target length {length} exceeds the model's context window n_ctx={n_ctx}")
    if max_offset < 0:
        raise fail(f"max_offset must be >= 0, got {max_offset}")
    depth = float(depth_percent)
    tok = _Tok(tokenizer)

    # Needles: tokenized as they appear after a sentence end, answer located inside.
    tokenized: list[tuple[Needle, str, list[int], tuple[int, int]]] = []
    for role, group in (("target", targets), ("distractor", others)):
        for n in group:
            ids = tok.continuation(" " + n.text)
            tokenized.append((n, role, ids, _locate_answer(tok, n, ids, fail)))

    # Template: before the context (start of input) and after it (question included).
    before, after = template.split(tokenizer, question)
    bos = [] if template.chat else tok.bos
    before_ids = tok.encode(before) if before else []
    after_ids = tok.continuation(after) if after else []
    fixed = len(bos) + len(before_ids) + len(after_ids)
    needle_tokens = sum(len(ids) for _, _, ids, _ in tokenized)
    n_hay = length - fixed - needle_tokens
    if n_hay < 1:
        raise fail(
            f"needles ({needle_tokens} tokens) plus template and question ({fixed} tokens) leave "
            f"{n_hay} haystack tokens; the target length must be at least "
            f"{fixed + needle_tokens + 1}"
        )

    # Haystack window: it ends at a sentence end (so the question follows a whole sentence),
    # chosen from the seed among the sentence ends within max_offset tokens of the earliest.
    stream = haystack._stream(tokenizer)
    offset_rng = seeded_rng("offset", seed)
    try:
        stream.ensure(tok, max_offset + 1)
        limit = max_offset if stream.cycle_len is None else min(max_offset, stream.cycle_len - 1)
        stream.ensure(tok, n_hay + limit + 1)
        bounds = stream.boundaries  # grows in place as the stream grows
        ends = bounds[
            bisect.bisect_left(bounds, n_hay) : bisect.bisect_right(bounds, n_hay + limit)
        ]
        if not ends:  # no sentence end in range: take the next one, if any comes soon
            stream.ensure(tok, n_hay + limit + DEFAULT_MAX_OFFSET + 1)
            ends = bounds[bisect.bisect_right(bounds, n_hay + limit) :][:1]
            ends = [e for e in ends if e <= n_hay + limit + DEFAULT_MAX_OFFSET]
    except _EmptyHaystack:
        raise fail("the haystack is empty (no text)") from None
    end = offset_rng.choice(ends) if ends else n_hay + offset_rng.randrange(limit + 1)
    start = end - n_hay
    window = stream.ids[start:end]
    inner = bounds[bisect.bisect_right(bounds, start) : bisect.bisect_right(bounds, end)]
    # Insertion points: the context start, then every sentence start inside the window.
    sentence_starts = [0] + [x - start for x in inner]
    has_sentences = len(sentence_starts) > 1

    # Positions (in haystack tokens) for the first target, then the other needles.
    target_at = depth / 100 * n_hay
    boundary = "sentence"
    if has_sentences:
        first = sentence_starts[bisect.bisect_right(sentence_starts, target_at + 1e-9) - 1]
    else:
        first = min(n_hay, math.floor(target_at + 1e-9))
        if first != 0:
            boundary = "token"
    positions = [first]
    place_rng = seeded_rng("place", seed, length, depth, all_ids)
    rest = len(tokenized) - 1
    if rest:
        if has_sentences:
            free = [b for b in sentence_starts if b != first]
            if len(free) >= rest:
                positions += place_rng.sample(free, rest)
            else:
                positions += [place_rng.choice(sentence_starts) for _ in range(rest)]
        else:
            positions += [place_rng.randrange(n_hay + 1) for _ in range(rest)]
            if any(p != 0 for p in positions):
                boundary = "token"
    if boundary == "token":
        warnings.warn(
            f"haystack {haystack.name!r} has no sentence boundary in a {n_hay}-token window for "
            f"tokenizer {tok.name!r}; needles placed at token boundaries (Trial.boundary='token')",
            BoundaryFallbackWarning,
            stacklevel=2,
        )

    # Assemble.
    out: list[int] = [*bos, *before_ids]
    context_start = len(out)
    spans: list[tuple[int, int]] = [(0, 0)] * len(tokenized)
    previous = 0
    for index in sorted(range(len(tokenized)), key=lambda i: (positions[i], i)):
        at = positions[index]
        out.extend(window[previous:at])
        spans[index] = (len(out), len(out) + len(tokenized[index][2]))
        out.extend(tokenized[index][2])
        previous = at
    out.extend(window[previous:])
    context_end = len(out)
    out.extend(after_ids)
    if len(out) != length:  # pragma: no cover - guarded by construction
        raise fail(f"internal error: built {len(out)} tokens instead of {length}")

    context_tokens = context_end - context_start
    placed = []
    for (n, role, ids, (a0, a1)), (s, e) in zip(tokenized, spans, strict=True):
        rest_tokens = context_tokens - len(ids)
        actual = 100.0 * (s - context_start) / rest_tokens if rest_tokens else 0.0
        placed.append(PlacedNeedle(n, role, (s, e), (s + a0, s + a1), actual))

    params: dict[str, Any] = {
        "length": length,
        "depth_percent": depth,
        "seed": seed,
        "max_offset": max_offset,
        "haystack": haystack.name,
        "haystack_offset": start,
        "tokenizer": tok.name,
        "tokenizer_class": type(tokenizer).__name__,
        "template": template.to_dict(),
        "question": question,
        "kind": needle_set.kind,
        "needles": [{"role": role, **n.to_dict()} for n, role, _, _ in tokenized],
    }
    if template.chat:
        params["chat_template_sha"] = hashlib.sha256(
            str(tokenizer.chat_template).encode()
        ).hexdigest()[:16]
    answer = ", ".join(n.answer for n in targets)
    return Trial(
        trial_id=_trial_id(params, out),
        input_ids=tuple(out),
        needles=tuple(placed),
        answer=answer,
        context_length=length,
        depth_percent=depth,
        params=params,
        context_span=(context_start, context_end),
        boundary=boundary,
    )


def _locate_answer(
    tok: _Tok, needle: Needle, needle_ids: list[int], fail: Callable[[str], TrialError]
) -> tuple[int, int]:
    """Token ``[start, end)`` of the answer inside the needle's ids.

    The answer is tokenized on its own as the model would write it (behind a space when the
    needle has one before it) and must appear as a contiguous run of the needle's ids; otherwise the
    copy the retrieval score looks for cannot happen token by token, and the error shows both.
    """
    at = needle.text.find(needle.answer)
    spaced = at == 0 or needle.text[at - 1].isspace()
    candidates = [tok.continuation(" " + needle.answer)] if spaced else []
    candidates += [tok.continuation(needle.answer), tok.encode(needle.answer)]
    candidates = [ids for ids in candidates if ids]
    alone = candidates[0]
    if _canon(tok.decode(alone)) != _canon(needle.answer):
        raise fail(
            f"answer {needle.answer!r} of needle {needle.needle_id!r} does not survive "
            f"tokenization: its tokens {tok.pieces(alone)} decode to {tok.decode(alone)!r}"
        )
    if _canon(tok.decode(needle_ids)) != _canon(needle.text):
        raise fail(
            f"needle {needle.needle_id!r} does not survive tokenization: "
            f"{needle.text!r} decodes to {tok.decode(needle_ids)!r}"
        )
    for ids in candidates:
        offset = _find(needle_ids, ids)
        if offset >= 0:
            return offset, offset + len(ids)
    raise fail(
        f"the answer {needle.answer!r} of needle {needle.needle_id!r} tokenizes differently in "
        f"context:\n  answer alone:      {alone} {tok.pieces(alone)}\n"
        f"  needle in context: {needle_ids} {tok.pieces(needle_ids)}"
    )


def _trial_id(params: dict[str, Any], input_ids: Sequence[int]) -> str:
    """Hash of the parameters and the ids. The tokenizer enters through the ids, not its name,
    which is often a local path: the same trial built on another machine keeps its id."""
    params = {k: v for k, v in params.items() if k not in ("tokenizer", "tokenizer_class")}
    ids_digest = hashlib.sha256(",".join(map(str, input_ids)).encode()).hexdigest()
    blob = json.dumps({"params": params, "input_ids": ids_digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_trial_tokens(trial: Trial, tokenizer: Any, vocab_rows: int, model_name: str) -> None:
    """Refuse a trial tokenized by another model's tokenizer: its ids would mean other words
    (or index past the embedding), and its answer span would not be the answer."""
    top = max(trial.input_ids)
    start, end = trial.answer_span
    seen = tokenizer.decode(list(trial.input_ids[start:end]))
    answer = trial.target.needle.answer
    seen_c, answer_c = _canon(seen), _canon(answer)
    if top >= vocab_rows or (answer_c not in seen_c and seen_c not in answer_c) or not seen_c:
        found = f"token id {top}" if top >= vocab_rows else f"its answer span reads {seen!r}"
        raise TrialError(
            f"trial {trial.trial_id!r} was not tokenized for {model_name}: {found} where "
            f"{answer!r} should be; build its trials with make_trials(model, ...) for this model"
        )
