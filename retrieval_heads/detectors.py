"""Per-head detectors beside the retrieval score: the query-focused score and the pattern scores.

Each detector gives one number per head, a ``[layer, head]`` array, from attention patterns read
through :meth:`~retrieval_heads.model.hooked.HookedModel.attention_rows` (only the query rows it
names: the prefix before them runs the fast path, no full pattern is kept):

- :func:`query_focused_scores`: QRHead's query-focused retrieval score (Zhang et al., "Query-Focused
  Retrieval Heads Improve Long-Context Reasoning and Re-ranking", EMNLP 2025) on one trial: the
  attention mass the prompt's query tokens give the target needle, optionally calibrated by the
  same mass under a content-free question;
- :func:`pattern_scores`: TransformerLens' head detector (``transformer_lens.head_detector``):
  previous-token, duplicate-token and induction scores on a random token sequence repeated twice.

It owns the probe (:func:`pattern_probe`), the detection patterns (:func:`detection_patterns`)
and where a trial's question lies (:func:`query_positions`). It never decodes, never keeps a full
attention pattern of a trial, and never runs a sweep or writes records (callers do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from retrieval_heads.model.hooked import HookedModel
from retrieval_heads.seeding import seeded_rng
from retrieval_heads.trials.template import PromptTemplate
from retrieval_heads.trials.tokens import _canon, _Tok
from retrieval_heads.trials.trial import Trial

__all__ = [
    "NULL_QUESTION",
    "PATTERNS",
    "detection_patterns",
    "pattern_probe",
    "pattern_scores",
    "query_focused_scores",
    "query_positions",
]

#: The content-free question of QRHead's calibration (its reference code's default null query).
NULL_QUESTION = "N/A"
#: The pattern names :func:`pattern_scores` returns, in TransformerLens' order.
PATTERNS = ("previous_token", "duplicate_token", "induction")

QueryTokens = Literal["tail", "question"]
ErrorMeasure = Literal["mul", "abs"]


# ---- the query-focused score ------------------------------------------------------------------


def _tail_ids(tok: _Tok, template: PromptTemplate, question: str) -> list[int]:
    """The ids after the context for ``question``, tokenized as the builder does."""
    _, after = template.split(tok.tokenizer, question)
    return tok.continuation(after) if after else []


def _locate(tok: _Tok, ids: Sequence[int], text: str) -> tuple[int, int] | None:
    """The shortest ``[start, end)`` of ``ids`` whose decoded text holds ``text`` (modulo
    whitespace, case and Unicode form), the first such run; ``None`` when no run does."""
    want = _canon(text)
    if not want:
        return None
    end = next((b for b in range(1, len(ids) + 1) if want in _canon(tok.decode(ids[:b]))), None)
    if end is None:
        return None
    start = max(a for a in range(end) if want in _canon(tok.decode(ids[a:end])))
    return start, end


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the common prefix of ``a`` and ``b``."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def query_positions(
    tokenizer: Any,
    trial: Trial,
    *,
    query: QueryTokens = "tail",
    null_question: str | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """Where the query lies: ``(positions, null_input_ids, null_positions)``.

    ``query="tail"``: every token after the context (``trial.context_span[1]`` to the end: the
    template's text after the context, the question and, with a chat template, the turn's end).
    ``query="question"``: the shortest run of tail tokens whose decoded text holds
    ``trial.question``. With ``null_question`` the prompt is rebuilt with the question replaced
    (the template in ``trial.params["template"]`` split around the context, the part after it
    tokenized as the builder tokenizes it, behind the same context ids) and the null prompt's
    query positions are returned too; for ``"question"`` both runs are then widened to every
    token where the two prompts differ, so the tokens outside them are the same in both.
    Without ``null_question`` the null lists are empty. Raises ``ValueError`` when the trial
    has no context span, or the question cannot be found or the prompt not rebuilt.
    """
    ids = list(trial.input_ids)
    start = trial.context_span[1]
    if start <= 0 or start >= len(ids):
        raise ValueError(
            f"trial {trial.trial_id!r} has no tokens after its context (context_span "
            f"{trial.context_span}, {len(ids)} tokens): nothing to take as the query"
        )
    tok = _Tok(tokenizer)
    tail = ids[start:]
    span = (0, len(tail))
    if query == "question":
        found = _locate(tok, tail, trial.question)
        if found is None:
            raise ValueError(f"question {trial.question!r} not found after the context")
        span = found
    elif query != "tail":
        raise ValueError(f"query must be 'tail' or 'question', got {query!r}")
    if null_question is None:
        return list(range(start + span[0], start + span[1])), [], []
    if "template" not in trial.params:
        raise ValueError(f"trial {trial.trial_id!r} records no template: cannot calibrate")
    template = PromptTemplate(**trial.params["template"])
    if _tail_ids(tok, template, trial.question) != tail:
        raise ValueError(
            f"trial {trial.trial_id!r}: the tokens after its context do not rebuild from its "
            "template and question with this tokenizer: cannot calibrate"
        )
    null_tail = _tail_ids(tok, template, null_question)
    first, keep = 0, 0  # tail: all of both tails
    if query == "question":
        first = min(span[0], _common(tail, null_tail))
        keep = min(len(tail) - span[1], _common(tail[::-1], null_tail[::-1]))
        keep = min(keep, len(tail) - first, len(null_tail) - first)
    positions = list(range(start + first, start + len(tail) - keep))
    null_positions = list(range(start + first, start + len(null_tail) - keep))
    if not null_positions:
        raise ValueError(f"null question {null_question!r} leaves no query tokens")
    return positions, ids[:start] + null_tail, null_positions


def _key_mass(
    model: HookedModel, ids: Sequence[int], positions: Sequence[int]
) -> Float[Tensor, "layer head key"]:
    """Attention per key, averaged over the query rows at ``positions``."""
    rows = model.attention_rows(torch.tensor(list(ids)), positions)
    return rows.mean(dim=2)


def query_focused_scores(
    model: HookedModel,
    trial: Trial,
    *,
    calibrate: bool = True,
    null_question: str = NULL_QUESTION,
    query: QueryTokens = "tail",
    drop_outliers: bool = True,
) -> Float[np.ndarray, "layer head"]:
    """QRHead's query-focused retrieval score of every head on one trial.

    With ``A[l, h, i, k]`` head ``(l, h)``'s attention from query position ``i`` to key ``k``,
    ``Q`` the query positions (:func:`query_positions`: by default every token after the
    context, the tokens QRHead's reference code takes as the query span: instruction, query
    and chat suffix; ``query="question"`` the question's tokens only) and ``N`` the tokens of
    the target needles (``trial.targets``, each ``span``):

    ``s[l, h, k] = (1 / |Q|) * sum_{i in Q} A[l, h, i, k]``

    ``calibrate=True``: ``s`` minus the same average in the prompt with the question replaced by
    ``null_question`` (``"N/A"``, QRHead's content-free query; same context, its own query
    positions), per key. ``drop_outliers=True``: within each needle's span, keys with
    ``s < mean - 2 * std`` (over that span's keys, Bessel-corrected) are dropped, as QRHead's
    detection code drops them (it keeps ``s > mean - 2 * std``; ties are kept here, so a flat
    span keeps every key; a one-token span keeps its key). The score is the sum over the target
    needles of the kept ``s`` over each needle's keys:

    ``score[l, h] = sum_{needle} sum_{k in needle, kept} s[l, h, k]``

    Uncalibrated and without the filter it is the QRscore of the paper's definition (the mean
    over query tokens of the attention mass on the relevant passages, summed over them), in
    ``[0, 1]``: 1 is a head whose every query row lies on the needles. Calibrated it lies in
    ``[-1, 1]``: the mass the question adds over a content-free one. A trial's score is one
    detection example; QRHead averages it over examples.

    Memory: the rows at the query positions only (``[layer, head, |Q|, context]``, linear in
    the context), one :meth:`~HookedModel.attention_rows` call per prompt (two calibrated).
    """
    real, null_ids, null_positions = query_positions(
        model.tokenizer, trial, query=query, null_question=null_question if calibrate else None
    )
    # The needles lie before the first query position: the same tokens in both prompts.
    mass = _key_mass(model, trial.input_ids, real)[..., : real[0]]
    if calibrate:
        mass = mass - _key_mass(model, null_ids, null_positions)[..., : real[0]]
    score = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    for needle in trial.targets:
        start, end = needle.span
        if end > real[0]:
            raise ValueError(f"needle span {needle.span} does not lie before the query")
        s = mass[..., start:end].double()
        if drop_outliers and end - start > 1:
            floor = s.mean(dim=-1, keepdim=True) - 2 * s.std(dim=-1, keepdim=True)
            s = torch.where(s >= floor, s, torch.zeros_like(s))
        score += s.sum(dim=-1).cpu()
    return score.numpy()


# ---- TransformerLens' pattern scores ----------------------------------------------------------


def pattern_probe(model: HookedModel, *, length: int = 50, seed: int = 0) -> Int[Tensor, " pos"]:
    """The repeated random tokens the pattern scores read: ``[BOS] + r + r``.

    ``r`` is ``length`` distinct token ids drawn by ``seeded_rng("pattern-probe", seed, length)``
    from the ids below both the tokenizer's size and the model's vocabulary that are not special
    tokens (distinct, so in the second copy each query has exactly one earlier duplicate); BOS is
    ``tokenizer.bos_token_id`` when the tokenizer has one (TransformerLens' ``to_tokens`` default).
    """
    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")
    tokenizer = model.tokenizer
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    candidates = [i for i in range(min(len(tokenizer), model.d_vocab)) if i not in special]
    if len(candidates) < length:
        raise ValueError(f"the vocabulary has {len(candidates)} plain tokens, fewer than {length}")
    draw = seeded_rng("pattern-probe", seed, length).sample(candidates, length)
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = ([] if bos is None else [int(bos)]) + draw + draw
    if len(ids) > model.n_ctx:
        raise ValueError(f"the probe has {len(ids)} tokens, more than n_ctx={model.n_ctx}")
    return torch.tensor(ids)


def detection_patterns(tokens: Int[Tensor, " pos"]) -> dict[str, Float[Tensor, "pos pos"]]:
    """TransformerLens' detection patterns of a token sequence, ``{name: D[query, key]}``.

    ``previous_token``: ``D[i, i - 1] = 1``. ``duplicate_token``: ``D[i, j] = 1`` where
    ``j < i`` and ``tokens[j] == tokens[i]``. ``induction``: ``D[i, j] = 1`` where
    ``1 <= j <= i`` and ``tokens[j - 1] == tokens[i]`` with ``j - 1 < i`` (the token after an
    earlier duplicate). All other entries 0, every pattern lower triangular.
    """
    t = tokens.reshape(-1).cpu()
    n = t.shape[0]
    same = (t[:, None] == t[None, :]).float()
    duplicate = torch.tril(same, diagonal=-1)
    induction = torch.zeros(n, n)
    induction[:, 1:] = duplicate[:, :-1]
    return {
        "previous_token": torch.diag(torch.ones(n - 1), -1),
        "duplicate_token": duplicate,
        "induction": torch.tril(induction),
    }


def _similarity(
    pattern: Float[Tensor, "layer head pos pos"],
    detection: Float[Tensor, "pos pos"],
    *,
    error_measure: ErrorMeasure,
    exclude_bos: bool,
    exclude_current_token: bool,
) -> Float[Tensor, "layer head"]:
    n = pattern.shape[-1]
    mask = torch.ones(n, n, dtype=pattern.dtype)
    if exclude_bos:
        mask[:, 0] = 0
    if exclude_current_token:
        mask.fill_diagonal_(0)
    if error_measure == "mul":
        kept = pattern * mask
        return (kept * detection).sum(dim=(-2, -1)) / kept.sum(dim=(-2, -1))
    if error_measure == "abs":
        return 1 - ((pattern - detection).abs() * mask).sum(dim=(-2, -1)) / n
    raise ValueError(f"error_measure must be 'mul' or 'abs', got {error_measure!r}")


def pattern_scores(
    model: HookedModel,
    *,
    length: int = 50,
    seed: int = 0,
    tokens: Int[Tensor, " pos"] | Sequence[int] | None = None,
    error_measure: ErrorMeasure = "mul",
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
) -> dict[str, Float[np.ndarray, "layer head"]]:
    """TransformerLens' head-detector scores of every head, ``{name: [layer, head]}``.

    On :func:`pattern_probe`'s ``[BOS] + r + r`` (or ``tokens``), with ``A[l, h]`` the head's
    full ``[query, key]`` pattern (every row is read, through
    :meth:`~HookedModel.attention_rows` with all positions: the probe is short) and ``D`` each
    of :func:`detection_patterns`, as ``transformer_lens.head_detector`` defines them:

    - ``"mul"`` (its default): ``sum(A' * D) / sum(A')``, ``A'`` being ``A`` with column 0
      zeroed (``exclude_bos``) and the diagonal zeroed (``exclude_current_token``): the share of
      the head's attention on the pattern's query-key pairs, in ``[0, 1]``;
    - ``"abs"``: ``1 - sum(M * |A - D|) / n`` with ``M`` the same masks and ``n`` the sequence
      length, in ``[-1, 1]`` (TransformerLens rounds the error to 3 decimals; not done here).

    A head always on the previous token scores ``(n - 1) / n`` by ``"mul"`` (its first row can
    only attend to itself) and 1 with ``exclude_bos=True``.
    """
    ids = pattern_probe(model, length=length, seed=seed) if tokens is None else tokens
    ids = torch.as_tensor(ids).reshape(-1)
    if ids.shape[0] < 2:
        raise ValueError("the sequence needs at least 2 tokens")
    full = model.attention_rows(ids, range(ids.shape[0])).cpu()
    return {
        name: _similarity(
            full,
            detection,
            error_measure=error_measure,
            exclude_bos=exclude_bos,
            exclude_current_token=exclude_current_token,
        )
        .double()
        .numpy()
        for name, detection in detection_patterns(ids).items()
    }
