"""Benchmark: what scoring every head costs on top of plain greedy generation.

``python benchmarks/bench.py`` (``make bench``; a harness beside the library, not in it) builds a random-initialised Llama-architecture model from a
config (preset ``small``: 4 layers, d_model 256, 8 query heads sharing 2 kv heads), builds one
seeded needle-in-a-haystack prompt per context length, and on the same prompt with the same
number of generated tokens (no early stop) measures wall time and peak memory of

``a``  plain greedy generation: the Hugging Face model with its default attention (SDPA) and a
       KV cache (``model.generate``);
``b``  this project's scorer: ``score_trial`` (fast SDPA prefill, then every decode step through
       the lean step ``HookedModel.step_rows``, which hands each layer's attention row to the
       scorer without the bridge, scoring all heads);
``c``  the naive way: ``bridge.run_with_cache`` over the whole sequence at every step (only the
       ``hook_pattern`` activations cached), scoring from the cached patterns.

Every (method, length) runs in a fresh subprocess (``--one METHOD LENGTH``): the model is loaded
and warmed up on a tiny prompt, the peak-memory counter is reset (Linux ``clear_refs``; on CUDA
``reset_peak_memory_stats``), and only prefill + decode are timed. Peak memory is the peak
resident set (VmHWM; CUDA: ``max_memory_allocated``) minus what the process held just before the
work. (a) and (b) run in ``--rounds`` subprocesses each, alternating, ``--repeats`` times in each,
and keep the fastest run (a busy spell on a shared machine then cannot land on one of them only);
(c) runs once. CPU runs use one torch thread unless ``--threads`` says otherwise. ``c`` is
skipped at a length where an estimate (quadratic in length, from the largest
length measured so far, or from the attention-pattern sizes) exceeds the memory at hand or the
time cap; the table says so. ``--out FILE`` writes a markdown section between markers into
``FILE`` and keeps the rest of the file.

``--quick`` runs tiny lengths in this process (no subprocesses; for the test suite).

The real-model section (run after the table above; alone with ``--real-only``) times the decode
step on SmolLM2-135M-Instruct when it is installed (``make real-models``), else on a random model
of its shape (preset ``smollm2``): per generated token, ``(time with 32 new tokens - time with
1) / 31`` (fastest of 3 each; the prefill cancels out) of plain HF greedy, the scorer with its lean
decode step, and the scorer through the bridge (``score_trial(..., lean=False)``), at 1K and 4K
tokens, in this process.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_batch

METHODS = ("a", "b", "c")
METHOD_LABELS = {
    "a": "(a) plain greedy (HF SDPA + KV cache)",
    "b": "(b) scorer (`score_trial`, lean decode)",
    "c": "(c) naive (`run_with_cache` per step)",
}
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (128, 256)
WARMUP_LENGTH = 96
RESULT_PREFIX = "BENCH-RESULT "
# Targets from the issue.
TARGET_TIME_LENGTH, TARGET_TIME_RATIO = 8192, 1.3
TARGET_MEM_LENGTH, TARGET_MEM_RATIO = 16384, 1.5


@dataclass(frozen=True)
class Preset:
    """A Llama-architecture config to build a random model from."""

    name: str
    description: str
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    vocab_size: int
    rope_theta: float = 10000.0
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads


PRESETS = {
    # For --quick (the test suite): the same architecture, as small as it gets.
    "tiny": Preset(
        "tiny",
        "2 layers, d_model 64, 4 heads (d_head 16) sharing 2 kv heads, d_mlp 128, vocab 512",
        hidden_size=64,
        intermediate_size=128,
        layers=2,
        heads=4,
        kv_heads=2,
        vocab_size=512,
    ),
    "small": Preset(
        "small",
        "4 layers, d_model 256, 8 heads (d_head 32) sharing 2 kv heads, d_mlp 1024, vocab 32000",
        hidden_size=256,
        intermediate_size=1024,
        layers=4,
        heads=8,
        kv_heads=2,
        vocab_size=32000,
    ),
    # SmolLM2-135M's shape, for the real-model section when the real model is not installed.
    "smollm2": Preset(
        "smollm2",
        "SmolLM2-135M shape: 30 layers, d_model 576, 9 heads (d_head 64) sharing 3 kv heads, "
        "d_mlp 1536, vocab 49152, tied embeddings",
        hidden_size=576,
        intermediate_size=1536,
        layers=30,
        heads=9,
        kv_heads=3,
        vocab_size=49152,
        rope_theta=100000.0,
        tie_embeddings=True,
    ),
    # Llama-3.2-1B's shape: 16 layers, d_model 2048, 32 heads sharing 8 kv heads, ~1.24B params.
    "1b": Preset(
        "1b",
        "Llama-3.2-1B shape: 16 layers, d_model 2048, 32 heads (d_head 64) sharing 8 kv heads, "
        "d_mlp 8192, vocab 128256, tied embeddings (~1.24B parameters)",
        hidden_size=2048,
        intermediate_size=8192,
        layers=16,
        heads=32,
        kv_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_embeddings=True,
    ),
}


# --------------------------------------------------------------------------------------------
# Building the model and the prompts (parent process)


def build_tokenizer(vocab_size: int):
    """The tiny world's word-level tokenizer, padded with ``<xN>`` words to ``vocab_size`` ids
    (so every id a random model can emit decodes)."""
    from retrieval_heads.tiny import world

    return world.build_tokenizer(vocab_size)


def build_model_dir(
    out: Path, preset: Preset, max_positions: int, dtype: str, device: str, seed: int = 0
) -> Path:
    """Save a seeded random Llama of ``preset``'s shape with the padded tokenizer to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(preset.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        head_dim=preset.head_dim,
        max_position_embeddings=max_positions,
        rope_theta=preset.rope_theta,
        tie_word_embeddings=preset.tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    build_on = device if device.startswith("cuda") else "cpu"
    with torch.device(build_on):
        model = LlamaForCausalLM(config)
    model.to(_torch_dtype(dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the subprocesses need the memory
    return out


def build_trials(model_dir: Path, lengths: list[int], seed: int = 0) -> dict[str, dict]:
    """One needle-in-a-haystack trial per length (needle at 50 % depth) plus a warm-up trial."""
    from retrieval_heads.model.loading import _load_local_tokenizer
    from retrieval_heads.tiny.trials import tiny_haystack, tiny_needles, tiny_template
    from retrieval_heads.trials.builder import build_trial

    tokenizer = _load_local_tokenizer(model_dir, False)
    haystack = tiny_haystack(seed)
    needle = tiny_needles(1, seed)[0]
    trials = {}
    for length in [WARMUP_LENGTH, *lengths]:
        trial = build_trial(
            tokenizer,
            haystack,
            needle,
            length=length,
            depth_percent=50.0,
            template=tiny_template(),
            seed=seed,
        )
        trials[str(length)] = trial.to_dict()
    return trials


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# --------------------------------------------------------------------------------------------
# Memory meters


def _proc_status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(match.group(1)) if match else None


class MemoryMeter:
    """Peak memory of a block over what the process held when it began.

    CPU: resident set. The kernel's high-water mark (VmHWM) is reset with
    ``/proc/self/clear_refs`` (Linux); where that is not allowed, ``ru_maxrss`` is used, which
    cannot be reset (the peak then also counts anything before the block). CUDA:
    ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.how = ""

    def __enter__(self) -> MemoryMeter:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            self.how = "torch.cuda.max_memory_allocated"
            return self
        self.baseline = (_proc_status_kb("VmRSS") or 0) * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.how = "VmHWM (reset via clear_refs)"
            self._reset = True
        except OSError:
            self.how = "ru_maxrss (not resettable)"
            self._reset = False
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        if self._reset:
            self.peak = (_proc_status_kb("VmHWM") or 0) * 1024
        else:
            import resource

            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @property
    def extra_bytes(self) -> int:
        return max(0, self.peak - self.baseline)


# --------------------------------------------------------------------------------------------
# The three methods (run inside one process each)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class _Runner:
    """Loads what one method needs and runs it on a trial: ``run(trial) -> (tokens, timings)``."""

    def __init__(
        self,
        method: str,
        model_dir: Path,
        device: str,
        dtype: str,
        new_tokens: int,
        hooked_model: Any = None,
    ):
        self.method, self.device, self.new_tokens = method, device, new_tokens
        if method == "a":
            from transformers import AutoModelForCausalLM

            self.hf = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=_torch_dtype(dtype), attn_implementation="sdpa"
            ).to(device)
            self.hf.eval()
            self.hf.generation_config.eos_token_id = None  # no early stop: exactly new_tokens
        elif hooked_model is not None:
            self.model = hooked_model
        else:
            from retrieval_heads.model import load_model

            self.model = load_model(model_dir, device=device, dtype=dtype)
        self.warm = False

    def run(self, trial_dict: dict) -> tuple[list[int], dict[str, float]]:
        import torch

        from retrieval_heads.trials.trial import Trial

        trial = Trial.from_dict(trial_dict)
        with torch.no_grad():
            return getattr(self, f"_run_{self.method}")(trial)

    def _run_a(self, trial) -> tuple[list[int], dict[str, float]]:
        import torch

        ids = torch.tensor([trial.input_ids], device=self.device)
        stamps: list[float] = []

        class Clock:  # generate's streamer: put() once with the prompt, then once per token
            def put(self, value: Any) -> None:
                _sync(self_device)
                stamps.append(time.perf_counter())

            def end(self) -> None:
                pass

        self_device = self.device
        _sync(self.device)
        began = time.perf_counter()
        out = self.hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=self.new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=self.hf.config.pad_token_id,
            streamer=Clock(),
        )
        _sync(self.device)
        total = time.perf_counter() - began
        tokens = out[0, ids.shape[1] :].tolist()
        prefill = stamps[1] - began if len(stamps) > 1 else float("nan")
        # The first token comes out of the prefill; each later one is a decode step.
        return tokens, {"total_s": total, "prefill_s": prefill, "decode_steps": len(tokens) - 1}

    def _run_b(self, trial) -> tuple[list[int], dict[str, float]]:
        from retrieval_heads.scoring import DecodeConfig, score_trial

        model = self.model
        original = model.prefill
        spent: dict[str, float] = {}

        def timed_prefill(*args: Any, **kwargs: Any):
            t0 = time.perf_counter()
            state = original(*args, **kwargs)
            _sync(self.device)
            spent["prefill_s"] = time.perf_counter() - t0
            return state

        config = DecodeConfig(
            max_new_tokens=self.new_tokens, stop_at_eos=False, stop_strings=(), pass_threshold=0.5
        )
        model.prefill = timed_prefill  # type: ignore[method-assign]
        try:
            _sync(self.device)
            began = time.perf_counter()
            record = score_trial(model, trial, config)
            _sync(self.device)
            total = time.perf_counter() - began
        finally:
            del model.prefill
        # The last prompt token is the first decode step: every token is a decode step.
        steps = len(record.generated_ids)
        return list(record.generated_ids), {"total_s": total, "decode_steps": steps, **spent}

    def _run_c(self, trial) -> tuple[list[int], dict[str, float]]:
        import torch

        from retrieval_heads.scoring import DecodeConfig, _scores, _StepStats

        model = self.model
        bridge = model.bridge
        ids = torch.tensor([trial.input_ids], device=self.device)
        prompt = ids[0].clone()
        stats = _StepStats(model.n_layers, model.n_heads, trial.answer_span)
        reducers = [stats.hook(layer) for layer in range(model.n_layers)]
        generated: list[int] = []
        _sync(self.device)
        began = time.perf_counter()
        for _ in range(self.new_tokens):
            logits, cache = bridge.run_with_cache(
                ids, names_filter=lambda name: name.endswith("attn.hook_pattern")
            )
            stats.new_step(model.device)
            for layer, reduce_row in enumerate(reducers):
                reduce_row(cache[f"blocks.{layer}.attn.hook_pattern"], None)
            next_token = int(logits[0, -1].argmax())
            del logits, cache
            generated.append(next_token)
            ids = torch.cat([ids, ids.new_tensor([[next_token]])], dim=1)
        config = DecodeConfig(max_new_tokens=self.new_tokens, stop_at_eos=False, stop_strings=())
        _scores(stats, generated, prompt, trial.answer_span, config)
        _sync(self.device)
        return generated, {"total_s": time.perf_counter() - began}


def measure(
    runner: _Runner, trials: dict[str, dict], length: int, repeats: int = 1
) -> dict[str, Any]:
    """Warm up on the tiny trial (once per runner), then run at ``length`` ``repeats`` times:
    the fastest run's timings, the largest peak memory, and the tokens (checked identical)."""
    if not runner.warm:
        runner.run(dict(trials[str(WARMUP_LENGTH)]))
        runner.warm = True
    best: dict[str, float] | None = None
    peak = 0
    tokens: list[int] | None = None
    meter = MemoryMeter(runner.device)
    for _ in range(max(1, repeats)):
        with meter:
            got, timings = runner.run(trials[str(length)])
        peak = max(peak, meter.extra_bytes)
        if tokens is not None and got != tokens:
            raise RuntimeError(f"method {runner.method} is not deterministic at {length}")
        tokens = got
        if best is None or timings["total_s"] < best["total_s"]:
            best = timings
    assert best is not None and tokens is not None
    decode_ms = None
    if best.get("prefill_s") is not None and best.get("decode_steps"):
        decode_ms = 1000 * (best["total_s"] - best["prefill_s"]) / best["decode_steps"]
    return {
        "method": runner.method,
        "length": length,
        "status": "ok",
        "tokens": tokens,
        "repeats": max(1, repeats),
        "total_s": best["total_s"],
        "prefill_s": best.get("prefill_s"),
        "decode_ms_per_token": decode_ms,
        "peak_bytes": peak,
        "baseline_bytes": meter.baseline,
        "memory_meter": meter.how,
    }


def repeats_for(method: str, repeats: int) -> int:
    """(a) and (b) run ``repeats`` times (best time kept); (c), the slow one, once."""
    return 1 if method == "c" else repeats


def run_one(
    method: str,
    length: int,
    workdir: Path,
    device: str,
    dtype: str,
    new_tokens: int,
    repeats: int = 1,
) -> dict[str, Any]:
    """One (method, length) measurement: what ``--one METHOD LENGTH`` runs in a subprocess."""
    trials = json.loads((workdir / "trials.json").read_text())
    runner = _Runner(method, workdir / "model", device, dtype, new_tokens)
    return measure(runner, trials, length, repeats_for(method, repeats))


# --------------------------------------------------------------------------------------------
# Orchestration (parent process)


def _mem_available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free)
    kb = None
    with contextlib.suppress(OSError):
        match = re.search(r"^MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
        kb = int(match.group(1)) if match else None
    if kb is None:
        import psutil

        return int(psutil.virtual_memory().available)
    return kb * 1024


def estimate_naive(
    length: int, preset: Preset, dtype_bytes: int, measured: list[dict]
) -> tuple[float, float | None]:
    """(peak bytes, seconds or None) that ``c`` would need at ``length``.

    From the largest length ``c`` was measured at, scaled by ``(length / measured)^2`` (the
    ``[query, key]`` patterns dominate); before any measurement, the patterns' own size: one
    cached ``[head, L, L]`` pattern per layer plus three transient ones (scores, mask, softmax).
    """
    done = [r for r in measured if r.get("status") == "ok"]
    if done:
        ref = max(done, key=lambda r: r["length"])
        scale = (length / ref["length"]) ** 2
        return ref["peak_bytes"] * scale, ref["total_s"] * scale
    pattern = preset.heads * length * length * dtype_bytes
    return pattern * (preset.layers + 3), None


def _run_subprocess(
    method: str, length: int, workdir: Path, args: argparse.Namespace, timeout: float
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        method,
        str(length),
        "--workdir",
        str(workdir),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {
            "method": method,
            "length": length,
            "status": "skipped",
            "note": f"skipped: timed out after {_fmt_minutes(timeout)}",
        }
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    oom = proc.returncode in (-9, 137)
    return {
        "method": method,
        "length": length,
        "status": "failed",
        "note": ("killed (out of memory?)" if oom else f"exit {proc.returncode}: ")
        + " | ".join(tail)[-300:],
    }


def run_benchmark(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Build the model and prompts, run every (method, length), return everything measured."""
    preset = PRESETS[args.preset]
    lengths = sorted(args.lengths)
    dtype_bytes = 2 if args.dtype in ("bfloat16", "float16") else 4
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    machine = machine_info(args.device)
    with tempfile.TemporaryDirectory(prefix="rh-bench-") as tmp:
        workdir = Path(tmp)
        max_positions = max(32768, 1 << (max(lengths) + args.new_tokens).bit_length())
        log(f"building the {preset.name} model and {len(lengths)} prompts in {workdir}")
        build_model_dir(workdir / "model", preset, max_positions, args.dtype, args.device)
        trials = build_trials(workdir / "model", lengths)
        (workdir / "trials.json").write_text(json.dumps(trials))
        runners: dict[str, _Runner] = {}

        def run(method: str, length: int) -> dict[str, Any]:
            if not args.in_process:
                timeout = args.time_cap * 1.5 + 120 if method == "c" else 3 * 3600
                return _run_subprocess(method, length, workdir, args, timeout)
            if method not in runners:
                shared = runners.get("b") or runners.get("c")
                runners[method] = _Runner(
                    method,
                    workdir / "model",
                    args.device,
                    args.dtype,
                    args.new_tokens,
                    hooked_model=getattr(shared, "model", None),
                )
            return measure(runners[method], trials, length, repeats_for(method, args.repeats))

        rounds = 1 if args.in_process else max(1, args.rounds)
        for length in lengths:
            # (a) and (b) alternate over the rounds, so that a busy spell on a shared machine
            # does not land on one of them only; each keeps its fastest run.
            runs: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
            for round_ in range(rounds):
                for method in ("a", "b"):
                    t0 = time.perf_counter()
                    runs[method].append(run(method, length))
                    log(
                        f"  {method} @ {length} (round {round_ + 1}/{rounds}): "
                        f"{_describe(runs[method][-1])} ({time.perf_counter() - t0:.0f} s)"
                    )
            results += [merge_runs(runs["a"]), merge_runs(runs["b"])]
            skip = _naive_skip(length, preset, dtype_bytes, results, args)
            if skip:
                results.append({"method": "c", "length": length, "status": "skipped", "note": skip})
                log(f"  c @ {length}: {skip}")
                continue
            t0 = time.perf_counter()
            results.append(run("c", length))
            log(f"  c @ {length}: {_describe(results[-1])} ({time.perf_counter() - t0:.0f} s)")
    return {
        "machine": machine,
        "preset": preset.name,
        "preset_description": preset.description,
        "device": args.device,
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "lengths": lengths,
        "isolated": not args.in_process,
        "time_cap_s": args.time_cap,
        "threads": args.threads,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "wall_s": time.perf_counter() - started,
        "command": "python benchmarks/bench.py " + " ".join(args.argv),
        "results": results,
    }


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several measurements of one (method, length): the fastest run's
    timings, the largest peak memory; the first failure if any run failed."""
    failed = [r for r in runs if r.get("status") != "ok"]
    if failed:
        return failed[0]
    best = dict(min(runs, key=lambda r: r["total_s"]))
    best["peak_bytes"] = max(r["peak_bytes"] for r in runs)
    best["repeats"] = sum(r.get("repeats", 1) for r in runs)
    best["rounds"] = len(runs)
    best["all_total_s"] = [r["total_s"] for r in runs]
    if any(r["tokens"] != runs[0]["tokens"] for r in runs):
        raise RuntimeError(f"method {best['method']} generated different tokens across runs")
    return best


def _naive_skip(
    length: int, preset: Preset, dtype_bytes: int, results: list[dict], args: argparse.Namespace
) -> str | None:
    if args.naive_max_length is not None and length > args.naive_max_length:
        return f"skipped: above --naive-max-length {args.naive_max_length}"
    measured = [r for r in results if r["method"] == "c"]
    if any(r["status"] == "failed" for r in measured):
        return "skipped: (c) failed at a shorter length"
    if args.naive_max_length is not None:
        return None
    need_bytes, need_s = estimate_naive(length, preset, dtype_bytes, measured)
    have = _mem_available_bytes(args.device)
    too_big = need_bytes > 0.8 * have
    too_slow = need_s is not None and need_s > args.time_cap
    if too_big or too_slow:
        minutes = f"~{_fmt_minutes(need_s)}" if need_s is not None else "an unknown time"
        why = []
        if too_big:
            why.append(f"{have / 1e9:.1f} GB available")
        if too_slow:
            why.append(f"time cap {_fmt_minutes(args.time_cap)}")
        return f"skipped: would need ~{_fmt_gb(need_bytes)} / {minutes} ({', '.join(why)})"
    return None


def _fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _fmt_gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.0f} GB" if n_bytes >= 10e9 else f"{n_bytes / 1e9:.1f} GB"


def _describe(result: dict) -> str:
    if result["status"] != "ok":
        return result.get("note", result["status"])
    return f"{result['total_s']:.2f} s, +{result['peak_bytes'] / 2**20:.0f} MiB"


# --------------------------------------------------------------------------------------------
# Report


def machine_info(device: str) -> dict[str, Any]:
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = None
    with contextlib.suppress(OSError, AttributeError):
        match = re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
        ram = int(match.group(1)) * 1024 if match else None
    versions = {}
    for dist in ("torch", "transformers", "transformer-lens"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "?"
    import torch

    info = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": ram,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _by(results: list[dict]) -> dict[tuple[str, int], dict]:
    return {(r["method"], r["length"]): r for r in results}


def _ratio(num: dict | None, den: dict | None, key: str) -> float | None:
    if not num or not den or num.get("status") != "ok" or den.get("status") != "ok":
        return None
    if not den[key]:
        return None
    return num[key] / den[key]


def _fmt_len(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def _fmt(value: float | None, spec: str, none: str = "–") -> str:
    return none if value is None else format(value, spec)


def verdicts(data: dict[str, Any]) -> list[str]:
    """Whether each target of the issue is met, in words."""
    by = _by(data["results"])
    lines = []
    t = _ratio(by.get(("b", TARGET_TIME_LENGTH)), by.get(("a", TARGET_TIME_LENGTH)), "total_s")
    if t is None:
        lines.append(
            f"(b)/(a) time at {_fmt_len(TARGET_TIME_LENGTH)} ≤ {TARGET_TIME_RATIO}: not measured in this run."
        )
    else:
        ok = t <= TARGET_TIME_RATIO
        lines.append(
            f"(b)/(a) time at {_fmt_len(TARGET_TIME_LENGTH)} ≤ {TARGET_TIME_RATIO}: "
            + (
                f"**met** ({t:.2f})."
                if ok
                else f"**missed**: {t:.2f}, {t / TARGET_TIME_RATIO - 1:.0%} over."
            )
        )
    m = _ratio(by.get(("b", TARGET_MEM_LENGTH)), by.get(("a", TARGET_MEM_LENGTH)), "peak_bytes")
    if m is None:
        lines.append(
            f"(b)/(a) peak memory at {_fmt_len(TARGET_MEM_LENGTH)} ≤ {TARGET_MEM_RATIO}: not measured in this run."
        )
    else:
        ok = m <= TARGET_MEM_RATIO
        lines.append(
            f"(b)/(a) peak memory at {_fmt_len(TARGET_MEM_LENGTH)} ≤ {TARGET_MEM_RATIO}: "
            + (
                f"**met** ({m:.2f})."
                if ok
                else f"**missed**: {m:.2f}, {m / TARGET_MEM_RATIO - 1:.0%} over."
            )
        )
    for key, what in (("total_s", "time"), ("peak_bytes", "peak memory")):
        series = [
            (length, _ratio(by.get(("c", length)), by.get(("b", length)), key))
            for length in data["lengths"]
        ]
        series = [(length, r) for length, r in series if r is not None]
        if len(series) < 2:
            lines.append(f"(c)/(b) {what} grows with length: fewer than two lengths measured.")
            continue
        grows = all(b > a for (_, a), (_, b) in zip(series, series[1:], strict=False))
        trail = " → ".join(f"{r:.1f}" for _, r in series)
        span = f"{_fmt_len(series[0][0])}–{_fmt_len(series[-1][0])}"
        lines.append(
            f"(c)/(b) {what} grows with length: {'**yes**' if grows else '**no**'} ({trail}, {span})."
        )
    return lines


def render(data: dict[str, Any]) -> str:
    """The markdown section: machine, results table, ratios, targets."""
    m = data["machine"]
    v = m["versions"]
    by = _by(data["results"])
    gib = 2**30
    mib = 2**20
    load = m.get("load_average")
    lines = [
        f"### {data['device'].upper()} · preset `{data['preset']}` · {data['new_tokens']} new tokens",
        "",
        f"- **Model**: random-initialised `LlamaForCausalLM`, {data['preset_description']}; "
        f"{data['dtype']}, device `{data['device']}`.",
        f"- **Machine**: {m['cpu']}"
        + (f", {m['gpu']}" if m.get("gpu") else "")
        + f"; {m['logical_cores']} logical cores ({m['usable_cores']} usable, torch threads "
        f"{m['torch_threads']}); RAM {(m['ram_bytes'] or 0) / gib:.1f} GiB; {m['os']}; "
        f"Python {m['python']}.",
        f"- **Versions**: torch {v['torch']}, transformers {v['transformers']}, "
        f"transformer_lens {v['transformer-lens']}.",
        f"- **Date**: {m['date']}; load average when it began "
        + (", ".join(f"{x:.2f}" for x in load) if load else "unknown")
        + f"; the whole run took {data['wall_s'] / 60:.1f} min.",
        f"- **Command**: `{data['command']}`"
        + ("" if data["isolated"] else " (in-process: memory numbers are not isolated)."),
        _runs_line(data),
        "",
        "| context | method | wall time (s) | prefill (s) | decode (ms/token) "
        "| peak memory over model (MiB) | same tokens as (a) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | :---: |",
    ]
    for length in data["lengths"]:
        ref = by.get(("a", length))
        for method in METHODS:
            r = by.get((method, length))
            label = METHOD_LABELS[method]
            if r is None:
                continue
            if r["status"] != "ok":
                lines.append(
                    f"| {_fmt_len(length)} | {label} | {r.get('note', r['status'])} | | | | |"
                )
                continue
            same = "–"
            if method != "a" and ref and ref.get("status") == "ok":
                same = "yes" if r["tokens"] == ref["tokens"] else "**no**"
            lines.append(
                f"| {_fmt_len(length)} | {label} | {r['total_s']:.2f} "
                f"| {_fmt(r.get('prefill_s'), '.2f')} | {_fmt(r.get('decode_ms_per_token'), '.1f')} "
                f"| {r['peak_bytes'] / mib:.0f} | {same} |"
            )
    lines += [
        "",
        "| context | (b)/(a) time | (b)/(a) peak memory | (c)/(b) time | (c)/(b) peak memory "
        "| (b)−(a) decode (ms/token) | (b)/(a) prefill (same work) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for length in data["lengths"]:
        a, b, c = (by.get((x, length)) for x in METHODS)
        cells = [
            _ratio(b, a, "total_s"),
            _ratio(b, a, "peak_bytes"),
            _ratio(c, b, "total_s"),
            _ratio(c, b, "peak_bytes"),
        ]
        extra = None
        if a and b and a.get("decode_ms_per_token") and b.get("decode_ms_per_token"):
            extra = b["decode_ms_per_token"] - a["decode_ms_per_token"]
        naive_note = "skipped" if c and c.get("status") != "ok" else "–"
        lines.append(
            f"| {_fmt_len(length)} | {_fmt(cells[0], '.2f')} | {_fmt(cells[1], '.2f')} "
            f"| {_fmt(cells[2], '.1f', naive_note)} | {_fmt(cells[3], '.1f', naive_note)} "
            f"| {_fmt(extra, '+.1f')} | {_fmt(_ratio(b, a, 'prefill_s'), '.2f')} |"
        )
    lines += ["", "**Targets** (computed from the table above):", ""]
    lines += [f"- {line}" for line in verdicts(data)]
    baseline = [r["baseline_bytes"] for r in data["results"] if r.get("status") == "ok"]
    if baseline:
        lines += [
            "",
            f"Resident memory before the timed work (model loaded and warmed up): "
            f"{min(baseline) / mib:.0f}–{max(baseline) / mib:.0f} MiB per process; "
            f"memory meter: {data['results'][0].get('memory_meter', '?')}.",
        ]
    return "\n".join(lines) + "\n"


def _runs_line(data: dict[str, Any]) -> str:
    repeats, rounds = data.get("repeats", 1), data.get("rounds", 1)
    if not data["isolated"]:
        rounds = 1
    runs = repeats * rounds
    how = (
        f"{rounds} fresh subprocesses each, alternating (a), (b), (a), (b), {repeats} runs in each"
        if rounds > 1
        else ("a fresh subprocess each" if data["isolated"] else "in this process")
        + f", {repeats} run{'s' if repeats != 1 else ''}"
    )
    return (
        f"- **Runs**: (a) and (b): fastest of {runs} ({how}), peak memory the largest of them; "
        "(c): one run. Each process loads the model and warms up on a 96-token prompt first; "
        "only prefill + decode are timed."
    )


def section_key(device: str, preset: str) -> str:
    return f"{device.split(':')[0]}-{preset}"


def write_section(path: Path, key: str, body: str) -> None:
    """Replace the text between ``<!-- bench:KEY:begin -->`` and ``<!-- bench:KEY:end -->`` in
    ``path`` by ``body`` (appended at the end, with its markers, when they are missing)."""
    begin, end = f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --------------------------------------------------------------------------------------------
# The real-model section: the decode step's cost per token

REAL_MODEL = "smollm2-135m-instruct"
REAL_LENGTHS = (1024, 4096)
REAL_NEW_TOKENS = 32
REAL_REPEATS = 3
REAL_WARMUP_LENGTH = 256  # room for a chat template around the needle
TARGET_REAL_RATIO = 1.1
REAL_METHODS = {
    "plain": "plain greedy (HF SDPA + KV cache)",
    "lean": "scorer, lean decode (`step_rows`)",
    "bridge": "scorer through the bridge (`step` + `hook_pattern`)",
}


def _real_setup(device: str, lengths: list[int], workdir: Path, log) -> tuple[Any, Path, dict, str]:
    """(hooked model, HF folder, {length: Trial}, description): the real model when installed,
    else a random model of its shape with the tiny world's prompts."""
    from retrieval_heads import registry
    from retrieval_heads.model import load_model
    from retrieval_heads.trials.trial import Trial

    if registry.state(REAL_MODEL).startswith("installed"):
        from retrieval_heads.trials import make_trials

        model = load_model(REAL_MODEL, device=device, dtype="float32")
        folder = Path(registry.resolve(REAL_MODEL))
        trials = {
            length: make_trials(model, lengths=[length], depths=[50], n_needles=1)[0]
            for length in [REAL_WARMUP_LENGTH, *lengths]
        }
        what = (
            "SmolLM2-135M-Instruct (`smollm2-135m-instruct`: its Q4_1 GGUF dequantised), "
            "float32, needle prompts in its chat template"
        )
        return model, folder, trials, what
    log(f"{REAL_MODEL} is not installed: a random model of its shape")
    preset = PRESETS["smollm2"]
    folder = build_model_dir(workdir / "model", preset, 8192, "float32", device)
    model = load_model(folder, device=device, dtype="float32")
    raw = build_trials(folder, [REAL_WARMUP_LENGTH, *lengths])
    trials = {int(k): Trial.from_dict(v) for k, v in raw.items()}
    what = f"random-initialised `LlamaForCausalLM`, {preset.description}; float32"
    return model, folder, trials, what


def run_real(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Per-token decode cost of plain greedy, the lean scorer and the bridge scorer."""
    import torch

    from retrieval_heads.scoring import DecodeConfig, score_trial

    lengths = sorted(args.real_lengths)
    started = time.perf_counter()
    machine = machine_info(args.device)
    with tempfile.TemporaryDirectory(prefix="rh-bench-real-") as tmp:
        model, folder, trials, what = _real_setup(args.device, lengths, Path(tmp), log)
        plain = _Runner("a", folder, args.device, "float32", 1)
        lean_ok = model.lean_decode

        def timed(method: str, length: int, n: int) -> tuple[float, list[int]]:
            trial = trials[length]
            if method == "plain":
                plain.new_tokens = n
                tokens, timings = plain.run(trial.to_dict())
                return timings["total_s"], tokens
            config = DecodeConfig(max_new_tokens=n, stop_at_eos=False, stop_strings=())
            _sync(args.device)
            began = time.perf_counter()
            with torch.no_grad():
                record = score_trial(model, trial, config, lean=method == "lean")
            _sync(args.device)
            return time.perf_counter() - began, list(record.generated_ids)

        for method in REAL_METHODS:  # warm-up: first-call costs out of the timings
            timed(method, REAL_WARMUP_LENGTH, 2)
        n_max = args.real_new_tokens
        rows = []
        for length in lengths:
            best: dict[tuple[str, int], float] = {}
            tokens: dict[str, list[int]] = {}
            # Methods alternate within each round, so a busy spell hits all of them.
            for round_ in range(args.real_repeats):
                for method in REAL_METHODS:
                    for n in (1, n_max):
                        seconds, got = timed(method, length, n)
                        best[method, n] = min(best.get((method, n), seconds), seconds)
                        if n == n_max:
                            tokens[method] = got
                log(
                    f"  real @ {length} (round {round_ + 1}/{args.real_repeats}): "
                    + ", ".join(f"{m} {best[m, n_max]:.2f} s" for m in REAL_METHODS)
                )
            for method in REAL_METHODS:
                rows.append(
                    {
                        "method": method,
                        "length": length,
                        "prompt_tokens": trials[length].context_length,
                        "t1_s": best[method, 1],
                        "tn_s": best[method, n_max],
                        "ms_per_token": 1000
                        * (best[method, n_max] - best[method, 1])
                        / (n_max - 1),
                        "same_tokens": tokens[method] == tokens["plain"],
                    }
                )
    return {
        "machine": machine,
        "model": what,
        "device": args.device,
        "lengths": lengths,
        "new_tokens": n_max,
        "repeats": args.real_repeats,
        "lean_decode": lean_ok,
        "wall_s": time.perf_counter() - started,
        "command": "python benchmarks/bench.py " + " ".join(args.argv),
        "results": rows,
    }


def real_header(data: dict[str, Any], what: str) -> list[str]:
    """A real-model section's title and its model, machine, versions, date and command lines."""
    m, v = data["machine"], data["machine"]["versions"]
    load = m.get("load_average")
    return [
        f"### {data['device'].upper()} · real model · {what}",
        "",
        f"- **Model**: {data['model']}; device `{data['device']}`.",
        f"- **Machine**: {m['cpu']}"
        + (f", {m['gpu']}" if m.get("gpu") else "")
        + f"; {m['logical_cores']} logical cores, torch threads {m['torch_threads']}; "
        f"{m['os']}; Python {m['python']}.",
        f"- **Versions**: torch {v['torch']}, transformers {v['transformers']}, "
        f"transformer_lens {v['transformer-lens']}.",
        f"- **Date**: {m['date']}; load average when it began "
        + (", ".join(f"{x:.2f}" for x in load) if load else "unknown")
        + f"; the section took {data['wall_s'] / 60:.1f} min.",
        f"- **Command**: `{data['command']}`",
    ]


def render_real(data: dict[str, Any]) -> str:
    """The real-model section: per-token decode cost against plain greedy."""
    n = data["new_tokens"]
    by = {(r["method"], r["length"]): r for r in data["results"]}
    lines = [
        *real_header(data, "per-token decode cost"),
        f"- **Runs**: per token = (time with {n} new tokens − time with 1) / {n - 1}, each the "
        f"fastest of {data['repeats']} (methods alternating), in one process after a warm-up; "
        "no early stop. Lean decode "
        + ("on." if data["lean_decode"] else "**unavailable** (the lean rows fell back)."),
        "",
        f"| context | method | 1 token (s) | {n} tokens (s) | per token (ms) | ÷ plain "
        "| same tokens as plain |",
        "| ---: | --- | ---: | ---: | ---: | ---: | :---: |",
    ]
    for length in data["lengths"]:
        ref = by[("plain", length)]["ms_per_token"]
        for method, label in REAL_METHODS.items():
            r = by[(method, length)]
            ratio = r["ms_per_token"] / ref if ref > 0 else float("nan")
            lines.append(
                f"| {_fmt_len(length)} ({r['prompt_tokens']}) | {label} | {r['t1_s']:.2f} "
                f"| {r['tn_s']:.2f} | {r['ms_per_token']:.1f} "
                f"| {'–' if method == 'plain' else f'{ratio:.2f}'} "
                f"| {'–' if method == 'plain' else ('yes' if r['same_tokens'] else '**no**')} |"
            )
    lines += ["", "**Target** (from the table above):", ""]
    for length in data["lengths"]:
        ref = by[("plain", length)]["ms_per_token"]
        ratio = by[("lean", length)]["ms_per_token"] / ref if ref > 0 else float("nan")
        verdict = "**met**" if ratio <= TARGET_REAL_RATIO else "**missed**"
        lines.append(
            f"- lean scorer / plain greedy per token at {_fmt_len(length)} ≤ "
            f"{TARGET_REAL_RATIO}: {verdict} ({ratio:.2f})."
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# CLI


def _lengths(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"lengths must be integers, got {text!r}") from None
    if not values or min(values) <= WARMUP_LENGTH:
        raise argparse.ArgumentTypeError(f"lengths must be > {WARMUP_LENGTH}, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--lengths", type=_lengths, default=None, help="e.g. 1024,2048,4096")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated (default 16)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="small", help="model shape (default small)"
    )
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write into")
    parser.add_argument("--json", type=Path, default=None, help="also write raw results here")
    parser.add_argument(
        "--naive-max-length",
        type=int,
        default=None,
        help="run (c) only up to this length (default: skip where the estimate exceeds the "
        "memory available or the time cap)",
    )
    parser.add_argument(
        "--time-cap",
        type=float,
        default=600.0,
        help="seconds (c) may take at one length (default 600)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="subprocesses per (a)/(b) and length, alternating a, b, a, b (default 2)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: stable on a shared machine; 0: torch's default)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs of (a) and (b) per subprocess, fastest kept (default 2; (c) runs once)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"lengths {','.join(map(str, QUICK_LENGTHS))}, 3 new tokens, preset tiny, in process",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run everything in this process (faster; memory numbers not isolated)",
    )
    parser.add_argument(
        "--real-only",
        action="store_true",
        help="only the real-model section (per-token decode cost on SmolLM2-135M-Instruct, or "
        "a random model of its shape when it is not installed)",
    )
    parser.add_argument(
        "--no-real", action="store_true", help="skip the real-model section (default: run it)"
    )
    parser.add_argument(
        "--real-lengths",
        type=_lengths,
        default=list(REAL_LENGTHS),
        help="context lengths of the real-model section (default 1024,4096)",
    )
    parser.add_argument(
        "--real-new-tokens",
        type=int,
        default=REAL_NEW_TOKENS,
        help=f"new tokens of the long runs of the real-model section (default {REAL_NEW_TOKENS})",
    )
    parser.add_argument(
        "--real-repeats",
        type=int,
        default=REAL_REPEATS,
        help=f"runs per timing in the real-model section, fastest kept (default {REAL_REPEATS})",
    )
    parser.add_argument(
        "--no-batch",
        action="store_true",
        help="skip the batch sweep (detection throughput at batch 1, 4, 8, 16; default: run it "
        "with the real-model section)",
    )
    parser.add_argument(
        "--batch-only", action="store_true", help="only the batch sweep of the real-model section"
    )
    parser.add_argument(
        "--batch-length",
        type=int,
        default=bench_batch.BATCH_LENGTH,
        help=f"trial length of the batch sweep (default {bench_batch.BATCH_LENGTH})",
    )
    parser.add_argument(
        "--batch-new-tokens",
        type=int,
        default=bench_batch.BATCH_NEW_TOKENS,
        help=f"new tokens per trial in the batch sweep (default {bench_batch.BATCH_NEW_TOKENS})",
    )
    parser.add_argument(
        "--batch-repeats", type=int, default=2, help="runs per batch size, fastest kept (2)"
    )
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.lengths = args.lengths or list(QUICK_LENGTHS)
        if "--new-tokens" not in args.argv:
            args.new_tokens = 3
        if "--repeats" not in args.argv:
            args.repeats = 1
        if "--preset" not in args.argv:
            args.preset = "tiny"
        args.in_process = True
    args.lengths = args.lengths or list(DEFAULT_LENGTHS)
    if args.dtype is None:
        args.dtype = (
            "bfloat16" if args.device.startswith("cuda") and args.preset == "1b" else "float32"
        )
    if args.new_tokens < 1:
        parser.error("--new-tokens must be at least 1")
    if args.real_new_tokens < 2:
        parser.error("--real-new-tokens must be at least 2")
    if args.batch_new_tokens < 2:
        parser.error("--batch-new-tokens must be at least 2")
    if args.quick:
        args.no_real = True  # the test suite's mode: seconds, not minutes
        args.no_batch = True
    if args.batch_only:
        args.real_only = True
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if args.one:
        method, length = args.one[0], int(args.one[1])
        if method not in METHODS or args.workdir is None:
            raise SystemExit("--one METHOD LENGTH needs METHOD in a/b/c and --workdir")
        result = run_one(
            method, length, args.workdir, args.device, args.dtype, args.new_tokens, args.repeats
        )
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    raw: dict[str, Any] = {}
    if not args.real_only:
        data = run_benchmark(args, log=log)
        body = render(data)
        print(body)
        raw = data
        if args.out:
            write_section(args.out, section_key(args.device, args.preset), body)
            print(f"wrote {args.out}", file=sys.stderr)
    if args.batch_only or ((args.real_only or not args.no_real) and not args.no_batch):
        batched = bench_batch.run_batch_sweep(args, log=log)
        body = bench_batch.render_batch_sweep(batched)
        print(body)
        raw = {**raw, "batch": batched}
        if args.out:
            write_section(args.out, section_key(args.device, "batch"), body)
            print(f"wrote {args.out}", file=sys.stderr)
    if (args.real_only or not args.no_real) and not args.batch_only:
        real = run_real(args, log=log)
        body = render_real(real)
        print(body)
        raw = real if (args.real_only and not raw) else {**raw, "real": real}
        if args.out:
            write_section(args.out, section_key(args.device, "real"), body)
            print(f"wrote {args.out}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
