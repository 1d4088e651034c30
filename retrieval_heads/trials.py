"""``make_trials``: the needle-in-a-haystack grid for a model, in whichever world it speaks.

The embedded ``tiny`` models get their own synthetic world (its haystack, needles and template);
every other model gets the built-in filler text and needles (or the user's), in its chat template
when it is an instruct model of the registry (``chat=None``) or when asked (``chat=True``).
The command line, the demo and the experiment scripts all build their grids here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retrieval_heads import haystack as hs
from retrieval_heads import registry
from retrieval_heads.haystack import Trial, TrialError


def uses_chat(model: Any, chat: bool | None = None) -> bool:
    """Whether prompts for ``model`` go through its chat template: ``chat``, or by default
    what the registry says of the model's name (on for instruct models)."""
    return registry.default_chat(getattr(model, "name", "")) if chat is None else bool(chat)


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
        return hs.tiny_grid(
            model.tokenizer,
            lengths=lengths,
            depths=depths,
            n_needles=4 if n_needles is None else n_needles,
            n_distractors=n_distractors,
            seed=seed,
        )
    text = hs.Haystack.from_path(haystack) if haystack else hs.Haystack.filler()
    pool = hs.load_needles(needles) if needles else hs.default_needles()
    if not pool:
        raise TrialError(f"needles file {needles} holds no needles")
    if n_needles is None:
        n_needles = len(pool) if needles else 4
    if n_needles > len(pool):
        where = f"the needles file {needles} holds" if needles else "there are"
        fix = "" if needles else ": write more to a JSONL file and pass --needles"
        raise TrialError(f"--n-needles {n_needles}: {where} only {len(pool)} needles{fix}")
    return hs.make_grid(
        model.tokenizer,
        text,
        pool[:n_needles],
        lengths=lengths,
        depths=depths,
        n_distractors=n_distractors,
        distractor_pool=pool,
        seed=seed,
        template=hs.PromptTemplate(chat=True) if uses_chat(model, chat) else None,
        n_ctx=model.n_ctx,
    )
