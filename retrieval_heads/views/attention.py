"""Attention views of one trial (circuitsvis), cropped around the needle so pages stay small.

For chosen heads, the attention of each answer step (decode step ``s`` reads the token at
``query_positions[s]``: the last prompt token at step 0, then each generated token) over a window
around the needle, the question and the generated tokens; the rest of the context is folded into
gap tokens ``[… 3,890 tokens …]`` that carry the attention mass of what they hide, and the page
says where the crop lies ("positions 0, 4,010–4,119, 31,990–32,011 of 32,012"). Two circuitsvis
views per trial:

- ``AttentionHeads`` (:func:`circuitsvis.attention.attention_heads`): per head, the answer steps'
  attention over the cropped tokens (choose a step to see its row);
- ``ColoredTokens`` (:func:`circuitsvis.tokens.colored_tokens`), one per head: the cropped
  context coloured by the head's mean attention per answer step.

Tokens a shown head copied (its copy events) are marked ``✓`` in both, and listed in a table.
circuitsvis puts token strings into the page as raw HTML, so ``<``, ``>`` and ``&`` in tokens are
shown as ``‹``, ``›`` and ``＆`` (:func:`cv_text`).

:func:`attention_view` is pure (token strings and a ``[head, step, key]`` array in), so it runs
without a model; :func:`trial_attention` gets the rows from ``model.attention_rows`` itself.

Embedding: circuitsvis' ``RenderedHTML.local_src`` inlines its 1.3 MB JavaScript bundle in every
view (``str()`` of it loads the bundle from a CDN: never used here). :class:`CircuitsVisView`
keeps what ``local_src`` renders (element and props) and writes the bundle once per page
(:func:`circuitsvis_js`), with the props as script-safe JSON (a token ``</script>`` cannot end
the script).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval_heads.heads import Head
from retrieval_heads.views._html import esc, fmt_int, inline_js, script_json

if TYPE_CHECKING:  # pragma: no cover
    from retrieval_heads.haystack import Trial
    from retrieval_heads.model import HookedModel
    from retrieval_heads.results import TrialRecord

__all__ = [
    "CircuitsVisView",
    "TrialAttention",
    "attention_view",
    "trial_attention",
    "circuitsvis_js",
    "COPY_MARK",
    "cv_text",
]

COPY_MARK = "✓"
"""Appended to a token that one of the shown heads copied."""

_ELEMENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_START_TAG = '<script crossorigin type="module">'
_CALL = "CircuitsVis.render("
_CALL_RE = re.compile(
    r'CircuitsVis\.render\(\s*"[^"]*"\s*,\s*CircuitsVis\.(\w+)\s*,\s*(.*)\)\s*</script>\s*$', re.S
)


_LOOKALIKES = str.maketrans({"<": "‹", ">": "›", "&": "＆"})


def cv_text(text: str) -> str:
    """A string made safe for circuitsvis, which renders token strings as raw HTML
    (``dangerouslySetInnerHTML`` in ``ColoredTokens`` and ``AttentionHeads`` of 1.43.3):
    ``<``, ``>``, ``&`` become the look-alikes ``‹``, ``›``, ``＆``, so no markup or entity can
    form and canvas labels (which show text as is) stay readable."""
    return str(text).translate(_LOOKALIKES)


def _split_local_src(local_src: str) -> tuple[str, str, dict[str, Any]]:
    """``(bundle, element, props)`` of a circuitsvis ``RenderedHTML.local_src``."""
    start, call = local_src.find(_START_TAG), local_src.rfind(_CALL)
    match = _CALL_RE.match(local_src, call) if call >= 0 else None
    if start < 0 or match is None:
        raise RuntimeError(
            "circuitsvis rendered HTML in an unexpected shape (this module reads the output of "
            "circuitsvis 1.43's render_local); check the installed circuitsvis version"
        )
    return local_src[start + len(_START_TAG) : call], match.group(1), json.loads(match.group(2))


@functools.lru_cache(maxsize=1)
def circuitsvis_js() -> str:
    """The circuitsvis bundle (defines the global ``CircuitsVis``) as ``local_src`` inlines it,
    made safe for one ``<script>`` element; about 1.3 MB."""
    from circuitsvis.tokens import colored_tokens

    bundle, _, _ = _split_local_src(colored_tokens(["a"], [0.0]).local_src)
    if "CircuitsVis" not in bundle:
        raise RuntimeError("the circuitsvis bundle does not define CircuitsVis")
    return inline_js(bundle.strip())


@dataclass(frozen=True)
class CircuitsVisView:
    """One circuitsvis element (``"AttentionHeads"``, ``"ColoredTokens"``, ...) and its props.

    ``title`` and ``caption`` are plain text. :meth:`to_html` needs :func:`circuitsvis_js` once
    on the page, before it; :meth:`standalone_html` is a whole page.
    """

    element: str
    props: dict[str, Any]
    title: str = ""
    caption: str = ""

    def __post_init__(self) -> None:
        if not _ELEMENT_RE.fullmatch(self.element):
            raise ValueError(f"not a circuitsvis element name: {self.element!r}")

    @classmethod
    def from_rendered(cls, rendered: Any, *, title: str = "", caption: str = "") -> CircuitsVisView:
        """From a circuitsvis ``RenderedHTML`` (reads its ``local_src``, never the CDN form)."""
        _, element, props = _split_local_src(rendered.local_src)
        return cls(element, props, title, caption)

    def to_html(self, view_id: str) -> str:
        head = f'<div class="cv-title">{esc(self.title)}</div>' if self.title else ""
        cap = f'<div class="cv-caption">{esc(self.caption)}</div>' if self.caption else ""
        call = (
            f"CircuitsVis.render({script_json(view_id)}, CircuitsVis.{self.element}, "
            f"{script_json(self.props)});"
        )
        return (
            f'<div class="cv-view">{head}{cap}'
            f'<div class="cv-root" id="{esc(view_id)}" data-cv-element="{esc(self.element)}">'
            f"</div><script>{call}</script></div>"
        )

    def standalone_html(self) -> str:
        return _page(self.title or self.element, self.to_html("cv-view-0"), 1)


def _page(title: str, body: str, n_views: int) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><script>{circuitsvis_js()}</script></head>"
        f'<body style="font-family: sans-serif" data-figures="0" data-views="{n_views}">'
        f"{body}</body></html>\n"
    )


@dataclass
class TrialAttention:
    """The attention views of one trial: circuitsvis views, the crop, the copy events shown."""

    title: str
    heads: list[Head]
    n_tokens: int
    crop: str
    views: list[CircuitsVisView]
    copy_rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    n_copy_events: int = 0

    def to_html(self, id_prefix: str = "attn") -> str:
        """An HTML fragment (needs :func:`circuitsvis_js` earlier on the page)."""
        parts = ['<div class="trial-attention">']
        if self.title:
            parts.append(f'<h4 class="trial-title">{esc(self.title)}</h4>')
        parts.append(f'<p class="crop">{esc(self.crop)}</p>')
        parts += [f'<p class="note">{esc(n)}</p>' for n in self.notes]
        parts += [v.to_html(f"{id_prefix}-{i}") for i, v in enumerate(self.views)]
        parts.append(self._copy_table())
        parts.append("</div>")
        return "\n".join(parts)

    def _copy_table(self) -> str:
        heads = ", ".join(h.dotted for h in self.heads)
        if not self.copy_rows:
            return f'<p class="note">No copy events by heads {esc(heads)} in the steps shown.</p>'
        rows = "".join(
            "<tr>"
            + "".join(
                f"<td>{esc(r[k])}</td>"
                for k in ("step", "generated", "head", "key_position", "key_token")
            )
            + "</tr>"
            for r in self.copy_rows
        )
        more = ""
        if self.n_copy_events > len(self.copy_rows):
            more = (
                f"<p class='note'>{self.n_copy_events - len(self.copy_rows)} more not listed.</p>"
            )
        return (
            f'<table class="copy-events"><caption>Copy events of heads {esc(heads)}</caption>'
            "<thead><tr><th>step</th><th>generated</th><th>head</th><th>key position</th>"
            f"<th>token copied</th></tr></thead><tbody>{rows}</tbody></table>{more}"
        )

    def _repr_html_(self) -> str:
        """Jupyter shows the view inline, with circuitsvis' JavaScript inlined (no CDN)."""
        return self.standalone_html()

    def standalone_html(self) -> str:
        """A whole page (circuitsvis bundle inlined once, no network)."""
        return _page(self.title or "attention", self.to_html(), len(self.views))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.standalone_html(), encoding="utf-8")
        return path


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


