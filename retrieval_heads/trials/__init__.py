"""Needle-in-a-haystack trials, and ``make_trials``: a model's grid, in whichever world it speaks.

The embedded ``tiny`` models get their own synthetic world (its haystack, needles and template);
every other model gets the built-in filler text and needles (or the user's), in its chat template
when it is an instruct model of the registry (``chat=None``) or when asked (``chat=True``).
The command line, the demo and the experiment scripts all build their grids here.

The package's modules, in the one direction data flows through them (``base`` under all)::

    needles ──► trial ─────┐
    tokens ──► haystacks ──┼──► builder ──► grid ──► make_trials (here)
    template ──────────────┘

- :mod:`~retrieval_heads.trials.base`: :class:`TrialError`, the data folder (their seeded RNG is
  :func:`retrieval_heads.seeding.seeded_rng`, shared with the rest of the package);
- :mod:`~retrieval_heads.trials.needles`: :class:`Needle`, :class:`NeedleSet`, JSONL needles,
  key/value needles;
- :mod:`~retrieval_heads.trials.tokens`: the tokenizer adapter (continuation ids, BOS, sentence
  boundaries found by decoding);
- :mod:`~retrieval_heads.trials.haystacks`: :class:`Haystack` sources and their token streams;
- :mod:`~retrieval_heads.trials.template`: :class:`PromptTemplate`;
- :mod:`~retrieval_heads.trials.trial`: :class:`Trial` and :class:`PlacedNeedle` (the value
  scoring consumes, and its JSON form);
- :mod:`~retrieval_heads.trials.builder`: :func:`build_trial`, trial ids,
  :func:`check_trial_tokens`, :class:`BoundaryFallbackWarning`;
- :mod:`~retrieval_heads.trials.grid`: :func:`make_grid`, :func:`linspace_lengths`,
  :func:`linspace_depths`, :func:`default_lengths` (the lengths fit to a model's context).

None of them knows the embedded model's world: its trials are in
:mod:`retrieval_heads.tiny.trials`, reached only through :func:`world_trials`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from retrieval_heads import registry
from retrieval_heads.trials.base import DATA_DIR, TrialError
from retrieval_heads.trials.builder import (
    DEFAULT_MAX_OFFSET,
    BoundaryFallbackWarning,
    build_trial,
    check_trial_tokens,
)
from retrieval_heads.trials.grid import (
    default_lengths,
    linspace_depths,
    linspace_lengths,
    make_grid,
)
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
    "check_trial_tokens",
    "default_lengths",
    "default_needles",
    "key_value_needles",
    "linspace_depths",
    "linspace_lengths",
    "load_needles",
    "make_grid",
    "make_trials",
    "uses_chat",
    "world_trials",
]


def uses_chat(model: Any, chat: bool | None = None) -> bool:
    """Whether prompts for ``model`` go through its chat template: ``chat``, or by default
    what the registry says of the model's name (on for instruct models)."""
    return registry.default_chat(getattr(model, "name", "")) if chat is None else bool(chat)


def world_trials(world: str) -> ModuleType:
    """The trials module of a synthetic world (a model's ``world``, from its registry entry):
    ``"tiny"`` -> :mod:`retrieval_heads.tiny.trials` (``tiny_grid``, ``tiny_needles``,
    ``tiny_needle_sets``, ``tiny_haystack``, ``tiny_template``, ``tiny_value_words``,
    ``tiny_encode``)."""
    # The one seam between the generic trial modules and the embedded model's world. None of
    # them imports retrieval_heads.tiny: its haystack, needles and template live beside the world
    # in tiny/, and load only when a tiny model's grid, a tiny trial record (the views rebuild
    # one), activation patching's clean/corrupt pairs (retrieval_heads.patching) or an old
    # retrieval_heads.haystack.tiny_* name asks for them. A new world adds a branch here and its
    # own <world>/trials.py.
    if world == "tiny":
        from retrieval_heads.tiny import trials as tiny_trials

        return tiny_trials
    raise TrialError(f"no trials for the synthetic world {world!r}: the only one is 'tiny'")


def make_trials(
    model: Any,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    n_needles: int | None = None,
    n_distractors: int = 2,
    seed: int = 0,
    needles: str | Path | None = None,
    haystack: str | Path | None = None,
    chat: bool | None = None,
) -> list[Trial]:
    """Trials for every length x depth x needle, for ``model`` (a :class:`HookedModel`).

    ``needles`` (a JSONL file; all of its needles are targets) and ``haystack`` (a ``.txt`` file
    or a folder of them) replace the built-in ones and take the model out of its embedded world.
    Distractors come from the whole needle set, so fewer targets than ``n_distractors + 1``
    still find their distractors. ``n_needles``: the targets, the first N needles (default: 4
    built-in ones, or every needle of the file); more than there are is an error.
    """
    tiny = getattr(model, "world", None) == "tiny" and needles is None and haystack is None
    if tiny:
        if chat:
            raise TrialError(
                f"{model.name} speaks its own synthetic language and has no chat template: "
                "drop --chat"
            )
        return world_trials("tiny").tiny_grid(
            model.tokenizer,
            lengths=lengths,
            depths=depths,
            n_needles=4 if n_needles is None else n_needles,
            n_distractors=n_distractors,
            seed=seed,
        )
    text = Haystack.from_path(haystack) if haystack else Haystack.filler()
    pool = load_needles(needles) if needles else default_needles()
    if not pool:
        raise TrialError(f"needles file {needles} holds no needles")
    if n_needles is None:
        n_needles = len(pool) if needles else 4
    if n_needles > len(pool):
        where = f"the needles file {needles} holds" if needles else "there are"
        fix = "" if needles else ": write more to a JSONL file and pass --needles"
        raise TrialError(f"--n-needles {n_needles}: {where} only {len(pool)} needles{fix}")
    return make_grid(
        model.tokenizer,
        text,
        pool[:n_needles],
        lengths=lengths,
        depths=depths,
        n_distractors=n_distractors,
        distractor_pool=pool,
        seed=seed,
        template=PromptTemplate(chat=True) if uses_chat(model, chat) else None,
        n_ctx=model.n_ctx,
    )
