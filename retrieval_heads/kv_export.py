"""The KV-cache what-if's result as files: the chosen full-attention heads in DuoAttention's
layout and as a plain JSON list.

:func:`export_heads` writes a ``layers x kv_heads`` tab-separated matrix (1: keep the whole
context, 0: windowed) with a ``config.json`` holding ``sink_size`` and ``recent_size`` (what
``duo_attn.utils.load_attn_pattern`` reads), the KV heads' scores in the same layout, and a JSON
listing; :func:`export_chosen` picks the smallest sufficient top-K of a finished simulation
(:mod:`retrieval_heads.kvcache`) and exports it. It runs no model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_heads import analysis
from retrieval_heads.files import atomic_write_text
from retrieval_heads.records import TrialRecord

__all__ = ["export_chosen", "export_heads"]

KVHead = tuple[int, int]


def export_heads(
    out: str | Path,
    full_kv_heads: Iterable[KVHead],
    kv_scores: np.ndarray,
    *,
    sink: int,
    window: int,
    group_size: int,
    layer_windows: Sequence[int | None] | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the chosen full-attention KV heads for a serving stack; returns the paths.

    - ``duo_attention/full_attention_heads.tsv``: ``layers x kv_heads``, 1 for a full head and
      0 for a windowed one, tab-separated, with ``duo_attention/config.json`` (``sink_size``,
      ``recent_size``): the directory DuoAttention's ``load_attn_pattern`` reads;
    - ``kv_head_scores.tsv``: the same layout holding each KV head's score in [0, 1], for
      tools that pick their own sparsity;
    - ``full_attention_heads.json``: the list (``[[layer, kv_head], ...]``, best first), the
      query heads they serve, the window and whatever ``info`` adds (model, K, share, accuracy).
      With ``layer_windows`` (a model with sliding-window layers) it also lists each layer's own
      window and, under ``full_heads_in_sliding_layers``, the "full" heads whose layer keeps only
      its window anyway: a serving stack must not read those as holding the whole context.
    """
    out = Path(out)
    chosen = [tuple(map(int, h)) for h in full_kv_heads]
    n_layers, n_kv = kv_scores.shape
    binary = np.zeros((n_layers, n_kv))
    for layer, kv in chosen:
        binary[layer, kv] = 1.0
    paths = {
        "duo_tsv": out / "duo_attention" / "full_attention_heads.tsv",
        "duo_config": out / "duo_attention" / "config.json",
        "scores_tsv": out / "kv_head_scores.tsv",
        "json": out / "full_attention_heads.json",
    }
    paths["duo_tsv"].parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths["duo_tsv"], _tsv(binary))
    atomic_write_text(
        paths["duo_config"], json.dumps({"sink_size": sink, "recent_size": window}, indent=1)
    )
    atomic_write_text(paths["scores_tsv"], _tsv(np.clip(kv_scores, 0.0, 1.0)))
    listing = {
        **(info or {}),
        "sink": sink,
        "window": window,
        "n_layers": n_layers,
        "n_kv_heads": n_kv,
        "full_attention_heads": [list(h) for h in chosen],
        "query_heads": [
            f"{layer}.{kv * group_size + i}" for layer, kv in chosen for i in range(group_size)
        ],
    }
    windows = list(layer_windows) if layer_windows is not None else [None] * n_layers
    if any(w is not None for w in windows):
        listing["layer_windows"] = windows
        listing["full_heads_in_sliding_layers"] = [
            [layer, kv, windows[layer]] for layer, kv in chosen if windows[layer] is not None
        ]
    atomic_write_text(paths["json"], json.dumps(listing, indent=1) + "\n")
    return paths


def _tsv(table: np.ndarray) -> str:
    return "".join("\t".join(f"{v:.6g}" for v in row) + "\n" for row in table)


def export_chosen(
    out: str | Path,
    records: Sequence[TrialRecord],
    run_config: dict[str, Any],
    *,
    tolerance: float = 0.05,
    layer_windows: Sequence[int | None] | None = None,
    info: dict[str, Any] | None = None,
) -> tuple[analysis.KVPoint, dict[str, Path]]:
    """Pick the smallest sufficient top-K of a finished sweep (its records and the config
    :func:`simulate` stored) and :func:`export_heads` it into ``out``; returns the point and
    the paths. Works on a merged sharded run as on a single one. When no K measured keeps
    accuracy within ``tolerance`` of the full cache, the largest K is exported and the listing
    says so (``within_tolerance: false``, beside ``baseline_accuracy``)."""
    from retrieval_heads.kvcache import top_kv_heads  # the ranking the sweep used

    kv_scores = np.asarray(run_config["kv_scores"], dtype=np.float64)  # [layer, kv_head]
    curve = analysis.kv_curve(records)
    chosen = analysis.smallest_sufficient_k(curve, tolerance)
    n_heads = records[0].n_heads
    assert chosen.sink is not None and chosen.window is not None  # a top-K point
    paths = export_heads(
        out,
        top_kv_heads(kv_scores, chosen.k),
        kv_scores,
        sink=int(chosen.sink),
        window=int(chosen.window),
        group_size=n_heads // kv_scores.shape[1],
        layer_windows=layer_windows,
        info={
            **(info or {}),
            "reduce": run_config.get("reduce"),
            "k": chosen.k,
            "kv_share": round(chosen.kv_share, 6),
            "accuracy": chosen.accuracy,
            "tolerance": tolerance,
            # False when no K measured came within tolerance: this is then the largest K
            "baseline_accuracy": analysis.baseline_accuracy(curve),
            "within_tolerance": analysis.is_sufficient(chosen, curve, tolerance),
        },
    )
    return chosen, paths
