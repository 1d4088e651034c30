"""Activation patching per head, on any model and any pair of prompts.

:func:`patch_heads` measures, for each head, how much of the clean-vs-corrupted logit
difference (answer - wrong, last position) is recovered when that head's ``z`` at every
position of the corrupted run is replaced by its clean ``z``:
``(patched - corrupt) / (clean - corrupt)``.

TransformerLens' ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos`` works with
the bridge (the tests check that both give the same numbers), but it runs one forward pass per
head; :func:`patched_logits` instead runs every head of a layer in one batched forward pass
(copy ``i`` of the corrupted prompt gets head ``i`` patched), ``n_layers`` passes in all, and
accepts a subset of heads.

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

__all__ = ["PatchedLogits", "patch_heads", "patched_logits"]


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
    clean, corrupted and patched logits come from the same computation.
    """
    clean = _as_batch(clean_ids, model)
    corrupt = _as_batch(corrupt_ids, model)
    if clean.shape[0] != 1 or corrupt.shape[0] != 1:
        raise ValueError("patching takes one clean and one corrupted sequence (batch of 1)")
    if clean.shape[1] != corrupt.shape[1]:
        raise ValueError(
            f"clean and corrupted prompts must have the same length to patch position by "
            f"position: got {clean.shape[1]} and {corrupt.shape[1]} tokens"
        )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    selected = model.heads() if heads is None else _parse(heads)
    noop = [(model.hook_name(0, "z"), _noop)]  # any hook: run the bridge, not the fast path
    recorder = ZRecorder(model, selected)
    clean_logits = model.prefill(clean, fwd_hooks=recorder.prefill_hooks() or noop).last_logits
    source = recorder.result().prefill
    corrupt_logits = model.prefill(corrupt, fwd_hooks=noop).last_logits
    patched = torch.full(
        (model.n_layers, model.n_heads, clean_logits.shape[-1]),
        math.nan,
        dtype=clean_logits.dtype,
        device=clean_logits.device,
    )
    for layer, hs in _by_layer(selected).items():
        size = batch_size or len(hs)
        for start in range(0, len(hs), size):
            group = hs[start : start + size]
            cols = list(range(start, start + len(group)))  # recorded columns = sorted heads
            fn = _patch_copies_hook(model, _Index(group), source[layer][0][:, cols])
            state = model.prefill(
                corrupt.expand(len(group), -1), fwd_hooks=[(model.hook_name(layer, "z"), fn)]
            )
            patched[layer, group] = state.last_logits
    return PatchedLogits(clean_logits[0], corrupt_logits[0], patched, selected)


def _patch_copies_hook(model: HookedModel, idx: _Index, clean_z: Tensor):
    """Copy ``i`` of the batch gets head ``idx[i]``'s clean z (``clean_z``: [pos, k, d])."""

    def hook(z: Tensor, hook: Any) -> Tensor:
        start, n = model.position_offset, z.shape[1]
        heads = idx.on(z.device)
        copies = torch.arange(len(idx.values), device=z.device)
        z = z.clone()
        z[copies, :, heads] = clean_z[start : start + n].transpose(0, 1).to(z.device, z.dtype)
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
    """
    for name, token in (("answer_token", answer_token), ("wrong_token", wrong_token)):
        if not 0 <= int(token) < model.d_vocab:
            raise ValueError(f"{name} {token} is not a token id (0-{model.d_vocab - 1})")
    run = patched_logits(model, clean_ids, corrupt_ids, heads, batch_size=batch_size)

    def diff(logits: Tensor) -> Tensor:
        return (logits[..., answer_token] - logits[..., wrong_token]).float()

    clean, corrupt, patched = diff(run.clean), diff(run.corrupt), diff(run.patched)
    denominator = clean - corrupt
    scale = max(1.0, abs(clean.item()), abs(corrupt.item()))
    if abs(denominator.item()) <= 1e-5 * scale:
        warnings.warn(
            f"the clean and corrupted logit differences are equal ({clean.item():.4g}): "
            "recovery is undefined, returning NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        return torch.full_like(patched, math.nan)
    return (patched - corrupt) / denominator
