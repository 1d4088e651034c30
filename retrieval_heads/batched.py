"""Scoring several trials at once: one prefill and one decode step per token for a batch.

Every trial of one length in a grid has exactly that many tokens, so a batch of them needs no
padding: :func:`score_batch` prefills them together and feeds each step's tokens as one
``[batch]`` tensor, and each trial keeps its own step statistics, budget and stop rule (a
trial that has stopped stops counting; the batch runs until every trial has stopped). Its
records equal :func:`~retrieval_heads.scoring.score_trial`'s, trial by trial: the same
generated tokens, copy events and retrieval scores, the attention-mass tables within float
rounding (a batched matrix product may add in another order).

Hooks given here act on the whole batch: they must treat every row alike (an ablation of fixed
heads, a KV window), or each row as its own trial (interventions built per trial, stacked into
one whose row ``i`` acts as trial ``i``'s: a resample of each trial's source, a knockout of each
trial's needle; :func:`~retrieval_heads.intervention.stack_interventions`). Rows never mix, so
the steps a batch runs on a row after it has stopped change no other row. :func:`auto_batch_size`
picks a batch size: 1 on a CPU, where a trial is bound by its prefill (measured:
docs/benchmarks.md), else from the memory a trial of that length needs and the device's memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from retrieval_heads.model import HookedModel
from retrieval_heads.records import TrialRecord
from retrieval_heads.scoring import (
    DecodeConfig,
    _is_stop,
    trial_record,
)
from retrieval_heads.step_stats import _BatchStepStats
from retrieval_heads.trials.builder import check_trial_tokens
from retrieval_heads.trials.trial import Trial

__all__ = [
    "auto_batch_size",
    "memory_batch_size",
    "unit_batch_size",
    "score_batch",
    "MAX_AUTO_BATCH",
]

MAX_AUTO_BATCH = 16
_MEMORY_SHARE = 0.25  # of the device's memory, for the batch's cache and activations


@torch.no_grad()
def score_batch(
    model: HookedModel,
    trials: Sequence[Trial],
    config: DecodeConfig | None = None,
    *,
    prefill_hooks: Sequence[tuple[str, Any]] = (),
    decode_hooks: Sequence[tuple[str, Any]] = (),
    lean: bool | None = None,
) -> list[TrialRecord]:
    """Answer and score ``trials`` (all of one token length) together; one record each.

    ``prefill_hooks`` and ``decode_hooks`` run on the whole batch (see the module docstring).
    ``lean`` as in :func:`~retrieval_heads.scoring.score_trial`. Each record's ``elapsed_s``
    is the batch's time divided by its size.
    """
    config = config or DecodeConfig()
    trials = list(trials)
    if not trials:
        return []
    lengths = {len(t.input_ids) for t in trials}
    if len(lengths) != 1:
        raise ValueError(f"a batch holds trials of one length, got lengths {sorted(lengths)}")
    for trial in trials:
        check_trial_tokens(trial, model.tokenizer, model.d_vocab, model.name)
    began = time.perf_counter()
    device = model.device
    ids = torch.tensor([t.input_ids for t in trials], dtype=torch.long, device=device)  # [b, pos]
    n, pos = ids.shape
    spans = [t.answer_span for t in trials]
    stats = _BatchStepStats(model.n_layers, model.n_heads, spans, pos - 1)
    budgets = [config.budget(t, model) for t in trials]
    generated: list[list[int]] = [[] for _ in trials]
    stopped_by = ["max_new_tokens"] * n
    running = list(range(n))  # the rows still decoding (all are computed; these steps count)
    decode_hooks = list(decode_hooks)
    if lean is None:
        lean = not decode_hooks and model.lean_decode
    elif lean and decode_hooks:
        raise ValueError("lean=True runs no decode hooks: they need the bridge (lean=False)")

    def pattern_hook(layer: int) -> Any:
        def take_rows(pattern: Float[Tensor, "batch head query key"], hook: Any) -> None:
            # [batch, head, key], copied as it is now (a later hook may change it in place)
            stats.add(layer, pattern[:, :, -1, :].clone())

        return take_rows

    pattern_hooks = (
        []
        if lean
        else [
            (model.hook_name(layer, "pattern"), pattern_hook(layer))
            for layer in range(model.n_layers)
        ]
    )
    state = model.prefill(ids[:, :-1], fwd_hooks=list(prefill_hooks))
    token = ids[:, -1]  # [batch]: the last prompt token is the first decode step
    while running:
        stats.new_step(device)
        if lean:
            logits = model.step_rows(state, token, stats.add)
        else:
            logits = model.step(state, token, fwd_hooks=[*pattern_hooks, *decode_hooks])
        token = logits.argmax(dim=-1)  # [batch]
        chosen = token.tolist()
        still = []
        for b in running:
            if _is_stop(chosen[b], model, config):
                stopped_by[b] = "stop"  # the stop token is not kept
                continue
            generated[b].append(chosen[b])
            if len(generated[b]) < budgets[b]:
                still.append(b)
        running[:] = still
    share = (time.perf_counter() - began) / n
    records = []
    for b, trial in enumerate(trials):
        # the steps trial b ran: one per token it kept, and the one whose stop token it dropped
        steps = len(generated[b]) + (stopped_by[b] == "stop")
        stats_b = stats.trial(b, steps)
        records.append(
            trial_record(model, trial, stats_b, generated[b], stopped_by[b], config, share)
        )
    return records


def trial_bytes(model: HookedModel, length: int) -> int:
    """About what one trial of ``length`` tokens holds at its peak: its KV cache, and the
    prefill's widest activations (the MLP's, for every position)."""
    config = getattr(model.hf_model, "config", None)
    d_model = int(getattr(config, "hidden_size", 0) or model.d_head * model.n_heads)
    d_mlp = int(getattr(config, "intermediate_size", 0) or 4 * d_model)
    itemsize = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 4
    cache = 2 * model.n_layers * model.n_kv_heads * model.d_head * length * itemsize
    prefill = length * (3 * d_mlp + 4 * d_model) * itemsize
    return cache + prefill


def device_bytes(device: torch.device) -> int:
    """The memory of ``device`` (on CPU: the system's). Its total, not what is free now: the
    batch size must be the same when a killed run resumes, so that every record is computed
    in the same batch as before (the files come out identical)."""
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return int(total)
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3  # unknown: assume 8 GiB


def auto_batch_size(model: HookedModel, length: int, copies: int = 1) -> int:
    """The batch size ``--batch-size auto`` uses for trials of ``length`` tokens: 1 on a CPU
    (a trial there is bound by its prefill, which a batch does not speed up: see
    docs/benchmarks.md), else :func:`memory_batch_size` (``copies`` as there)."""
    if model.device.type == "cpu":
        return 1
    return memory_batch_size(model, length, copies)


def unit_batch_size(model: HookedModel, batch_size: int | None) -> Callable[[Any], int]:
    """The batch size of a sweep's unit (its ``item`` a trial): ``batch_size``, or with
    ``None`` :func:`auto_batch_size` for that trial's length (the runner's ``batch_size=``)."""

    def size(unit: Any) -> int:
        if batch_size is not None:
            return batch_size
        return auto_batch_size(model, len(unit.item.input_ids))

    return size


def memory_batch_size(model: HookedModel, length: int, copies: int = 1) -> int:
    """As many trials of ``length`` tokens as fit in a quarter of the device's memory (at
    least 1, at most :data:`MAX_AUTO_BATCH`), each run as ``copies`` sequences at once
    (activation patching runs a pair's corrupted prompt once per head of a layer)."""
    need = max(1, copies * trial_bytes(model, length))
    fit = int(_MEMORY_SHARE * device_bytes(model.device) // need)
    return max(1, min(MAX_AUTO_BATCH, fit))
