"""The batch sweep of ``make bench``: detection throughput at batch 1, 4, 8 and 16.

On SmolLM2-135M-Instruct when it is installed, else a random model of its shape (``bench.py``'s
``_real_setup``). ``N_TRIALS`` trials of one length (needles at spread depths) are scored with
:func:`retrieval_heads.batched.score_batch`, ``batch`` at a time, with ``n`` new tokens and with
1 (no early stop), each the fastest of ``repeats``. Reported per batch size:

- trials per second and scored tokens per second of the whole detection (prefill included);
- decode-phase tokens per second: ``N_TRIALS * (n - 1) / (time with n - time with 1)``;
- the peak memory one batch adds (``bench.MemoryMeter``);
- whether every batch's records equal batch 1's (tokens, copy events, retrieval scores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

BATCH_SIZES = (1, 4, 8, 16)
N_TRIALS = 16
BATCH_LENGTH = 1024
BATCH_NEW_TOKENS = 16
TARGET_DECODE_SPEEDUP = 4.0  # decode-phase throughput at batch 8 over batch 1


def _trials(model: Any, trial: Any, length: int) -> list[Any]:
    """``N_TRIALS`` trials of ``length`` tokens: the model's own needles at spread depths, or
    (a random model) copies of the one benchmark trial."""
    import bench

    from retrieval_heads import registry
    from retrieval_heads.trials import make_trials
    from retrieval_heads.trials.grid import linspace_depths

    if registry.state(bench.REAL_MODEL).startswith("installed"):
        return make_trials(model, lengths=[length], depths=linspace_depths(N_TRIALS), n_needles=1)
    return [trial] * N_TRIALS


def run_batch_sweep(args: argparse.Namespace, log=print) -> dict[str, Any]:
    import bench

    from retrieval_heads.batched import score_batch
    from retrieval_heads.scoring import DecodeConfig

    length = args.batch_length
    started = time.perf_counter()
    machine = bench.machine_info(args.device)
    with tempfile.TemporaryDirectory(prefix="rh-bench-batch-") as tmp:
        model, _, single, what = bench._real_setup(args.device, [length], Path(tmp), log)
        trials = _trials(model, single[length], length)
        n = args.batch_new_tokens

        def timed(batch: int, new_tokens: int) -> tuple[float, list[Any]]:
            config = DecodeConfig(max_new_tokens=new_tokens, stop_at_eos=False, stop_strings=())
            bench._sync(args.device)
            began = time.perf_counter()
            records = []
            for start in range(0, len(trials), batch):
                records += score_batch(model, trials[start : start + batch], config)
            bench._sync(args.device)
            return time.perf_counter() - began, records

        score_batch(model, trials[:2], DecodeConfig(max_new_tokens=2))  # warm-up
        rows, reference = [], None
        for batch in BATCH_SIZES:
            best_n = best_1 = float("inf")
            for _ in range(args.batch_repeats):
                seconds, records = timed(batch, n)
                best_n = min(best_n, seconds)
                best_1 = min(best_1, timed(batch, 1)[0])
            with bench.MemoryMeter(args.device) as meter:
                score_batch(model, trials[:batch], DecodeConfig(max_new_tokens=2))
            got = [(r.generated_ids, r.copy_events, r.scores["retrieval"]) for r in records]
            reference = reference or got
            rows.append(
                {
                    "batch": batch,
                    "tn_s": best_n,
                    "t1_s": best_1,
                    "trials_per_s": len(trials) / best_n,
                    "tokens_per_s": len(trials) * n / best_n,
                    "decode_tokens_per_s": len(trials) * (n - 1) / max(best_n - best_1, 1e-9),
                    "peak_extra_bytes": meter.extra_bytes,
                    "memory_meter": meter.how,
                    "same_records": got == reference,
                }
            )
            log(
                f"  batch {batch}: {rows[-1]['trials_per_s']:.2f} trials/s, decode "
                f"{rows[-1]['decode_tokens_per_s']:.1f} tokens/s"
            )
    return {
        "machine": machine,
        "model": what,
        "device": args.device,
        "length": length,
        "prompt_tokens": trials[0].context_length,
        "n_trials": len(trials),
        "new_tokens": n,
        "repeats": args.batch_repeats,
        "wall_s": time.perf_counter() - started,
        "command": "python benchmarks/bench.py " + " ".join(args.argv),
        "results": rows,
    }


def render_batch_sweep(data: dict[str, Any]) -> str:
    import bench

    rows = {r["batch"]: r for r in data["results"]}
    lines = [
        *bench.real_header(data, "detection throughput by batch size"),
        f"- **Runs**: {data['n_trials']} trials of {data['prompt_tokens']} tokens, scored "
        f"`batch` at a time by `score_batch` with {data['new_tokens']} new tokens and with 1 "
        f"(no early stop), each the fastest of {data['repeats']}; decode phase = the "
        "difference. Peak: what one batch adds (2 new tokens).",
        "",
        "| batch | trials/s | scored tokens/s | decode tokens/s | decode ÷ batch 1 "
        "| peak added (MiB) | records = batch 1 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    base = rows[1]["decode_tokens_per_s"]
    for batch, r in rows.items():
        lines.append(
            f"| {batch} | {r['trials_per_s']:.3f} | {r['tokens_per_s']:.1f} "
            f"| {r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / base:.2f} "
            f"| {r['peak_extra_bytes'] / 2**20:.0f} | {'yes' if r['same_records'] else '**no**'} |"
        )
    if 8 in rows:
        speedup = rows[8]["decode_tokens_per_s"] / base
        verdict = "**met**" if speedup >= TARGET_DECODE_SPEEDUP else "**missed**"
        lines += [
            "",
            f"**Target**: decode-phase throughput at batch 8 ≥ {TARGET_DECODE_SPEEDUP:g}× batch "
            f"1: {verdict} ({speedup:.2f}×).",
        ]
    return "\n".join(lines) + "\n"
