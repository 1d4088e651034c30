"""Compatibility module: the trial code now lives in the :mod:`retrieval_heads.trials` package.

``from retrieval_heads.haystack import build_trial`` (and every other name this module exported)
keeps working; new code imports from the owners:

- :mod:`retrieval_heads.trials.needles`: ``Needle``, ``NeedleSet``, ``load_needles``,
  ``default_needles``, ``key_value_needles``, ``NEEDLES_PATH``;
- :mod:`retrieval_heads.trials.haystacks`: ``Haystack``, ``FILLER_PATH``;
- :mod:`retrieval_heads.trials.template`: ``PromptTemplate``, ``DEFAULT_TEMPLATE``,
  ``PAPER_TEMPLATE``;
- :mod:`retrieval_heads.trials.trial`: ``Trial``, ``PlacedNeedle``;
- :mod:`retrieval_heads.trials.builder`: ``build_trial``, ``check_trial_tokens``,
  ``BoundaryFallbackWarning``, ``DEFAULT_MAX_OFFSET``;
- :mod:`retrieval_heads.trials.grid`: ``make_grid``, ``linspace_lengths``, ``linspace_depths``;
- :mod:`retrieval_heads.trials.base`: ``TrialError``, ``DATA_DIR``;
- :mod:`retrieval_heads.tiny.trials`: ``tiny_grid``, ``tiny_needles``, ``tiny_needle_sets``, and
  what were ``Haystack.tiny(seed)`` and ``PromptTemplate.tiny()``: ``tiny_haystack(seed)`` and
  ``tiny_template()``. They are looked up on first use through
  :func:`retrieval_heads.trials.world_trials`, so importing this module does not load the
  embedded world.
"""

from __future__ import annotations

from typing import Any

from retrieval_heads.trials import world_trials
from retrieval_heads.trials.base import DATA_DIR, TrialError
from retrieval_heads.trials.builder import (
    DEFAULT_MAX_OFFSET,
    BoundaryFallbackWarning,
    build_trial,
    check_trial_tokens,  # noqa: F401  (public, though never in __all__)
)
from retrieval_heads.trials.grid import linspace_depths, linspace_lengths, make_grid
from retrieval_heads.trials.haystacks import FILLER_PATH, Haystack
from retrieval_heads.trials.needles import (
    NEEDLES_PATH,
    Needle,
    NeedleSet,
    default_needles,
    key_value_needles,
    load_needles,
)
from retrieval_heads.trials.template import DEFAULT_TEMPLATE, PAPER_TEMPLATE, PromptTemplate
from retrieval_heads.trials.trial import PlacedNeedle, Trial

__all__ = [
    "DATA_DIR",
    "DEFAULT_MAX_OFFSET",
    "DEFAULT_TEMPLATE",
    "FILLER_PATH",
    "NEEDLES_PATH",
    "PAPER_TEMPLATE",
    "BoundaryFallbackWarning",
    "Haystack",
    "Needle",
    "NeedleSet",
    "PlacedNeedle",
    "PromptTemplate",
    "Trial",
    "TrialError",
    "build_trial",
    "default_needles",
    "key_value_needles",
    "linspace_depths",
    "linspace_lengths",
    "load_needles",
    "make_grid",
    "tiny_needle_sets",  # noqa: F822  (from retrieval_heads.tiny.trials, by __getattr__)
    "tiny_needles",  # noqa: F822
]

_TINY_NAMES = ("tiny_grid", "tiny_needles", "tiny_needle_sets")


def __getattr__(name: str) -> Any:
    if name in _TINY_NAMES:
        return getattr(world_trials("tiny"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
