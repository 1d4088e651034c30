"""The embedded model's trials: its haystack, needles, prompt template and grid.

Everything about trials that knows :mod:`retrieval_heads.tiny.world` lives here, built from the
generic trial modules (:mod:`retrieval_heads.trials`), which never import it:
:func:`retrieval_heads.trials.make_trials` reaches this module through its one seam,
:func:`retrieval_heads.trials.world_trials`, and so does :mod:`retrieval_heads.patching` for its
clean/corrupt pairs (the value words, :func:`tiny_value_words`, and the ``<unk>``-checked
encoding, :func:`tiny_encode`, which the controls in :mod:`retrieval_heads.tiny.controls` share).
It never runs a model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from retrieval_heads.seeding import seeded_rng
from retrieval_heads.tiny import world
from retrieval_heads.trials.grid import make_grid
from retrieval_heads.trials.haystacks import Haystack, _shared
from retrieval_heads.trials.needles import Needle, NeedleSet
from retrieval_heads.trials.template import PromptTemplate
from retrieval_heads.trials.trial import Trial

__all__ = [
    "tiny_encode",
    "tiny_grid",
    "tiny_haystack",
    "tiny_needle_sets",
    "tiny_needles",
    "tiny_template",
    "tiny_value_words",
]


def tiny_haystack(seed: int = 0) -> Haystack:
    """The embedded model's synthetic language: endless sentences ending in ``" ."``."""

    def make() -> Haystack:
        return Haystack.from_generator(
            lambda: world.haystack_sentences(seed), name=f"tiny:seed={seed}", sep=" "
        )

    return _shared(f"tiny:{seed}", make)


def tiny_template() -> PromptTemplate:
    """The embedded model's template (its training format: context, then question)."""
    return PromptTemplate(world.PROMPT_TEMPLATE, name="tiny")


def tiny_needles(n: int, seed: int = 0, *, split: str = "test", n_values: int = 3) -> list[Needle]:
    """``n`` needles in the embedded model's synthetic language (``retrieval_heads.tiny.world``)."""
    return [s.targets[0] for s in tiny_needle_sets(n, seed, split=split, n_values=n_values)]


def tiny_needle_sets(
    n: int, seed: int = 0, *, split: str = "test", n_values: int = 3, n_distractors: int = 0
) -> list[NeedleSet]:
    """Like :func:`tiny_needles`, each with ``n_distractors`` of the world's own distractors."""

    def to_needle(d: dict[str, Any], needle_id: str) -> Needle:
        return Needle(needle_id, d["text"], d["question"], d["answer"])

    rng = random.Random(seed)  # targets: the same whatever n_distractors is
    sets = []
    for i in range(n):
        target = world.make_needle(rng, split=split, n_values=n_values)
        others = []
        if n_distractors:
            others = world.make_distractors(
                seeded_rng("tiny-distractors", seed, i), target, n_distractors, split=split
            )
        base = f"tiny-{split}-s{seed}-{i}"
        sets.append(
            NeedleSet(
                targets=(to_needle(target, base),),
                distractors=tuple(to_needle(d, f"{base}-d{j}") for j, d in enumerate(others)),
                kind="multikey" if others else "single",
            )
        )
    return sets


def tiny_grid(
    tokenizer: Any,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    n_needles: int = 4,
    n_distractors: int = 2,
    seed: int = 0,
    split: str = "test",
) -> list[Trial]:
    """The embedded model's NIAH grid: its own haystack, needles with distractors and template."""
    needles = tiny_needle_sets(n_needles, seed, split=split, n_distractors=n_distractors)
    return make_grid(
        tokenizer,
        tiny_haystack(seed),
        needles,
        lengths=lengths,
        depths=depths,
        seed=seed,
        template=tiny_template(),
    )


def tiny_value_words() -> tuple[str, ...]:
    """The words a needle's value is made of in the embedded world (its number words, in order)."""
    return tuple(world.NUMBERS)


def tiny_encode(model: Any, text: str, what: str) -> list[int]:
    """``text`` in ``model``'s tokenizer (no special tokens); ``ValueError`` naming ``what`` when
    the tokenizer maps a word to ``<unk>`` (it does not speak the embedded model's language)."""
    tokenizer = model.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        raise ValueError(
            f"{what}: the model's tokenizer does not cover the embedded model's language (it "
            "maps some words to <unk>); these controls are for load_model('tiny')"
        )
    return list(ids)