def _crop_text(positions: Sequence[int], n_tokens: int) -> str:
    parts = [fmt_int(a) if a == b else f"{fmt_int(a)}–{fmt_int(b)}" for a, b in _runs(positions)]
    return (
        f"Showing token positions {', '.join(parts)} of {fmt_int(n_tokens)} "
        f"({fmt_int(len(positions))} tokens); the hidden ones are folded into [… n tokens …] "
        "markers holding their attention mass."
    )


def _as_array(rows: Any) -> np.ndarray:
    if hasattr(rows, "detach"):  # a torch tensor
        rows = rows.detach().float().cpu().numpy()
    return np.asarray(rows, dtype=np.float64)


def attention_view(
    tokens: Sequence[str],
    rows: Any,
    heads: Sequence[Head | str | tuple[int, int]],
    query_positions: Sequence[int],
    *,
    needle_span: tuple[int, int] | None = None,
    question_span: tuple[int, int] | None = None,
    copy_events: Iterable[Sequence[int]] = (),
    window: int = 24,
    max_tokens: int = 160,
    head_labels: Sequence[str] | None = None,
    title: str = "",
    max_copy_rows: int = 40,
) -> TrialAttention:
    """The attention views of one trial from arrays (no model needed).

    ``tokens``: the token strings of the whole sequence (prompt, then generated tokens);
    ``rows``: ``[head, step, key]`` attention of the chosen ``heads`` (same order) at the
    ``query_positions`` (one per step; ``key`` indexes ``tokens``), e.g.
    ``model.attention_rows(ids, query_positions)[layer, head]`` stacked;
    ``needle_span``/``question_span``: token ``[start, end)``; without a needle span the window
    is centred on the copied tokens, else on the most attended token;
    ``copy_events``: ``(step, layer, head, key_position)``, those of the chosen heads are marked.
    Shown: the first token, ``window`` tokens either side of the needle, the question (else the
    ``window`` tokens before the first query), and every token from the first query on;
    ``window`` shrinks until at most ``max_tokens`` positions are shown.
    """
    heads = [Head.parse(h) for h in heads]
    att = _as_array(rows)
    if att.ndim != 3:
        raise ValueError(f"rows must be [head, step, key], got shape {att.shape}")
    n_heads, n_steps, n_keys = att.shape
    queries = [int(q) for q in query_positions]
    n = len(tokens)
    if n_heads != len(heads):
        raise ValueError(f"rows has {n_heads} heads, {len(heads)} head labels given")
    if n_steps != len(queries) or n_steps == 0:
        raise ValueError(f"rows has {n_steps} steps, {len(queries)} query positions given")
    if n_keys > n:
        raise ValueError(f"rows has {n_keys} keys but there are only {n} tokens")
    if any(not 0 <= q < n_keys for q in queries):
        raise ValueError(f"query positions must lie in 0-{n_keys - 1}, got {queries}")
    att = np.nan_to_num(att, nan=0.0)
    index = {h: i for i, h in enumerate(heads)}
    events = [tuple(int(v) for v in e) for e in copy_events]
    mine = [e for e in events if Head(e[1], e[2]) in index and 0 <= e[0] < n_steps]
    copied = {e[3] for e in mine}
    prompt_end = queries[0] + 1
    notes: list[str] = []

    centre: tuple[int, int] | None = needle_span
    if centre is None and copied:
        centre = (min(copied), max(copied) + 1)
        notes.append("No needle span given: the window is centred on the tokens copied.")
    elif centre is None:
        mass = att.mean(axis=(0, 1))
        mass[:1] = 0.0
        mass[max(1, prompt_end - window) :] = 0.0
        c = int(mass.argmax())
        centre = (c, c + 1)
        notes.append("No needle span given: the window is centred on the most attended token.")

    def select(w: int) -> list[int]:
        keep: set[int] = {0}

        def add(a: int, b: int) -> None:
            keep.update(range(max(0, a), min(n_keys, b)))

        add(centre[0] - w, centre[1] + w)
        for k in copied:
            add(k - 2, k + 3)
        if question_span is not None:
            add(question_span[0], question_span[1])
        else:
            add(prompt_end - w, prompt_end)
        add(queries[0], n_keys)
        return sorted(keep)

    w = max(0, int(window))
    shown = select(w)
    while len(shown) > max_tokens and w > 2:
        w //= 2
        shown = select(w)
    if w < window:
        notes.append(f"Window narrowed from {window} to {w} tokens to keep the page small.")

    # display items: a shown token, or a gap folding [a, b)
    items: list[tuple[int, int]] = []  # (a, b): b == a + 1 and a in shown -> a token
    prev = -1
    for p in shown:
        if p > prev + 1:
            items.append((prev + 1, p))
        items.append((p, p + 1))
        prev = p
    if prev < n_keys - 1:
        items.append((prev + 1, n_keys))
    shown_set = set(shown)
    is_gap = [not (b == a + 1 and a in shown_set) for a, b in items]
    cum = np.concatenate([np.zeros((n_heads, n_steps, 1)), np.cumsum(att, axis=-1)], axis=-1)
    starts = np.array([a for a, _ in items])
    ends = np.array([b for _, b in items])
    folded = cum[:, :, ends] - cum[:, :, starts]  # [head, step, item]

    def label(i: int) -> str:
        a, b = items[i]
        if is_gap[i]:
            return f"[… {fmt_int(b - a)} tokens …]"
        return tokens[a] + (COPY_MARK if a in copied else "")

    labels = [cv_text(label(i)) for i in range(len(items))]
    # Word-level tokenizers give tokens without their spaces: show them spaced.
    spaced = labels
    real = [labels[i] for i in range(len(items)) if not is_gap[i]]
    if real and sum(any(c.isspace() for c in t) for t in real) < 0.05 * len(real):
        spaced = [t + " " for t in labels]
    item_of = {a: i for i, (a, b) in enumerate(items) if not is_gap[i]}
    matrix = np.zeros((n_heads, len(items), len(items)))
    for s, q in enumerate(queries):
        matrix[:, item_of[q], :] = folded[:, s, :]
    matrix = np.round(matrix, 4)
    real_cells = folded[:, :, ~np.asarray(is_gap)]
    top_cell = float(real_cells.max()) if real_cells.size else 1.0
    scale = max(top_cell, 1e-3)
    names = list(head_labels) if head_labels is not None else [f"head {h.dotted}" for h in heads]
    cv_names = [cv_text(name) for name in names]

    from circuitsvis.attention import attention_heads
    from circuitsvis.tokens import colored_tokens

    steps_text = (
        f"{n_steps} answer step{'s' if n_steps != 1 else ''} (step 0 reads the last prompt "
        "token, step s the token generated at step s-1)"
    )
    views = [
        CircuitsVisView.from_rendered(
            attention_heads(
                attention=matrix.tolist(),
                tokens=labels,
                attention_head_names=cv_names,
                max_value=scale,
                min_value=0.0,
                mask_upper_tri=False,
            ),
            title="Attention of the answer steps, per head",
            caption=(
                f"Rows with attention: the {steps_text}. Columns: the cropped tokens; "
                f"{COPY_MARK} marks a token one of these heads copied. Colour scale 0 to "
                f"{scale:.3f} (the largest weight on a shown token)."
            ),
        )
    ]
    for i in range(n_heads):
        mean = folded[i].mean(axis=0)  # [item]
        values = np.where(is_gap, 0.0, mean)
        gap_labels = [
            f"[… {fmt_int(b - a)} tokens: {100 * mean[j]:.0f}% …] " if is_gap[j] else spaced[j]
            for j, (a, b) in enumerate(items)
        ]
        top = float(values.max()) if values.size else 0.0
        views.append(
            CircuitsVisView.from_rendered(
                colored_tokens(
                    tokens=gap_labels,
                    values=np.round(values, 4).tolist(),
                    min_value=0.0,
                    max_value=max(top, 1e-6),
                ),
                title=f"Head {heads[i].dotted}: mean attention per answer step",
                caption=(
                    f"Over the {steps_text}; darkest = {top:.3f}. Hidden stretches show the "
                    "share of attention they received."
                ),
            )
        )

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
        for s, layer, head, k in sorted(mine)
    ]
    return TrialAttention(
        title=title,
        heads=heads,
        n_tokens=n,
        crop=_crop_text(shown, n),
        views=views,
        copy_rows=rows_out[:max_copy_rows],
        notes=notes,
        n_copy_events=len(rows_out),
    )


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


