"""The published format: ``{"<layer>-<head>": [score in each successful trial, ...]}``.

The score files Wu et al. (2024) published: :func:`import_published` reads one (or such a dict)
into a :class:`~retrieval_heads.scores.HeadScores`; :func:`export_published`,
:func:`dumps_published` and :func:`write_published` give one back. Its import and export are
lossless: exporting an imported file and writing it with ``json.dumps`` gives back the same bytes
for all seven reference files (values that were JSON integers stay integers).

It never computes statistics (``HeadScores`` does) and never writes over a results folder's files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_heads.files import (
    ResultsError,
    _column,
    _parse_label,
    _read_json,
    _table,
    atomic_write_text,
    check_output_file,
)
from retrieval_heads.heads import Head
from retrieval_heads.scores import HeadScores

__all__ = ["import_published", "export_published", "dumps_published", "write_published"]


def import_published(
    source: str | Path | Mapping[str, Any],
    *,
    n_layers: int | None = None,
    n_heads: int | None = None,
    scorer: str = "retrieval",
    name: str | None = None,
) -> HeadScores:
    """Read a published ``{"<layer>-<head>": [score per successful trial]}`` file or dict.

    The shape is inferred from the labels (largest layer and head + 1) unless given; heads the
    file does not list are absent (NaN), not zero. Lists may differ in length (the table is
    padded with NaN). All trials count as passing: the files hold successful trials only. Which
    values were JSON integers is remembered, so :func:`export_published` gives the file back.
    Raises :class:`ResultsError` naming the file and the offending key on bad input.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        where = f"published score file {path}"
        data = _read_json(path, "published score file")
        label_source: str | None = str(path)
    else:
        where = f"published scores {name or '<dict>'}"
        data = source
        label_source = name
    if not isinstance(data, Mapping):
        raise ResultsError(
            f"{where}: expected a JSON object {{'layer-head': [scores]}}, got {type(data).__name__}"
        )
    if not data:
        raise ResultsError(f"{where}: has no heads")
    if (n_layers is None) != (n_heads is None):
        raise ValueError("give both n_layers and n_heads, or neither")
    parsed: list[tuple[Head, str, list]] = []
    seen: dict[Head, str] = {}
    for label, column in data.items():
        head = _parse_label(label, where, n_layers, n_heads)
        if head in seen:
            raise ResultsError(f"{where}: keys {seen[head]!r} and {label!r} name the same head")
        seen[head] = label
        if not isinstance(column, list):
            raise ResultsError(
                f"{where}: key {label!r}: expected a list of scores, got {type(column).__name__}"
            )
        parsed.append((head, label, column))
    if n_layers is None or n_heads is None:
        n_layers = max(h.layer for h, _, _ in parsed) + 1
        n_heads = max(h.head for h, _, _ in parsed) + 1
    n_trials = max(len(column) for _, _, column in parsed)
    values = _table((n_trials, n_layers, n_heads), where)
    int_mask = np.zeros(values.shape, dtype=bool)
    present = np.zeros((n_layers, n_heads), dtype=bool)
    for head, label, column in parsed:
        present[head.layer, head.head] = True
        col, is_int = _column(column, where, label)
        values[: len(column), head.layer, head.head] = col
        int_mask[: len(column), head.layer, head.head] = is_int
    return HeadScores(
        values,
        np.ones(n_trials, dtype=bool),
        [f"published-{i}" for i in range(n_trials)],
        scorer=scorer,
        present=present,
        int_mask=int_mask,
        source=label_source,
    )


def export_published(scores: HeadScores, *, passing_only: bool = True) -> dict[str, list]:
    """The published format: ``{"L-H": [score per passing trial]}``, heads in (layer, head) order.

    Trials without a score for a head are left out of its list. Values imported as JSON integers
    are written as integers, so import → export → ``json.dumps`` reproduces a published file.
    """
    rows = np.flatnonzero(scores.passed) if passing_only else np.arange(scores.n_total)
    out: dict[str, list] = {}
    for h in scores.heads():
        out[h.dashed] = [x for x in scores._trial_values(h.layer, h.head, rows) if x is not None]
    return out


def dumps_published(published: Mapping[str, list]) -> str:
    """Serialise like the authors did (``json.dumps`` defaults: ``", "`` and ``": "``)."""
    return json.dumps(published, allow_nan=False)


def write_published(scores: HeadScores, path: str | Path, *, passing_only: bool = True) -> None:
    """Export ``scores`` to the published format, atomically (never over a run's own files)."""
    check_output_file(path, "exported score file", is_ours=_is_published_file)
    atomic_write_text(path, dumps_published(export_published(scores, passing_only=passing_only)))


def _is_published_file(path: Path) -> bool:
    """Whether ``path`` holds scores in the published format (an earlier export)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and all(
        isinstance(k, str) and k.replace("-", "", 1).isdigit() and "-" in k for k in data
    )
