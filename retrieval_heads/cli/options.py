"""What an option's text may be: each type of the ``retrieval-heads`` parser refuses what its
option cannot mean, naming what it can (exit 2 through argparse, docs/errors.md E55).

Integers in ASCII digits with a lower bound, comma-separated lists of them or of finite numbers
(``_Listed`` also takes them space-separated), a share from 0 to 1, a non-empty path or model
name, and the multi-device and sharding values (``--device-map``, ``--max-memory``,
``--shard``; docs/scale.md). Each is a plain function ``text -> value``; none loads a model.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path


class _Listed(argparse.Action):
    """A list option that takes commas, spaces or both: ``--lengths 1000,2000`` or
    ``--lengths 1000 2000`` (each piece is parsed by the option's ``type``, then flattened)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("nargs", "+")
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, [x for piece in values for x in piece])


# --- option values: each type refuses what the option cannot mean, naming what it can ---------

_INT = re.compile(r"\s*[+-]?[0-9]+\s*")
_NUMBER = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*")


def _integer(low: int | None = None):
    """An ``int`` type written in ASCII digits (not ``1.5``, ``1e3``, ``1_000``), ``>= low``."""

    def parse(text: str) -> int:
        if not _INT.fullmatch(text):
            allowed = f" (expected an integer >= {low})" if low is not None else ""
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}{allowed}")
        value = int(text)
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


_any_int = _integer()  # a bound checked later, with its own message (docs/errors.md)
_positive_int = _integer(1)
_non_negative_int = _integer(0)


def _int_list(low: int | None = None):
    """Comma-separated integers (at least one), each ``>= low``; empty pieces are skipped."""

    def parse(text: str) -> list[int]:
        pieces = [x for x in text.split(",") if x.strip()]
        if not pieces or not all(_INT.fullmatch(x) for x in pieces):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        values = [int(x) for x in pieces]
        for value in values:
            if low is not None and value < low:
                raise argparse.ArgumentTypeError(
                    f"expected comma-separated integers >= {low}, got {value} in {text!r}"
                )
        return values

    return parse


_ints = _int_list()
_positive_ints = _int_list(1)


def _floats(text: str) -> list[float]:
    """Comma-separated finite numbers (at least one); not ``nan``, ``inf`` or ``1e999``."""
    pieces = [x for x in text.split(",") if x.strip()]
    if not pieces or not all(_NUMBER.fullmatch(x) for x in pieces):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    values = [float(x) for x in pieces]
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def _fraction(text: str) -> float:
    """A number from 0 to 1 (a share of accuracy)."""
    if not _NUMBER.fullmatch(text) or not 0 <= float(text) <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return float(text)


def _path(text: str) -> Path:
    """A path; not an empty one, which would silently mean the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"expected a path, got {text!r} (an empty path would mean the current directory)"
        )
    return Path(text)


def _model_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"expected a registry name, a model directory, a .gguf file or a hub id, got {text!r}"
        )
    return text


# --- multi-device and sharding options (docs/scale.md) -----------------------------------------


def _device_map(text: str):
    from retrieval_heads.model import DEVICE_MAP_DIRECTIVES

    if text in DEVICE_MAP_DIRECTIVES:
        return text
    source = text
    if not text.lstrip().startswith("{"):
        if not Path(text).is_file():
            raise argparse.ArgumentTypeError(
                f"expected {', '.join(DEVICE_MAP_DIRECTIVES)}, a JSON object or a JSON file; "
                f"got {text!r}"
            )
        source = Path(text).read_text(encoding="utf-8")
    try:
        mapping = json.loads(source)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({exc})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise argparse.ArgumentTypeError(
            f"expected a JSON object {{module: device}} of at least one entry, got {text!r}"
        )
    return mapping


def _max_memory(text: str) -> dict:
    """``0=70GiB,1=70GiB,cpu=200GiB`` or JSON; GPU indices become integers, as accelerate wants."""
    try:
        pairs = json.loads(text) if text.lstrip().startswith("{") else None
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({exc})") from None
    if pairs is None:
        items = [item.split("=", 1) for item in text.split(",") if item.strip()]
        if not items or any(len(item) != 2 or not all(x.strip() for x in item) for item in items):
            raise argparse.ArgumentTypeError(
                f"expected DEVICE=SIZE pairs like 0=70GiB,1=70GiB,cpu=200GiB; got {text!r}"
            )
        pairs = {k.strip(): v.strip() for k, v in items}
    if not isinstance(pairs, dict) or not pairs:
        raise argparse.ArgumentTypeError(
            f"expected a JSON object {{device: size}} of at least one entry, got {text!r}"
        )
    return {
        (int(k) if str(k).isdigit() else k): (int(v) if str(v).isdigit() else v)
        for k, v in pairs.items()
    }


def _shard(text: str):
    from retrieval_heads.sharding import Shard

    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _batch_size(text: str) -> int | None:
    """``auto`` (``None``: from the device's memory) or a positive integer."""
    if text == "auto":
        return None
    try:
        return _integer(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"invalid batch size: {text!r} (expected 'auto' or an integer >= 1)"
        ) from None


def _scorer_names(text: str) -> list[str]:
    """Names of extra scorers, comma- or space-separated (``write,query_focused``)."""
    from retrieval_heads.scoring import EXTRA_SCORERS

    names = [n for n in text.replace(",", " ").split() if n]
    if not names:
        raise argparse.ArgumentTypeError(
            f"expected scorer names among {', '.join(EXTRA_SCORERS)}, got {text!r}"
        )
    unknown = [n for n in names if n not in EXTRA_SCORERS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scorer {unknown[0]!r}: the scorers are {', '.join(EXTRA_SCORERS)}"
        )
    return names
