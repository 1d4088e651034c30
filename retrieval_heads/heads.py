"""Head labels: one value type for "layer L, head H", shared by every module.

Kept free of torch so results files and analyses can use it without loading a model.
Three spellings are accepted, because each is in use somewhere:

- ``"L.H"``  — this project's display form (``"14.7"``);
- ``"L-H"``  — the published score files of Wu et al. (``"14-7"``);
- ``"LxHy"`` — TransformerLens-style labels (``"L14H7"``).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

_PATTERNS = (
    re.compile(r"^\s*(\d+)\s*[.\-]\s*(\d+)\s*$"),
    re.compile(r"^\s*[Ll](\d+)\s*[Hh](\d+)\s*$"),
)


def _index(value: object, label: object) -> int:
    """One half of a ``(layer, head)`` pair: a non-negative integer, or a string of digits."""
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        return int(value)
    if not isinstance(value, (str, bool, float)):
        try:
            number = operator.index(value)  # type: ignore[arg-type]  # int, numpy integers; else TypeError
        except TypeError:
            pass
        else:
            if number >= 0:
                return number
    raise ValueError(
        f"malformed head label {label!r}: a pair must hold two non-negative integers, e.g. (3, 5)"
    )


@dataclass(frozen=True, order=True)
class Head:
    """One attention head: ``layer`` and ``head`` counted from 0."""

    layer: int
    head: int

    @classmethod
    def parse(cls, label: str | Head | tuple[int, int]) -> Head:
        """Parse ``"L.H"``, ``"L-H"`` or ``"LxHy"`` (also accepts a ``Head`` or a pair)."""
        if isinstance(label, Head):
            return label
        if isinstance(label, tuple) and len(label) == 2:
            return cls(_index(label[0], label), _index(label[1], label))
        if not isinstance(label, str):
            raise ValueError(f"head label must be a string like '3.5', got {label!r}")
        for pattern in _PATTERNS:
            match = pattern.match(label)
            if match:
                return cls(int(match.group(1)), int(match.group(2)))
        raise ValueError(
            f"malformed head label {label!r}: write it as 'L.H' (e.g. '3.5'), 'L-H' or 'L3H5'"
        )

    def check(self, n_layers: int, n_heads: int) -> Head:
        """Return self, or raise if the head does not exist in a model of this shape."""
        if not (0 <= self.layer < n_layers and 0 <= self.head < n_heads):
            raise ValueError(
                f"head {self} is out of range: the model has layers 0-{n_layers - 1} "
                f"and heads 0-{n_heads - 1} per layer"
            )
        return self

    @property
    def dotted(self) -> str:
        return f"{self.layer}.{self.head}"

    @property
    def dashed(self) -> str:
        """The published score files' form, ``"L-H"``."""
        return f"{self.layer}-{self.head}"

    @property
    def tl(self) -> str:
        return f"L{self.layer}H{self.head}"

    def __str__(self) -> str:
        return self.dotted


def parse_heads(
    labels: str | list, n_layers: int | None = None, n_heads: int | None = None
) -> list[Head]:
    """Parse a comma-separated string or a list of labels; range-check when the shape is given."""
    if isinstance(labels, str):
        labels = [part for part in labels.split(",") if part.strip()]
    try:
        items = list(labels)
    except TypeError:
        raise ValueError(
            f"head labels must be a comma-separated string or a list, got {labels!r}"
        ) from None
    heads = [Head.parse(label) for label in items]
    if n_layers is not None and n_heads is not None:
        heads = [h.check(n_layers, n_heads) for h in heads]
    return heads
