"""Seeded random generators that do not depend on Python's salted ``hash``.

:func:`seeded_rng` is the one way the package derives a ``random.Random`` from a run's
parameters: trial building (haystack offsets, needle placement, distractors, key/value needles,
the embedded world's distractors and controls), head selection (random and layer-matched
controls, activation patching's pairs) and the KV-cache what-if's random KV heads. The same
parts give the same stream on every machine and Python version, so every draw can be redone
from its parameters alone.

It imports nothing from the package.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

__all__ = ["seeded_rng"]


def seeded_rng(*parts: Any) -> random.Random:
    """A generator seeded by a stable hash of ``parts`` (not Python's salted ``hash``).

    The seed is the first 8 bytes (big-endian) of the SHA-256 of ``json.dumps(parts,
    sort_keys=True, default=str)``: tuples encode as lists, dict keys are sorted, and a value
    JSON cannot hold is encoded as its ``str`` (so ``numpy.int64(3)`` is ``"3"``, not ``3``:
    pass Python numbers for a stream that matches them). Changing this encoding changes every
    seeded trial id and draw the package has written.
    """
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))
