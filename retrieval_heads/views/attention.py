"""Attention views of one trial: the answer steps against a cropped context.

A trial's decode steps each have one query (step ``s`` reads the token at
``query_positions[s]``: the last prompt token at step 0, then each generated token), so its
attention is a few rows over thousands of keys. Per chosen head the page shows:

- a grid (plain HTML, :mod:`._attention_grid`): one row per answer step, labelled with the token
  it generated, against at most ~80 context columns: the first token, the needle and its answer,
  a few tokens around them, the keys the heads attend to most, the question; each hidden
  stretch is one ``[… 3,890 …]`` column holding its attention mass and the generated tokens
  fold into a last column, so rows still sum to 1; needle, answer and distractors are marked
  in the header, copy events ``✓`` in their cell;
- ``ColoredTokens`` (:func:`circuitsvis.tokens.colored_tokens`): the same crop read as text,
  coloured by the head's mean attention per answer step.

The page says where the crop lies ("context positions 0, 4,010–4,119 of 4,012"). Tokens a shown
head copied are marked ``✓`` and listed in a table. circuitsvis puts token strings into the page
as raw HTML, so ``<``, ``>`` and ``&`` in tokens are shown as ``‹``, ``›`` and ``＆``
(:func:`cv_text`); the grid escapes its text.

:func:`attention_view` is pure (token strings and a ``[head, step, key]`` array in), so it runs
without a model; :func:`trial_attention` gets the rows from ``model.attention_rows`` itself.

Embedding: circuitsvis' ``RenderedHTML.local_src`` inlines its 1.3 MB JavaScript bundle in every
view (``str()`` of it loads the bundle from a CDN: never used here). :class:`CircuitsVisView`
keeps what ``local_src`` renders (element and props) and writes the bundle once per page
(:func:`circuitsvis_js`), with the props as script-safe JSON (a token ``</script>`` cannot end
the script).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval_heads.heads import Head
from retrieval_heads.views._attention_grid import AttentionGrid, Crop, choose_columns, crop_of
from retrieval_heads.views._html import (
    fmt_int,
)

if TYPE_CHECKING:  # pragma: no cover
    from retrieval_heads.model import HookedModel
    from retrieval_heads.records import TrialRecord
    from retrieval_heads.trials.trial import Trial

__all__ = [
    "AttentionGrid",
    "CircuitsVisView",
    "TrialAttention",
    "attention_view",
    "trial_attention",
    "circuitsvis_js",
    "COPY_MARK",
    "cv_text",
]

# The embedding (views, the bundle, safe token text, a trial's page) lives in _circuitsvis.py.
from retrieval_heads.views._circuitsvis import (  # noqa: E402
    COPY_MARK,
    CircuitsVisView,
    TrialAttention,
    circuitsvis_js,
    cv_text,
)

# ---------------------------------------------------------------------------------------------
# the pure view


def _runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted positions -> inclusive runs ``[(first, last), ...]``."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and p == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], p)
        else:
            runs.append((p, p))
    return runs


def _crop_text(positions: Sequence[int], n_context: int) -> str:
    parts = [fmt_int(a) if a == b else f"{fmt_int(a)}–{fmt_int(b)}" for a, b in _runs(positions)]
    return (
        f"Showing context positions {', '.join(parts)} of {fmt_int(n_context)} "
        f"({fmt_int(len(positions))} tokens); the hidden ones are folded into … columns "
        "holding their attention mass, the generated tokens into the last column."
    )


def _as_array(rows: Any) -> np.ndarray:
    if hasattr(rows, "detach"):  # a torch tensor
        rows = rows.detach().float().cpu().numpy()
    return np.asarray(rows, dtype=np.float64)


def _readable(token: str) -> str:
    """A token as a label: line breaks and tabs made visible (labels are one line)."""
    return str(token).replace("\r", "").replace("\n", "↵").replace("\t", "→")


def _check_shapes(att: np.ndarray, heads: list[Head], queries: list[int], n: int) -> None:
    if att.ndim != 3:
        raise ValueError(f"rows must be [head, step, key], got shape {att.shape}")
    n_heads, n_steps, n_keys = att.shape
    if n_heads != len(heads):
        raise ValueError(f"rows has {n_heads} heads, {len(heads)} head labels given")
    if n_steps != len(queries) or n_steps == 0:
        raise ValueError(f"rows has {n_steps} steps, {len(queries)} query positions given")
    if n_keys > n:
        raise ValueError(f"rows has {n_keys} keys but there are only {n} tokens")
    if any(not 0 <= q < n_keys for q in queries):
        raise ValueError(f"query positions must lie in 0-{n_keys - 1}, got {queries}")


def _anchor(
    att: np.ndarray, n_context: int, needle_span: tuple[int, int] | None, copied: set[int]
) -> tuple[tuple[int, int], str | None]:
    """The span the crop is built around, and a note when it is not the needle."""
    if needle_span is not None:
        return needle_span, None
    if copied:
        note = "No needle span given: the window is centred on the tokens copied."
        return (min(copied), max(copied) + 1), note
    mass = att[:, :, :n_context].mean(axis=(0, 1))
    mass[:1] = 0.0
    c = int(mass.argmax())
    return (c, c + 1), "No needle span given: the window is centred on the most attended token."


def attention_view(
    tokens: Sequence[str],
    rows: Any,
    heads: Sequence[Head | str | tuple[int, int]],
    query_positions: Sequence[int],
    *,
    needle_span: tuple[int, int] | None = None,
    answer_span: tuple[int, int] | None = None,
    question_span: tuple[int, int] | None = None,
    distractor_spans: Sequence[tuple[int, int]] = (),
    copy_events: Iterable[Sequence[int]] = (),
    window: int = 6,
    max_tokens: int = 80,
    head_labels: Sequence[str] | None = None,
    title: str = "",
    max_copy_rows: int = 40,
) -> TrialAttention:
    """The attention views of one trial from arrays (no model needed).

    ``tokens``: the token strings of the whole sequence (prompt, then generated tokens);
    ``rows``: ``[head, step, key]`` attention of the chosen ``heads`` (same order) at the
    ``query_positions`` (one per step: the last prompt token, then each generated token; the
    context is everything before the first generated token), e.g.
    ``model.attention_rows(ids, query_positions)[layer, head]`` stacked;
    ``needle_span``/``answer_span``/``question_span``/``distractor_spans``: token
    ``[start, end)``; without a needle span the crop is built around the copied tokens, else
    the most attended one; ``copy_events``: ``(step, layer, head, key_position)``, those of the
    chosen heads are marked ``✓``.

    The grid has one row per answer step (labelled with the token it generated) and at most
    ``max_tokens`` columns: the context crop of :func:`~._attention_grid.choose_columns`
    (needle and answer, ``window`` tokens around them, the keys attended most, the question).
    """
    parsed = [Head.parse(h) for h in heads]
    att = np.nan_to_num(_as_array(rows), nan=0.0)
    queries = [int(q) for q in query_positions]
    n = len(tokens)
    _check_shapes(att, parsed, queries, n)
    n_heads, n_steps, n_keys = att.shape
    n_context = queries[0] + 1  # step 0 reads the last prompt token
    index = {h: i for i, h in enumerate(parsed)}
    events = [tuple(int(v) for v in e) for e in copy_events]
    mine = sorted(e for e in events if Head(e[1], e[2]) in index and 0 <= e[0] < n_steps)
    copied = {e[3] for e in mine if e[3] < n_context}

    anchor, note = _anchor(att, n_context, needle_span, copied)
    notes = [note] if note else []
    anchors = [anchor] + ([answer_span] if answer_span else [])
    shown, margin = choose_columns(
        att,
        n_context,
        anchors=anchors,
        copied=copied,
        question_span=question_span,
        window=window,
        max_columns=max(8, max_tokens - 1),  # one more column folds the generated tokens
    )
    if margin < window:
        notes.append(f"Window narrowed from {window} to {margin} tokens to keep the grid small.")
    crop = crop_of(shown, n_context, n_keys)
    folded = crop.fold(att)  # [head, step, item]
    item_of = {a: i for i, (a, _) in enumerate(crop.items) if not crop.is_gap[i]}

    def label(i: int) -> str:
        a, b = crop.items[i]
        if i == crop.answer_item:
            return f"[answer so far: {fmt_int(b - a)}]"
        if crop.is_gap[i]:
            return f"[… {fmt_int(b - a)} …]"
        return _readable(tokens[a]) + (COPY_MARK if a in copied else "")

    col_labels = [label(i) for i in range(len(crop.items))]
    row_labels = [
        f"{s}: {_readable(tokens[q + 1]) if q + 1 < n else '?'}" for s, q in enumerate(queries)
    ]
    names = list(head_labels) if head_labels is not None else [h.dotted for h in parsed]
    copies = {(index[Head(la, hd)], s, item_of[k]) for s, la, hd, k in mine if k in item_of}
    grid = AttentionGrid(
        crop,
        folded,
        col_labels=tuple(col_labels),
        row_labels=tuple(row_labels),
        head_names=tuple(names),
        copies=frozenset(copies),
        needle=needle_span,
        answer=answer_span,
        distractors=tuple(tuple(d) for d in distractor_spans),  # type: ignore[misc]  # pairs
    )
    views = _colored_token_views(folded, crop, col_labels, parsed, n_steps)

    def tok(p: int) -> str:
        return tokens[p] if 0 <= p < n else "?"

    rows_out = [
        {
            "step": s,
            "generated": tok(queries[s] + 1),
            "head": f"{layer}.{head}",
            "key_position": fmt_int(k),
            "key_token": tok(k),
        }
        for s, layer, head, k in mine
    ]
    return TrialAttention(
        title=title,
        heads=parsed,
        n_tokens=n,
        crop=_crop_text(shown, n_context),
        views=views,
        grid=grid,
        copy_rows=rows_out[:max_copy_rows],
        notes=notes,
        n_copy_events=len(rows_out),
    )


def _colored_token_views(
    folded: np.ndarray, crop: Crop, col_labels: Sequence[str], heads: Sequence[Head], n_steps: int
) -> list[CircuitsVisView]:
    """Per head, the crop read as text and coloured by the head's mean attention per answer
    step (circuitsvis ``ColoredTokens``; token text neutralised by :func:`cv_text`)."""
    from circuitsvis.tokens import colored_tokens

    labels = [cv_text(t) for t in col_labels]
    real = [t for t, gap in zip(labels, crop.is_gap, strict=True) if not gap]
    # Word-level tokenizers give tokens without their spaces: show them spaced.
    if real and sum(any(c.isspace() for c in t) for t in real) < 0.05 * len(real):
        labels = [t + " " for t in labels]
    steps = f"{n_steps} answer step{'s' if n_steps != 1 else ''}"
    views = []
    for i, head in enumerate(heads):
        mean = folded[i].mean(axis=0)  # [item]
        values = np.where(crop.is_gap, 0.0, mean)
        text = [
            f"{labels[j].rstrip()} {100 * mean[j]:.0f}% " if gap else labels[j]
            for j, gap in enumerate(crop.is_gap)
        ]
        top = float(values.max()) if values.size else 0.0
        views.append(
            CircuitsVisView.from_rendered(
                colored_tokens(
                    tokens=text,
                    values=np.round(values, 4).tolist(),
                    min_value=0.0,
                    max_value=max(top, 1e-6),
                ),
                title=f"Head {head.dotted}: the crop as text, by mean attention per answer step",
                caption=(
                    f"Over the {steps}; darkest = {top:.3f}. Folded stretches show the share of "
                    "attention they received."
                ),
            )
        )
    return views


# ---------------------------------------------------------------------------------------------
# with a model


def _span(value: Any) -> tuple[int, int] | None:
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) for v in value)
    ):
        return int(value[0]), int(value[1])
    return None


def _spans_of_trial(trial: Any) -> dict[str, Any]:
    """Needle, answer, question and distractor spans of a haystack ``Trial``."""
    spans: dict[str, Any] = {}
    placed = list(getattr(trial, "needles", ()) or ())
    targets = [p for p in placed if p.role == "target"]
    if targets:
        spans["needle_span"] = tuple(targets[0].span)
        spans["answer_span"] = tuple(targets[0].answer_span)
    spans["distractor_spans"] = [tuple(p.span) for p in placed if p.role != "target"]
    ctx_end = int(getattr(trial, "context_span", (0, 0))[1])
    if 0 < ctx_end < len(trial.input_ids):
        spans["question_span"] = (ctx_end, len(trial.input_ids))
    return spans


def trial_attention(
    model: HookedModel,
    record: TrialRecord,
    trial_ids: Trial | Sequence[int] | Any,
    heads: Sequence[Head | str | tuple[int, int]],
    *,
    window: int = 6,
    max_steps: int = 16,
    max_tokens: int = 80,
    needle_span: tuple[int, int] | None = None,
    question_span: tuple[int, int] | None = None,
    head_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> TrialAttention:
    """The attention views of one scored trial: runs ``model.attention_rows`` on the prompt
    (``trial_ids``: a :class:`~retrieval_heads.trials.trial.Trial`, or its input ids) followed by
    the record's generated ids, at the first ``max_steps`` answer steps.

    Needle, answer, question and distractor spans come from a ``Trial``, else from the
    arguments or ``record.params`` (``needle_span``, ``answer_span``), else from the copy
    events. Note: ``attention_rows`` returns every layer and head, ``[layer, head, step,
    tokens]`` floats; keep ``max_steps`` small for long contexts on big models.
    """
    import torch

    spans: dict[str, Any] = {"distractor_spans": []}
    if hasattr(trial_ids, "input_ids"):  # a haystack Trial
        prompt = [int(t) for t in trial_ids.input_ids]
        spans.update(_spans_of_trial(trial_ids))
    else:
        prompt = [int(t) for t in torch.as_tensor(trial_ids).reshape(-1).tolist()]
        answer = _span(record.params.get("answer_span"))
        spans["needle_span"] = _span(record.params.get("needle_span")) or answer
        spans["answer_span"] = answer
    if needle_span is not None:
        spans["needle_span"] = needle_span
    if question_span is not None:
        spans["question_span"] = question_span
    parsed = [model.check_head(h) for h in heads]
    if (record.n_layers, record.n_heads) != (model.n_layers, model.n_heads):
        raise ValueError(
            f"trial {record.trial_id!r} was scored on {record.n_layers}x{record.n_heads} heads, "
            f"the model has {model.n_layers}x{model.n_heads}"
        )
    n_steps = min(len(record.generated_ids), max_steps)
    if n_steps < 1 or not prompt:
        raise ValueError(f"trial {record.trial_id!r} has no prompt or no generated tokens")
    ids = torch.tensor(prompt + [int(t) for t in record.generated_ids[:n_steps]])
    queries = [len(prompt) - 1 + s for s in range(n_steps)]
    pattern = model.attention_rows(ids, queries)  # [layer, head, step, key]
    rows = torch.stack([pattern[h.layer, h.head] for h in parsed]).float().cpu().numpy()
    del pattern
    tokens = list(model.to_str_tokens(ids))
    if title is None:
        title = (
            f"Trial {record.trial_id}: expected {record.expected!r}, generated "
            f"{record.generated_text!r} ({'passed' if record.passed else 'failed'}, "
            f"recall {record.recall:.2f})"
        )
    view = attention_view(
        tokens,
        rows,
        parsed,
        queries,
        needle_span=spans.get("needle_span"),
        answer_span=spans.get("answer_span"),
        question_span=spans.get("question_span"),
        distractor_spans=spans["distractor_spans"],
        copy_events=[e for e in record.copy_events if e[0] < n_steps],
        window=window,
        max_tokens=max_tokens,
        head_labels=head_labels,
        title=title,
    )
    if n_steps < len(record.generated_ids):
        view.notes.append(
            f"Showing the first {n_steps} of {len(record.generated_ids)} answer steps."
        )
    return view
