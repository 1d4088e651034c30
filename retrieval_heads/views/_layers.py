"""Per-layer attention windows in the per-head heatmaps: which layers are global.

Models such as Gemma 3 mix sliding-window layers (each query sees only the last ``w`` keys)
with a few global ones; a head that retrieves from thousands of tokens back can only sit in a
global layer. Detection runs record the windows in ``meta["extra"]["model_info"]
["layer_windows"]`` (one entry per layer: the window in tokens, or ``None`` for global
attention; :meth:`retrieval_heads.model.HookedModel.layer_windows` gives the same list). The
heatmaps label each layer row with its kind, outline the global rows and say so in the hover.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

__all__ = [
    "LayerWindows",
    "layer_windows_from_meta",
    "layer_kind",
    "windows_summary",
    "mark_layers",
]

LayerWindows = Sequence[int | None]
GLOBAL_COLOR = "#d62728"


def _valid(value: Any, n_layers: int) -> list[int | None] | None:
    """``value`` as a per-layer window list, or ``None`` when it is not one for ``n_layers``."""
    if not isinstance(value, (list, tuple)) or len(value) != n_layers:
        return None
    out: list[int | None] = []
    for w in value:
        if w is None:
            out.append(None)
        elif isinstance(w, int) and not isinstance(w, bool) and w > 0:
            out.append(int(w))
        else:
            return None
    return out


def layer_windows_from_meta(meta: Mapping[str, Any], n_layers: int) -> list[int | None] | None:
    """``meta["extra"]["model_info"]["layer_windows"]`` when it fits ``n_layers``, else None."""
    extra = meta.get("extra")
    info = extra.get("model_info") if isinstance(extra, Mapping) else None
    value = info.get("layer_windows") if isinstance(info, Mapping) else None
    return _valid(value, n_layers)


def layer_windows_from_model(model: Any, n_layers: int) -> list[int | None] | None:
    """``model.layer_windows()`` when the model has it and its depth is ``n_layers``."""
    get = getattr(model, "layer_windows", None)
    if model is None or get is None or getattr(model, "n_layers", None) != n_layers:
        return None
    try:
        return _valid(list(get()), n_layers)
    except Exception:  # noqa: BLE001 - a model without configs for this only loses the marks
        return None


def is_mixed(windows: LayerWindows | None) -> bool:
    """Whether the layers differ in their attention window (only then are rows marked)."""
    return windows is not None and len(set(windows)) > 1


def layer_kind(window: int | None) -> str:
    return "global" if window is None else f"sliding window {window:,}"


def windows_summary(windows: LayerWindows) -> str:
    """``"global: layers 5, 11, 17; sliding window 512: the other 15"`` (plain text)."""
    globals_ = [i for i, w in enumerate(windows) if w is None]
    sliding = sorted({w for w in windows if w is not None})
    if not globals_:
        return "every layer: " + ", ".join(layer_kind(w) for w in sliding)
    if not sliding:
        return "every layer: global"
    parts = [f"global: layer{'s' if len(globals_) > 1 else ''} {', '.join(map(str, globals_))}"]
    for w in sliding:
        layers = [i for i, x in enumerate(windows) if x == w]
        parts.append(
            f"{layer_kind(w)}: the other {len(layers)}"
            if len(sliding) == 1
            else f"{layer_kind(w)}: layers {', '.join(map(str, layers))}"
        )
    return "; ".join(parts)


def _tick(layer: int, window: int | None) -> str:
    if window is None:
        return f'<b style="color:{GLOBAL_COLOR}">{layer} (global)</b>'
    return f'<span style="color:#777">{layer} (window {window:,})</span>'


def mark_layers(fig: go.Figure, windows: LayerWindows | None, n_cols: int) -> go.Figure:
    """Label each layer row with its attention kind, outline the global rows and add the kind
    to every cell's hover; nothing when the layers do not differ."""
    if not is_mixed(windows):
        return fig
    assert windows is not None
    n_layers = len(windows)
    fig.update_yaxes(
        tickmode="array",
        tickvals=list(range(n_layers)),
        ticktext=[_tick(i, w) for i, w in enumerate(windows)],
    )
    for layer, w in enumerate(windows):
        if w is None:
            fig.add_shape(
                type="rect",
                xref="x",
                yref="y",
                x0=-0.5,
                x1=n_cols - 0.5,
                y0=layer - 0.5,
                y1=layer + 0.5,
                line=dict(color=GLOBAL_COLOR, width=2),
                fillcolor="rgba(0,0,0,0)",
                layer="above",
            )
    for trace in fig.data:
        _hover_layer_kind(trace, windows)
    margin = dict(fig.layout.margin.to_plotly_json()) if fig.layout.margin else {}
    fig.update_layout(margin={**margin, "l": 125})
    return fig


def _hover_layer_kind(trace: Any, windows: LayerWindows) -> None:
    """Append each row's layer kind to a heatmap's customdata and hover text."""
    if trace.type != "heatmap" or trace.customdata is None or not trace.hovertemplate:
        return
    rows = [list(map(list, row)) for row in trace.customdata]
    k = len(rows[0][0]) if rows and rows[0] else 0
    trace.customdata = [
        [cell + [layer_kind(windows[layer])] for cell in row] for layer, row in enumerate(rows)
    ]
    trace.hovertemplate = trace.hovertemplate.replace(
        "<extra></extra>", f"<br>layer attention: %{{customdata[{k}]}}<extra></extra>"
    )
