"""Fixed-width text tables (``format_table``) and the order rows keyed by values of mixed
types are listed in (``sort_key``: numbers by value, then anything else by its text).

What the summaries print through: :func:`retrieval_heads.analysis.summary_table`, the K-sweep
and KV-curve tables of :mod:`retrieval_heads.summaries`, and the experiments' own tables.
Pure functions, numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["format_table", "sort_key"]


def sort_key(value: Any) -> tuple:
    """Numbers (not bools) first, by value; then anything else, by its text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _cell(value: Any, precision: int) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{precision}f}"
    return str(value)


def format_table(
    rows: Sequence[Sequence[Any]], headers: Sequence[str], *, precision: int = 3
) -> str:
    """A fixed-width text table: numbers right-aligned, text left-aligned, floats rounded."""
    cells = [[_cell(v, precision) for v in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells for {len(headers)} headers")
    numeric = [
        all(
            isinstance(row[i], (int, float, np.integer, np.floating))
            and not isinstance(row[i], bool)
            for row in rows
        )
        and bool(rows)
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    return "\n".join(out) + "\n"
