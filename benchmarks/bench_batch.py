"""The batch sweep of ``make bench``: detection throughput at batch 1, 4, 8 and 16.

On SmolLM2-135M-Instruct when it is installed, else a random model of its shape (``bench.py``'s
``_real_setup``). ``N_TRIALS`` trials of one length (needles at spread depths) are scored with
:func:`retrieval_heads.batched.score_batch`, ``batch`` at a time, with ``n`` new tokens and with
1 (no early stop), each the fastest of ``repeats``. Reported per batch size:

- trials per second and scored tokens per second of the whole detection (prefill included);
- decode-phase tokens per second: ``N_TRIALS * n`` decode steps over the run's time outside
  ``model.prefill`` (timed inside the same run, so the prefill's own variation cannot leak in);
- the peak memory one batch adds (``bench.MemoryMeter``);
- whether every batch's records equal batch 1's (tokens, copy events, retrieval scores).

And once, the prefill's arithmetic rate against this machine's matrix-multiply peak
(:func:`prefill_roofline`): on a CPU a trial is bound by its prefill, which a batch cannot
speed up, so this says how far any reorganisation of the same float32 work could go.
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

        prefill = model.prefill
        in_prefill = [0.0]

        def timed_prefill(*a: Any, **k: Any) -> Any:
            bench._sync(args.device)
            began = time.perf_counter()
            state = prefill(*a, **k)
            bench._sync(args.device)
            in_prefill[0] += time.perf_counter() - began
            return state

        model.prefill = timed_prefill  # this instance only: the split of each run's time

        def timed(batch: int, new_tokens: int) -> tuple[float, float, list[Any]]:
            """(whole time, time outside the prefill, records) of scoring every trial."""
            config = DecodeConfig(max_new_tokens=new_tokens, stop_at_eos=False, stop_strings=())
            bench._sync(args.device)
            in_prefill[0] = 0.0
            began = time.perf_counter()
            records = []
            for start in range(0, len(trials), batch):
                records += score_batch(model, trials[start : start + batch], config)
            bench._sync(args.device)
            seconds = time.perf_counter() - began
            return seconds, seconds - in_prefill[0], records

        score_batch(model, trials[:2], DecodeConfig(max_new_tokens=2))  # warm-up
        roofline = prefill_roofline(model, trials[0], args.device)
        roofline.update(linear_rows_cap(model, args.device))
        log(
            f"  prefill: {roofline['prefill_gflops']:.0f} GFLOP/s against a "
            f"{roofline['peak_gflops']:.0f} GFLOP/s matrix-multiply peak"
        )
        rows, reference = [], None
        for batch in BATCH_SIZES:
            best_n = best_decode = float("inf")
            for _ in range(args.batch_repeats):
                seconds, decode_s, records = timed(batch, n)
                best_n = min(best_n, seconds)
                best_decode = min(best_decode, decode_s)
            with bench.MemoryMeter(args.device) as meter:
                score_batch(model, trials[:batch], DecodeConfig(max_new_tokens=2))
            got = [(r.generated_ids, r.copy_events, r.scores["retrieval"]) for r in records]
            reference = reference or got
            rows.append(
                {
                    "batch": batch,
                    "tn_s": best_n,
                    "decode_s": best_decode,
                    "trials_per_s": len(trials) / best_n,
                    "tokens_per_s": len(trials) * n / best_n,
                    "decode_tokens_per_s": len(trials) * n / max(best_decode, 1e-9),
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
        "roofline": roofline,
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
        f"`batch` at a time by `score_batch` with {data['new_tokens']} new tokens (no early "
        f"stop), the fastest of {data['repeats']}; decode phase = each run's time outside "
        "`model.prefill`, timed in the same run. Peak: what one batch adds (2 new tokens).",
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
    roof = data.get("roofline")
    if roof and "linear_1_ms" in roof:
        lines += [
            "",
            f"**Linear layers by rows**: every layer's projections and MLP, run on one row took "
            f"{roof['linear_1_ms']:.1f} ms and on 8 rows {roof['linear_8_ms']:.1f} ms (fastest "
            f"of 5): the linear layers alone cap batch 8's decode speed-up at "
            f"{roof['linear_cap_8']:.1f}×, before each row's attention over its own cache.",
        ]
    if roof:
        lines += [
            "",
            f"**Prefill against the machine's peak**: one prefill of {roof['tokens']} tokens "
            f"took {roof['prefill_s']:.2f} s for {roof['gflop']:.0f} GFLOP (linear layers "
            f"{roof['linear_gflop']:.0f}, causal attention {roof['attention_gflop']:.0f}): "
            f"{roof['prefill_gflops']:.0f} GFLOP/s, {roof['share']:.0%} of the "
            f"{roof['peak_gflops']:.0f} GFLOP/s one float32 matrix multiply of the MLP's shape "
            f"reaches here ({roof['peak_shape']}). At batch 1 the {data['n_trials']} trials "
            f"spent {rows[1]['tn_s'] - rows[1]['decode_s']:.0f} s of their "
            f"{rows[1]['tn_s']:.0f} s in prefill; a batch does the same prefill arithmetic, so "
            "no batch size can cut a detection by more than the rest.",
        ]
    if 8 in rows:
        speedup = rows[8]["decode_tokens_per_s"] / base
        verdict = "**met**" if speedup >= TARGET_DECODE_SPEEDUP else "**missed**"
        lines += [
            "",
            f"**Target**: decode-phase throughput at batch 8 ≥ {TARGET_DECODE_SPEEDUP:g}× batch "
            f"1: {verdict} ({speedup:.2f}×).",
        ]
    return "\n".join(lines) + "\n"


def prefill_roofline(model: Any, trial: Any, device: str) -> dict[str, Any]:
    """One prefill of ``trial`` timed (fastest of 2) against its arithmetic (2 flops per weight
    of the decoder layers' linear maps per token, plus causal attention's two matrix products)
    and against the fastest of a float32 matrix multiply of the MLP's shape on this device."""
    import bench
    import torch

    ids = torch.tensor([trial.input_ids[:-1]], device=model.device)
    best = float("inf")
    for _ in range(2):
        bench._sync(device)
        began = time.perf_counter()
        model.prefill(ids)
        bench._sync(device)
        best = min(best, time.perf_counter() - began)
    tokens = ids.shape[1]
    linear = sum(m.weight.numel() for m in _layer_linears(model))
    linear_flop = 2 * linear * tokens
    attention_flop = 2 * 2 * model.n_layers * model.n_heads * model.d_head * tokens**2 / 2
    config = model.hf_model.config
    d_model, d_mlp = int(config.hidden_size), int(config.intermediate_size)
    a = torch.randn(tokens, d_model, device=model.device)
    b = torch.randn(d_model, d_mlp, device=model.device)
    peak = float("inf")
    for _ in range(10):
        bench._sync(device)
        began = time.perf_counter()
        torch.mm(a, b)
        bench._sync(device)
        peak = min(peak, time.perf_counter() - began)
    peak_gflops = 2 * tokens * d_model * d_mlp / peak / 1e9
    gflop = (linear_flop + attention_flop) / 1e9
    return {
        "tokens": tokens,
        "prefill_s": best,
        "gflop": gflop,
        "linear_gflop": linear_flop / 1e9,
        "attention_gflop": attention_flop / 1e9,
        "prefill_gflops": gflop / best,
        "peak_gflops": peak_gflops,
        "peak_shape": f"[{tokens}, {d_model}] @ [{d_model}, {d_mlp}]",
        "share": gflop / best / peak_gflops,
    }


