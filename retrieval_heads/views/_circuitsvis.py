"""The circuitsvis embedding of the attention views: views kept as element and props, the
JavaScript bundle written once per page, token text that cannot become HTML.

circuitsvis' ``RenderedHTML.local_src`` inlines its 1.3 MB bundle in every view, and its
``str()`` loads the bundle from a CDN (never used here). :class:`CircuitsVisView` keeps what
``local_src`` renders and writes the bundle once per page (:func:`circuitsvis_js`), with the
props as script-safe JSON; :func:`cv_text` shows ``<``, ``>`` and ``&`` in tokens as look-alikes
(circuitsvis puts token strings into the page as raw HTML). :class:`TrialAttention` is one
trial's page. Building the views from attention rows is :mod:`retrieval_heads.views.attention`.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval_heads.files import atomic_write_text, check_output_file
from retrieval_heads.heads import Head
from retrieval_heads.views._attention_grid import AttentionGrid
from retrieval_heads.views._html import (
    esc,
    generator_meta,
    inline_js,
    script_json,
    written_by,
)

if TYPE_CHECKING:  # pragma: no cover
    pass

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


#: Named in a saved page's head, so that saving again may replace it and nothing else.
GENERATOR = "retrieval-heads attention view"


def _page(title: str, body: str, n_views: int) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"{generator_meta(GENERATOR)}"
        f"<title>{esc(title)}</title><script>{circuitsvis_js()}</script></head>"
        f'<body style="font-family: sans-serif" data-figures="0" data-views="{n_views}">'
        f"{body}</body></html>\n"
    )


@dataclass
class TrialAttention:
    """The attention views of one trial: the answer-steps x context grid (HTML, see
    :mod:`._attention_grid`), circuitsvis views, the crop, the copy events shown."""

    title: str
    heads: list[Head]
    n_tokens: int
    crop: str
    views: list[CircuitsVisView]
    grid: AttentionGrid | None = None
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
        if self.grid is not None:
            parts.append(self.grid.to_html())
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
        """Write :meth:`standalone_html` to ``path``, atomically. Inside a results folder it
        refuses the folder's own files and any file it did not write (E56)."""
        path = Path(path)
        check_output_file(path, "attention view", is_ours=lambda p: written_by(p, GENERATOR))
        atomic_write_text(path, self.standalone_html())
        return path
