"""Activation patching per head, on any model and any pair of prompts.

:func:`patch_heads` measures, for each head, how much of the clean-vs-corrupted logit
difference (answer - wrong, last position) is recovered when that head's ``z`` at every
position of the corrupted run is replaced by its clean ``z``:
``(patched - corrupt) / (clean - corrupt)``.

TransformerLens' ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos`` works with
the bridge (the tests check that both give the same numbers), but it runs one forward pass per
head; :func:`patched_logits` instead runs every head of a layer in one batched forward pass
(copy ``i`` of the corrupted prompt gets head ``i`` patched), ``n_layers`` passes in all, and
accepts a subset of heads. :func:`patched_logits_batch` and :func:`patch_heads_batch` do the
same for several pairs of one length at once (the clean prompts in one batch, the corrupted
ones in another, each layer's (pair, head) copies together), each pair's result what it gets
alone within float rounding.

It never builds the prompts: :mod:`retrieval_heads.patching` makes clean/corrupt pairs in the
embedded model's world and averages this module's recovery over them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from retrieval_heads.head_hooks import HeadLabels, _as_batch, _by_layer, _Index, _parse
from retrieval_heads.head_z import ZRecorder
from retrieval_heads.heads import Head

if TYPE_CHECKING:
    from retrieval_heads.model import HookedModel

__all__ = [
    "PatchedLogits",
    "patch_heads",
    "patch_heads_batch",
    "patched_logits",
    "patched_logits_batch",
]


@dataclass
class PatchedLogits:
    """Last-position logits of a clean run, a corrupted run, and per-head patched runs.

    ``patched[layer, head]`` are the corrupted run's logits with that head's ``z`` at every
    position replaced by its clean ``z``; NaN for heads that were not patched.
    """

    clean: Float[Tensor, " vocab"]
    corrupt: Float[Tensor, " vocab"]
    patched: Float[Tensor, "layer head vocab"]
    heads: list[Head]


def _noop(act: Tensor, hook: Any) -> None:
    return None


@torch.no_grad()
def patched_logits(
    model: HookedModel,
    clean_ids: Int[Tensor, "1 pos"] | Sequence[int],
    corrupt_ids: Int[Tensor, "1 pos"] | Sequence[int],
    heads: HeadLabels | None = None,
    *,
    batch_size: int | None = None,
) -> PatchedLogits:
    """Patch each head's clean ``z`` (all positions) into the corrupted run, one head at a time.

    One sequence each, of equal length. The heads of a layer run as one batch of copies of
    the corrupted prompt (copy ``i`` has head ``i`` patched), at most ``batch_size`` copies
    per forward pass (default: all heads of the layer). All runs go through the bridge, so
    clean, corrupted and patched logits come from the same computation. Several pairs at once:
    :func:`patched_logits_batch` (this is its batch of one).
    """
    clean, corrupt = _as_batch(clean_ids, model), _as_batch(corrupt_ids, model)
    if clean.shape[0] != 1 or corrupt.shape[0] != 1:
        raise ValueError(
            "patching takes one clean and one corrupted sequence (batch of 1); several pairs "
            "at once: patched_logits_batch"
        )
    return patched_logits_batch(model, clean, corrupt, heads, batch_size=batch_size)[0]


@torch.no_grad()
def patched_logits_batch(
    model: HookedModel,
    clean_ids: Int[Tensor, "pair pos"] | Sequence[Sequence[int]],
    corrupt_ids: Int[Tensor, "pair pos"] | Sequence[Sequence[int]],
    heads: HeadLabels | None = None,
    *,
    batch_size: int | None = None,
) -> list[PatchedLogits]:
    """:func:`patched_logits` for several pairs of one length at once, one result per pair.

    Row ``p`` of ``clean_ids`` and of ``corrupt_ids`` is pair ``p``. The clean prompts run as
    one batch (their ``z`` recorded), the corrupted ones as another, and each layer's patched
    runs as batches of (pair, head) copies, pair-major (copy ``(p, i)`` is pair ``p``'s
    corrupted prompt with head ``i`` given pair ``p``'s clean ``z``), at most ``batch_size``
    copies per forward pass (default: every pair's heads of the layer in one pass). Each pair's
    result is what :func:`patched_logits` gives it alone, within float rounding (a batched
    matrix product may add in another order).
    """
    clean, corrupt = _as_batch(clean_ids, model), _as_batch(corrupt_ids, model)
    if clean.shape[1] != corrupt.shape[1]:
        raise ValueError(
            f"clean and corrupted prompts must have the same length to patch position by "
            f"position: got {clean.shape[1]} and {corrupt.shape[1]} tokens"
        )
    if clean.shape[0] != corrupt.shape[0]:
        raise ValueError(
            f"one corrupted prompt per clean one: got {clean.shape[0]} clean and "
            f"{corrupt.shape[0]} corrupted"
        )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = clean.shape[0]
    selected = model.heads() if heads is None else _parse(heads)
    noop = [(model.hook_name(0, "z"), _noop)]  # any hook: run the bridge, not the fast path
    recorder = ZRecorder(model, selected)
    clean_logits = model.prefill(clean, fwd_hooks=recorder.prefill_hooks() or noop).last_logits
    source = recorder.result().prefill  # {layer: [pair, pos, k, d_head]}
    corrupt_logits = model.prefill(corrupt, fwd_hooks=noop).last_logits
    patched = torch.full(
        (n, model.n_layers, model.n_heads, clean_logits.shape[-1]),
        math.nan,
        dtype=clean_logits.dtype,
        device=clean_logits.device,
    )
    for layer, hs in _by_layer(selected).items():
        # the copies of this layer, pair-major; column j of the recording is head hs[j]
        copies = [(p, j) for p in range(n) for j in range(len(hs))]
        size = batch_size or len(copies)
        for start in range(0, len(copies), size):
            group = copies[start : start + size]
            rows = torch.tensor([p for p, _ in group], device=clean.device)
            cols = [j for _, j in group]
            group_heads = [hs[j] for j in cols]
            recorded = source[layer]
            clean_z = recorded[rows.to(recorded.device), :, cols]  # [copies, pos, d_head]
            fn = _patch_copies_hook(model, _Index(group_heads), clean_z)
            state = model.prefill(corrupt[rows], fwd_hooks=[(model.hook_name(layer, "z"), fn)])
            logits = state.last_logits.to(patched.device)
            patched[rows.to(patched.device), layer, group_heads] = logits
    return [
        PatchedLogits(clean_logits[p], corrupt_logits[p], patched[p], list(selected))
        for p in range(n)
    ]


def _patch_copies_hook(model: HookedModel, idx: _Index, clean_z: Tensor):
    """Copy ``c`` of the batch gets head ``idx[c]``'s clean z (``clean_z``: [copies, pos, d])."""

    def hook(z: Tensor, hook: Any) -> Tensor:
        start, n = model.position_offset, z.shape[1]
        heads = idx.on(z.device)
        copies = torch.arange(len(idx.values), device=z.device)
        z = z.clone()
        z[copies, :, heads] = clean_z[:, start : start + n].to(z.device, z.dtype)
        return z

    return hook


@torch.no_grad()
def patch_heads(
    model: HookedModel,
    clean_ids: Int[Tensor, "1 pos"] | Sequence[int],
    corrupt_ids: Int[Tensor, "1 pos"] | Sequence[int],
    answer_token: int,
    wrong_token: int,
    heads: HeadLabels | None = None,
    *,
    batch_size: int | None = None,
) -> Float[Tensor, "layer head"]:
    """Per-head recovery of the logit difference by activation patching.

    ``ld = logit[answer_token] - logit[wrong_token]`` at the last position; returns
    ``(ld_patched - ld_corrupt) / (ld_clean - ld_corrupt)`` per head (1: patching the head
    alone restores the clean difference; 0: no effect), NaN for heads not in ``heads``
    (default: all). When the clean and corrupted differences are equal (e.g. the same
    prompt twice) the recovery is undefined: every entry is NaN and a ``RuntimeWarning``
    says so (patching then changes nothing; :func:`patched_logits` gives the raw logits).
    Several pairs at once: :func:`patch_heads_batch`.
    """
    _check_tokens(model, [answer_token], [wrong_token])
    run = patched_logits(model, clean_ids, corrupt_ids, heads, batch_size=batch_size)
    return _recoveries([run], [answer_token], [wrong_token])[0]


@torch.no_grad()
def patch_heads_batch(
    model: HookedModel,
    clean_ids: Int[Tensor, "pair pos"] | Sequence[Sequence[int]],
    corrupt_ids: Int[Tensor, "pair pos"] | Sequence[Sequence[int]],
    answer_tokens: Sequence[int],
    wrong_tokens: Sequence[int],
    heads: HeadLabels | None = None,
    *,
    batch_size: int | None = None,
) -> Float[Tensor, "pair layer head"]:
    """:func:`patch_heads` for several pairs of one length at once (pair ``p``: row ``p`` of
    the ids, ``answer_tokens[p]``, ``wrong_tokens[p]``), run by :func:`patched_logits_batch`
    (``batch_size``: copies per forward pass). Row ``p`` of the result is pair ``p``'s
    recovery, what :func:`patch_heads` gives it alone within float rounding; all NaN where it
    is undefined (one ``RuntimeWarning`` names those pairs).
    """
    clean, corrupt = _as_batch(clean_ids, model), _as_batch(corrupt_ids, model)
    answers, wrongs = [int(t) for t in answer_tokens], [int(t) for t in wrong_tokens]
    if not len(answers) == len(wrongs) == clean.shape[0]:
        raise ValueError(
            f"one answer and one wrong token per pair: got {clean.shape[0]} pairs, "
            f"{len(answers)} answer and {len(wrongs)} wrong tokens"
        )
    _check_tokens(model, answers, wrongs)
    runs = patched_logits_batch(model, clean, corrupt, heads, batch_size=batch_size)
    return torch.stack(_recoveries(runs, answers, wrongs))


def _check_tokens(model: HookedModel, answers: Sequence[int], wrongs: Sequence[int]) -> None:
    for name, tokens in (("answer_token", answers), ("wrong_token", wrongs)):
        for token in tokens:
            if not 0 <= int(token) < model.d_vocab:
                raise ValueError(f"{name} {token} is not a token id (0-{model.d_vocab - 1})")


def _recoveries(
    runs: Sequence[PatchedLogits], answers: Sequence[int], wrongs: Sequence[int]
) -> list[Tensor]:
    """Each run's ``(ld_patched - ld_corrupt) / (ld_clean - ld_corrupt)``; NaN, with one
    warning for them all, where the clean and corrupted differences are equal."""
    out, undefined = [], []
    for p, (run, answer, wrong) in enumerate(zip(runs, answers, wrongs, strict=True)):
        clean, corrupt, patched = (
            (logits[..., answer] - logits[..., wrong]).float()
            for logits in (run.clean, run.corrupt, run.patched)
        )
        denominator = clean - corrupt
        scale = max(1.0, abs(clean.item()), abs(corrupt.item()))
        if abs(denominator.item()) <= 1e-5 * scale:
            undefined.append((p, clean.item()))
            out.append(torch.full_like(patched, math.nan))
        else:
            out.append((patched - corrupt) / denominator)
    if len(runs) == 1 and undefined:
        warnings.warn(
            f"the clean and corrupted logit differences are equal ({undefined[0][1]:.4g}): "
            "recovery is undefined, returning NaN",
            RuntimeWarning,
            stacklevel=4,  # the caller of patch_heads(_batch), past torch.no_grad's wrapper
        )
    elif undefined:
        which = ", ".join(str(p) for p, _ in undefined)
        warnings.warn(
            f"pairs {which}: the clean and corrupted logit differences are equal: recovery is "
            "undefined, returning NaN for them",
            RuntimeWarning,
            stacklevel=4,  # the caller of patch_heads(_batch), past torch.no_grad's wrapper
        )
    return out
