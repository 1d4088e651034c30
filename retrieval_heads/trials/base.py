"""The ground the trial modules stand on: the error they raise, the package's data folder, and
how a file that is not UTF-8 is described. (Their seeded random generator is
:func:`retrieval_heads.seeding.seeded_rng`, which the rest of the package shares.)

It owns no trial logic, and imports nothing from the package.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATA_DIR", "TrialError"]

DATA_DIR = Path(__file__).parent.parent / "data"


class TrialError(ValueError):
    """A trial cannot be built as asked. The message names the trial's parameters."""


def _not_utf8(error: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (it holds byte {error.object[error.start]:#04x}; is it binary?)"