def trial_attention(
    model: HookedModel,
    record: TrialRecord,
    trial_ids: Trial | Sequence[int] | Any,
    heads: Sequence[Head | str | tuple[int, int]],
    *,
    window: int = 24,
    max_steps: int = 16,
    max_tokens: int = 160,
    needle_span: tuple[int, int] | None = None,
    question_span: tuple[int, int] | None = None,
    head_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> TrialAttention:
    """The attention views of one scored trial: runs ``model.attention_rows`` on the prompt
    (``trial_ids``: a :class:`~retrieval_heads.haystack.Trial`, or its input ids) followed by
    the record's generated ids, at the first ``max_steps`` answer steps.

    Needle and question spans come from a ``Trial`` (its target needle, and what follows its
    context), else from the arguments or ``record.params["needle_span"]``, else from the copy
    events. Note: ``attention_rows`` returns every layer and head, ``[layer, head, step,
    tokens]`` floats; keep ``max_steps`` small for long contexts on big models.
    """
    import torch

    if hasattr(trial_ids, "input_ids"):  # a haystack Trial
        trial = trial_ids
        prompt = [int(t) for t in trial.input_ids]
        if needle_span is None and getattr(trial, "needles", None):
            needle_span = tuple(trial.target.span)
        ctx_end = int(getattr(trial, "context_span", (0, 0))[1])
        if question_span is None and 0 < ctx_end < len(prompt):
            question_span = (ctx_end, len(prompt))
    else:
        ids = torch.as_tensor(trial_ids)
        prompt = [int(t) for t in ids.reshape(-1).tolist()]
    if needle_span is None:
        needle_span = _span(record.params.get("needle_span")) or _span(
            record.params.get("answer_span")
        )
    heads = [model.check_head(h) for h in heads]
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
    rows = torch.stack([pattern[h.layer, h.head] for h in heads]).float().cpu().numpy()
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
        heads,
        queries,
        needle_span=needle_span,
        question_span=question_span,
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