def linear_rows_cap(model: Any, device: str) -> dict[str, float]:
    """Every linear map of the layers (not the head) on 1 row and on 8 (fastest of 5 each): a
    decode step reads the same weights for any batch, so how much 8 rows cost over 1 caps what
    a batch of 8 can gain."""
    import bench
    import torch

    maps = _layer_linears(model)
    times = {}
    with torch.no_grad():
        for rows in (1, 8):
            inputs = [torch.randn(rows, m.in_features, device=model.device) for m in maps]
            best = float("inf")
            for _ in range(5):
                bench._sync(device)
                began = time.perf_counter()
                for m, x in zip(maps, inputs, strict=True):
                    m(x)
                bench._sync(device)
                best = min(best, time.perf_counter() - began)
            times[rows] = best
    return {
        "linear_1_ms": times[1] * 1000,
        "linear_8_ms": times[8] * 1000,
        "linear_cap_8": 8 * times[1] / times[8],
    }


def _layer_linears(model: Any) -> list[Any]:
    """Every layer's projections and MLP: the model's linear maps but the head, which runs on
    the last token only (the bridge wraps it, so it is known by its weight)."""
    import torch

    head = model.hf_model.get_output_embeddings().weight.data_ptr()
    return [
        m
        for m in model.hf_model.modules()
        if isinstance(m, torch.nn.Linear) and m.weight.data_ptr() != head
    ]
