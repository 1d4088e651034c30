"""Train the embedded default model: ``python -m retrieval_heads.tiny.train --out DIR``.

Two phases, the pair the "intrinsic" experiment compares:

1. ``short`` — from scratch at contexts up to 256 tokens, with a dense repetition task in the first
   steps (copying by content appears after a long plateau otherwise), then a mix in which
   retrieval is one job among many: filler language modelling, needles with distractors,
   memorised facts and key chains.
2. ``default`` — continued from ``short`` at contexts up to 1024 tokens (context extension).

Each phase writes an HF-format directory (config, safetensors, tokenizer, ``training.json`` with
the recipe and the evaluation log). Reproducible from ``--seed`` for a fixed ``--workers``.
Uses CUDA when present. Imports only torch, transformers and the world: it runs where
TransformerLens is not installed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from retrieval_heads.tiny import world
from retrieval_heads.tiny.data import Builder


@dataclass
class Phase:
    name: str
    steps: int
    lengths: tuple[int, ...]
    tokens_per_batch: int
    lr: float
    warmup: int
    repeat_steps: int = 0  # steps at the start with a repetition-heavy mix
    data_seed: int = 0  # distinct per phase, so no phase replays another's data stream
    min_length: int = 128  # documents are uniform in [min_length, batch length]
    mix: dict = field(
        default_factory=lambda: {
            "needle": 0.40,
            "chain": 0.20,
            "fact": 0.20,
            "repeat": 0.05,
            "filler": 0.15,
        }
    )
    warm_mix: dict = field(
        default_factory=lambda: {"repeat": 0.5, "needle": 0.3, "fact": 0.1, "filler": 0.1}
    )


@dataclass
class Recipe:
    seed: int = 0
    hidden_size: int = 192
    intermediate_size: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 4
    answer_weight: float = 5.0
    weight_decay: float = 0.1
    short: Phase = field(
        default_factory=lambda: Phase("short", 4500, (192, 256), 16384, 1e-3, 200, 700)
    )
    long: Phase = field(
        default_factory=lambda: Phase("default", 4500, (512, 1024, 1024), 32768, 5e-4, 100)
    )


def model_config(recipe: Recipe, n_ctx: int):
    from transformers import LlamaConfig

    return LlamaConfig(  # type: ignore[call-arg]  # rope_theta: a config kwarg the stubs omit
        vocab_size=len(world.VOCAB),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.n_layers,
        num_attention_heads=recipe.n_heads,
        num_key_value_heads=recipe.n_kv_heads,
        max_position_embeddings=n_ctx,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=world.VOCAB.index("<s>"),
        eos_token_id=world.VOCAB.index("</s>"),
        pad_token_id=world.VOCAB.index("<pad>"),
    )


class Batches(torch.utils.data.IterableDataset):
    """Endless batches ``(ids [B, L], weights [B, L])`` for one phase; one Builder per worker.

    Each document has its own length, uniform in ``[min_length, L]``, right-padded with weight 0:
    with a few fixed lengths the model learned to predict ``</s>`` from absolute position.
    """

    def __init__(self, phase: Phase, seed: int, answer_weight: float):
        self.phase, self.seed, self.answer_weight = phase, seed, answer_weight

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        builder = Builder(
            seed=self.seed * 1000 + worker + 17 * len(self.phase.name) + 100 * self.phase.data_seed,
            answer_weight=self.answer_weight,
        )
        pad = builder.vocab["<pad>"]
        step = worker
        n_workers = info.num_workers if info else 1
        while True:
            length = builder.rng.choice(self.phase.lengths)
            mix = self.phase.warm_mix if step < self.phase.repeat_steps else self.phase.mix
            size = max(1, self.phase.tokens_per_batch // length)
            ids = torch.full((size, length), pad, dtype=torch.long)
            weights = torch.zeros((size, length))
            for row in range(size):
                own = builder.rng.randint(min(self.phase.min_length, length), length)
                sample = builder.sample(own, mix)
                ids[row, :own] = torch.from_numpy(sample.input_ids)
                weights[row, :own] = torch.from_numpy(sample.weights)
            yield ids, weights
            step += n_workers


@torch.no_grad()
def evaluate(model, n_ctx: int, seed: int = 1234, per_cell: int = 4) -> dict:
    """Teacher-forced exact match (equal to greedy exact match) on held-out keys and values.

    NIAH with 2 distractors at lengths n_ctx/4, n_ctx/2, n_ctx and depths 0-100%; facts; 3-hop chains.
    """
    builder = Builder(seed=seed, n_bank=4000)
    device = next(model.parameters()).device
    # Odd lengths on purpose: none is a batch length of training.
    lengths = sorted(
        {131, n_ctx // 2 + 17, n_ctx - 9} | ({n_ctx // 4 + 5} if n_ctx >= 512 else set())
    )
    groups: dict[str, list] = {}
    for length in lengths:
        for depth in (0, 25, 50, 75, 100):
            groups.setdefault(f"needle@{length}", []).extend(
                builder.needle(length, "test", n_distractors=2, depth=depth)
                for _ in range(per_cell)
            )
    fact_length = min(128, n_ctx)
    groups["fact"] = [builder.fact(fact_length, i) for i in range(0, len(builder.facts), 5)]
    groups["chain3"] = [builder.chain(n_ctx // 2, "test", hops=3) for _ in range(40)]
    scores = {}
    was_training = model.training
    model.eval()
    for name, samples in groups.items():
        correct = 0
        for i in range(0, len(samples), 16):
            chunk = samples[i : i + 16]
            ids = torch.from_numpy(np.stack([s.input_ids for s in chunk])).to(device)
            logits = model(ids).logits
            predicted = logits[:, :-1].argmax(-1).cpu().numpy()
            for row, sample in enumerate(chunk):
                start, end = sample.answer_span
                target = sample.input_ids[start:end]
                correct += bool((predicted[row, start - 1 : end - 1] == target).all())
        scores[name] = correct / len(samples)
    model.train(was_training)
    needle = [v for k, v in scores.items() if k.startswith("needle")]
    scores["needle_min"] = min(needle)
    return scores


def save(model, tokenizer, out: Path, recipe: Recipe, phase: Phase, log: list, n_ctx: int):
    log = HISTORY + log
    """Atomically replace ``out`` with an HF-format checkpoint (safetensors) and its recipe."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.config.max_position_embeddings = n_ctx
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    record = {"recipe": asdict(recipe), "phase": phase.name, "n_ctx": n_ctx, "log": log}
    (tmp / "training.json").write_text(json.dumps(record, indent=1))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)


