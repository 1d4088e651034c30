"""The ground the trial modules stand on: the error they raise, the package's data folder, a
seeded random generator that does not depend on Python's salted ``hash``, and how a file that is
not UTF-8 is described.

It owns no trial logic, and imports nothing from the package.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

__all__ = ["DATA_DIR", "TrialError"]

DATA_DIR = Path(__file__).parent.parent / "data"


class TrialError(ValueError):
    """A trial cannot be built as asked. The message names the trial's parameters."""


def _rng(*parts: Any) -> random.Random:
    """A generator seeded by a stable hash of ``parts`` (not Python's salted ``hash``)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _not_utf8(error: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (it holds byte {error.object[error.start]:#04x}; is it binary?)"
