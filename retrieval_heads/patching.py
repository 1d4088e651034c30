"""Activation patching per head: how much of a needle's answer each head carries.

- :class:`PatchingPair` — a clean prompt and its corruption (the same tokens, another value);
- :func:`patching_pairs` — such pairs in the embedded model's world, depths spread evenly;
- :func:`patching_map` — each head's clean ``z`` patched into the corrupt run
  (:func:`~retrieval_heads.interventions.patch_heads`; pairs in batches:
  :func:`~retrieval_heads.interventions.patch_heads_batch`), the recovered logit difference
  averaged over the pairs;
- :func:`patching_vs_scores` — the map's agreement with the retrieval scores.

The pairs are built in the embedded model's synthetic language (its needles, haystack, template
and value words), which this module reaches only through the trials package's one seam to it,
:func:`retrieval_heads.trials.world_trials`: it never imports :mod:`retrieval_heads.tiny`, and
importing it does not load the world. It never chooses heads to ablate (that is
:mod:`retrieval_heads.selection`) nor decodes (that is :mod:`retrieval_heads.causal`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from retrieval_heads import analysis
from retrieval_heads.model import HookedModel
from retrieval_heads.seeding import seeded_rng
from retrieval_heads.selection import Scores, _table
from retrieval_heads.trials import world_trials
from retrieval_heads.trials.builder import build_trial

__all__ = ["PatchingPair", "patching_map", "patching_pairs", "patching_vs_scores"]


@dataclass(frozen=True)
class PatchingPair:
    """A clean prompt (needle A) and its corruption (same prompt, needle B's value in place)."""

    clean_ids: tuple[int, ...]
    corrupt_ids: tuple[int, ...]
    answer_token: int  # first token of A's value
    wrong_token: int  # first token of B's value
    trial_id: str
    answer: str
    wrong_answer: str
    depth_percent: float


def patching_pairs(
    model: HookedModel, n_pairs: int = 8, seed: int = 0, length: int = 128, n_distractors: int = 0
) -> list[PatchingPair]:
    """Clean/corrupt pairs in the embedded model's world, depths spread evenly over 0..100.

    The clean prompt is an ordinary NIAH trial (held-out keys); the corrupt one is the same
    token sequence with the needle's value replaced by another value of the same length whose
    every word differs (the question, the key and every position stay the same).
    """
    # The embedded world's needles, haystack, template, value words and encoding, through the
    # trials package's one seam to them (this module never imports retrieval_heads.tiny).
    tiny = world_trials("tiny")
    sets = tiny.tiny_needle_sets(n_pairs, seed, n_distractors=n_distractors)
    haystack = tiny.tiny_haystack(seed)
    template = tiny.tiny_template()
    values = tiny.tiny_value_words()
    rng = seeded_rng("patching_pairs", seed)
    pairs = []
    for i, needle_set in enumerate(sets):
        depth = 100.0 * i / (n_pairs - 1) if n_pairs > 1 else 50.0
        trial = build_trial(
            model.tokenizer,
            haystack,
            needle_set,
            length=length,
            depth_percent=depth,
            template=template,
            seed=seed,
            n_ctx=model.n_ctx,
        )
        words = trial.answer.split()
        other = [rng.choice([w for w in values if w != word]) for word in words]
        wrong = " ".join(other)
        start, end = trial.answer_span
        replacement = tiny.tiny_encode(model, wrong, "patching value")
        if len(replacement) != end - start:
            raise ValueError(
                f"the corrupt value {wrong!r} has {len(replacement)} tokens, the clean one "
                f"{end - start}"
            )
        corrupt = list(trial.input_ids)
        corrupt[start:end] = replacement
        pairs.append(
            PatchingPair(
                clean_ids=trial.input_ids,
                corrupt_ids=tuple(corrupt),
                answer_token=trial.input_ids[start],
                wrong_token=replacement[0],
                trial_id=trial.trial_id,
                answer=trial.answer,
                wrong_answer=wrong,
                depth_percent=depth,
            )
        )
    return pairs


def patching_map(
    model: HookedModel,
    n_pairs: int = 8,
    seed: int = 0,
    length: int = 128,
    *,
    batch_size: int | None = 1,
) -> Float[Tensor, "layer head"]:
    """Per-head recovery of the logit difference, averaged over :func:`patching_pairs`.

    For each pair, :func:`~retrieval_heads.interventions.patch_heads` patches each head's clean
    ``z`` (every position) into the corrupt run and measures ``(ld_patched - ld_corrupt) /
    (ld_clean - ld_corrupt)`` with ``ld = logit[A's first token] - logit[B's first token]`` at
    the last prompt position; the map is the mean over pairs (pairs whose recovery is undefined
    are skipped). The pairs run as units of :func:`~retrieval_heads.runner.run_sweep`, each one
    record (:func:`pair_record`), in memory (nothing is written, so there is nothing to resume).
    Returns a float32 ``[n_layers, n_heads]`` tensor on the CPU.

    ``batch_size``: pairs patched together (:func:`pair_records`: their clean prompts in one
    batch, their corrupted ones in another, and each layer's patched runs as one batch of
    ``batch_size x n_heads`` copies); ``None`` picks it from the device's memory
    (:func:`~retrieval_heads.batched.auto_batch_size` with a pair counted as ``n_heads``
    copies: 1 on a CPU). Each pair's record is the one it gets alone, its recoveries within
    float rounding (a batched matrix product may add in another order).
    """
    from retrieval_heads.runner import Unit, run_sweep

    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (or None: from the memory), got {batch_size}")
    pairs = patching_pairs(model, n_pairs, seed, length)
    size = batch_size
    if size is None:
        from retrieval_heads.batched import auto_batch_size

        tokens = len(pairs[0].clean_ids) if pairs else length
        size = auto_batch_size(model, tokens, copies=model.n_heads)
    records = run_sweep(
        [Unit(pair.trial_id, pair) for pair in pairs],
        lambda unit: pair_record(model, unit.item),
        model=getattr(model, "name", None) or "model",
        kind="patch",
        config={"n_pairs": n_pairs, "seed": seed, "length": length},  # not the batch size
        run_batch=lambda units: pair_records(model, [unit.item for unit in units]),
        batch_key=lambda unit: len(unit.item.clean_ids),  # one length: no padding
        batch_size=size,
    )
    defined = [r for r in records if r.passed]
    if not defined:
        return torch.full((model.n_layers, model.n_heads), math.nan)
    stacked = torch.tensor([r.scores["patching"] for r in defined], dtype=torch.float32)
    return stacked.sum(0) / len(defined)


def pair_record(model: HookedModel, pair: PatchingPair) -> Any:
    """One pair's patching effect as a record: ``scores["patching"]`` is each head's recovery
    (``passed`` is False, and the table zeros, where the recovery is undefined: the clean and
    corrupt logit differences are equal)."""
    from retrieval_heads.interventions import patch_heads

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        effect = patch_heads(
            model,
            list(pair.clean_ids),
            list(pair.corrupt_ids),
            pair.answer_token,
            pair.wrong_token,
        )
    return _record(model, pair, effect.float().cpu())


def pair_records(model: HookedModel, pairs: list[PatchingPair]) -> list[Any]:
    """:func:`pair_record` for pairs of one length patched together
    (:func:`~retrieval_heads.interventions.patch_heads_batch`), one record each, in order."""
    from retrieval_heads.interventions import patch_heads_batch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        effects = patch_heads_batch(
            model,
            [list(p.clean_ids) for p in pairs],
            [list(p.corrupt_ids) for p in pairs],
            [p.answer_token for p in pairs],
            [p.wrong_token for p in pairs],
        )
    return [_record(model, p, e) for p, e in zip(pairs, effects.float().cpu(), strict=True)]


def _record(model: HookedModel, pair: PatchingPair, effect: Tensor) -> Any:
    from retrieval_heads.records import TrialRecord

    defined = not bool(torch.isnan(effect).any())  # [layer, head]
    return TrialRecord(
        trial_id=pair.trial_id,
        params={"task": "patching", "depth_percent": pair.depth_percent},
        expected=pair.answer,
        generated_ids=[],
        generated_text="",
        passed=defined,
        recall=float(defined),
        reason=None if defined else "recovery undefined: clean and corrupt runs agree",
        scores={"patching": torch.nan_to_num(effect, nan=0.0).tolist()},
        copy_events=[],
        n_layers=model.n_layers,
        n_heads=model.n_heads,
    )


def patching_vs_scores(effect: Tensor | np.ndarray, scores: Scores) -> dict[str, float]:
    """Pearson and Spearman correlation between a patching map and retrieval scores (per head)."""
    table = effect.detach().cpu().double().numpy() if isinstance(effect, Tensor) else effect
    table = np.asarray(table, dtype=np.float64)
    return {
        "pearson": analysis.pearson(table, scores),
        "spearman": analysis.spearman(table, scores),
        "n_heads": int((~np.isnan(table) & ~np.isnan(_table(scores))).sum()),
    }