HISTORY: list[dict] = []  # logs of the phases already run, carried into later checkpoints


def run_phase(model, phase: Phase, recipe: Recipe, device, workers: int, out: Path, tokenizer):
    n_ctx = max(phase.lengths)
    loader = torch.utils.data.DataLoader(
        Batches(phase, recipe.seed, recipe.answer_weight),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay}],  # type: ignore[arg-type]
        lr=phase.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )

    def lr_at(step: int) -> float:
        if step < phase.warmup:
            return phase.lr * (step + 1) / phase.warmup
        progress = (step - phase.warmup) / max(1, phase.steps - phase.warmup)
        return phase.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    log: list[dict] = []
    eval_every = max(50, phase.steps // 12)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    start, running = time.time(), None
    model.train()
    for step, (ids, weights) in enumerate(loader):
        if step >= phase.steps:
            break
        ids, weights = ids.to(device, non_blocking=True), weights.to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        if autocast:
            with autocast:
                logits = model(ids).logits
        else:
            logits = model(ids).logits
        token_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)),
            ids[:, 1:].reshape(-1),
            reduction="none",
        )
        w = weights[:, 1:].reshape(-1)
        loss = (token_loss * w).sum() / w.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % eval_every == 0 or step + 1 == phase.steps:
            scores = evaluate(model, n_ctx)
            entry = {"step": step + 1, "loss": round(running, 4), "s": round(time.time() - start)}
            entry.update({k: round(v, 3) for k, v in scores.items()})
            log.append(entry)
            entry = {"phase": phase.name, **entry}
            print(json.dumps(entry), flush=True)
            save(model, tokenizer, out, recipe, phase, log, n_ctx)
    HISTORY.extend(log)
    return log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="writes OUT/short and OUT/default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=min(6, (os.cpu_count() or 2) - 1))
    parser.add_argument("--short-steps", type=int, default=None)
    parser.add_argument("--long-steps", type=int, default=None)
    parser.add_argument("--skip-short", action="store_true", help="continue from OUT/short")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--reduced",
        action="store_true",
        help="a 2-layer, 64-wide model on 2K-token batches: checks the pipeline in seconds",
    )
    args = parser.parse_args(argv)

    from transformers import LlamaForCausalLM

    recipe = Recipe(seed=args.seed)
    if args.reduced:
        recipe.hidden_size, recipe.intermediate_size, recipe.n_layers = 64, 128, 2
        recipe.n_heads, recipe.n_kv_heads = 4, 2
        for phase in (recipe.short, recipe.long):
            phase.lengths, phase.tokens_per_batch = (128,), 2048
    if args.short_steps is not None:
        recipe.short.steps = args.short_steps
        recipe.short.repeat_steps = min(recipe.short.repeat_steps, args.short_steps // 3)
    if args.long_steps is not None:
        recipe.long.steps = args.long_steps
    torch.manual_seed(recipe.seed)
    device = torch.device(args.device)
    tokenizer = world.build_tokenizer()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"device {device}, workers {args.workers}, recipe {json.dumps(asdict(recipe))}")

    if args.skip_short:
        model = LlamaForCausalLM.from_pretrained(args.out / "short").to(device)  # type: ignore[arg-type]
    else:
        config = model_config(recipe, max(recipe.short.lengths))
        model = LlamaForCausalLM(config).to(device)  # type: ignore[arg-type]
        print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
        run_phase(model, recipe.short, recipe, device, args.workers, args.out / "short", tokenizer)
    if recipe.long.steps > 0:
        run_phase(model, recipe.long, recipe, device, args.workers, args.out / "default", tokenizer)


if __name__ == "__main__":
    main()
