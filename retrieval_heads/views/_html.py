"""HTML helpers shared by the views: escaping, script-safe JSON, inlined JavaScript.

Everything that comes from results (model names, needle texts, answers, params, token strings)
is untrusted text. In HTML it goes through :func:`esc`; inside a ``<script>`` it goes through
:func:`script_json`, which escapes ``<``, ``>`` and ``&`` (and U+2028/U+2029) as ``\\uXXXX`` so
no string can close the script element or open a comment; inlined libraries go through
:func:`inline_js`.
"""

from __future__ import annotations

import functools
import html
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["esc", "script_json", "jsonable", "inline_js", "plotly_js", "fmt_int", "fmt_float"]

_SCRIPT_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_SCRIPT_RE = re.compile("[<>&\u2028\u2029]")


def esc(value: Any) -> str:
    """``html.escape`` of ``str(value)`` (quotes too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def generator_meta(generator: str) -> str:
    """The ``<meta name="generator">`` tag a page of ours carries in its head, so that writing
    it again may replace it (:func:`written_by`) and nothing else."""
    return f'<meta name="generator" content="{generator}">'


def written_by(path: Any, generator: str) -> bool:
    """Whether the file at ``path`` is a page ``generator`` wrote (its first 512 bytes carry
    :func:`generator_meta`); False for a missing or unreadable file."""
    try:
        with open(path, "rb") as f:
            return generator_meta(generator).encode() in f.read(512)
    except OSError:
        return False


def jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays to Python, non-finite floats to ``None``."""
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        x = float(value)
        return x if math.isfinite(x) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, str):
        return value
    return str(value)


def script_json(value: Any) -> str:
    """JSON that is safe inside ``<script>``: ``</script>`` or ``<!--`` in a string cannot
    end or derail the element (``<``, ``>``, ``&`` become ``\\u003c`` ...)."""
    text = json.dumps(jsonable(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return _SCRIPT_RE.sub(lambda m: _SCRIPT_ESCAPES[m.group(0)], text)


_CLOSE_RE = re.compile(r"</(script)", re.IGNORECASE)


def inline_js(source: str) -> str:
    """A library's source made safe to inline in one ``<script>`` element.

    ``</script`` and ``<!--`` can only occur inside string literals of a minified library, where
    ``\\x3C`` means the same character; the source-map comment is dropped (nothing to fetch).
    """
    source = _CLOSE_RE.sub(r"\\x3C/\1", source)
    source = source.replace("<!--", "\\x3C!--")
    return re.sub(r"\n//# sourceMappingURL=\S*\s*$", "\n", source)


@functools.lru_cache(maxsize=1)
def plotly_js() -> str:
    """plotly.js as shipped with the installed plotly (about 4.8 MB), ready to inline."""
    from plotly.offline import get_plotlyjs

    return inline_js(get_plotlyjs())


def fmt_int(n: int | float) -> str:
    """``32000`` -> ``"32,000"``."""
    return f"{int(n):,}"


def fmt_float(x: float | None, digits: int = 3) -> str:
    """A float to ``digits`` decimals, ``"—"`` for missing or NaN."""
    if x is None or not math.isfinite(float(x)):
        return "—"
    return f"{float(x):.{digits}f}"
