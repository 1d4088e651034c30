"""Synthetic but well-formed result directories, for tests, previews and the browser check.

The records are real :class:`TrialRecord`\\ s written through :class:`ResultsDir` (so they pass
the same validation as a scorer's), with random scores shaped like the paper's: a few strong
retrieval heads, a tail of weak ones, most heads exactly 0, copy events consistent with the
scores. Nothing here runs a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from retrieval_heads.conditions import HeadAblation
from retrieval_heads.records import TrialRecord
from retrieval_heads.store import ResultsDir

__all__ = ["sample_scores", "write_detection", "write_ablation"]

_ANSWER_TOKENS = 5


def sample_scores(
    rng: np.random.Generator, n_layers: int, n_heads: int, n_strong: int = 4
) -> np.ndarray:
    """A ``[layer, head]`` table of typical retrieval scores (sparse, heavy-tailed)."""
    base = np.where(
        rng.random((n_layers, n_heads)) < 0.25, rng.uniform(0, 0.08, (n_layers, n_heads)), 0.0
    )
    flat = rng.choice(n_layers * n_heads, size=n_strong + 4, replace=False)
    base.flat[flat[:n_strong]] = rng.uniform(0.5, 0.95, n_strong)
    base.flat[flat[n_strong:]] = rng.uniform(0.12, 0.45, 4)
    return base


def _record(
    rng: np.random.Generator,
    trial_id: str,
    params: dict[str, Any],
    table: np.ndarray,
    passed: bool,
    *,
    expected: str,
    generated: str,
    extra_scorer: str | None = None,
    condition: HeadAblation | None = None,
) -> TrialRecord:
    n_layers, n_heads = table.shape
    # per trial: each head copies round(score * answer tokens) of them (noisy)
    noisy = np.clip(table + rng.normal(0, 0.08, table.shape) * (table > 0), 0, 1)
    copies = np.rint(noisy * _ANSWER_TOKENS).astype(int) if passed else np.zeros_like(table, int)
    scores = copies / _ANSWER_TOKENS
    answer_start = 100 + int(rng.integers(0, 400))
    events = []
    for layer, head in np.argwhere(copies > 0):
        for step in sorted(rng.choice(_ANSWER_TOKENS, copies[layer, head], replace=False)):
            events.append((int(step), int(layer), int(head), answer_start + int(step)))
    events.sort()
    recall = 1.0 if passed else float(rng.choice([0.0, 0.2, 0.4]))
    extra = {}
    if extra_scorer:  # e.g. a patching effect: correlated with the score, noisier
        extra[extra_scorer] = np.clip(0.8 * table + rng.normal(0, 0.05, table.shape), -1, 1)
    return TrialRecord(
        trial_id=trial_id,
        params=params,
        expected=expected,
        generated_ids=[int(t) for t in rng.integers(3, 100, _ANSWER_TOKENS)],
        generated_text=generated if passed else "something else",
        passed=passed,
        recall=recall,
        reason=None if passed else "low recall",
        scores={"retrieval": scores, **extra},  # type: ignore[dict-item]  # arrays: TrialRecord makes lists
        copy_events=events,
        n_layers=n_layers,
        n_heads=n_heads,
        elapsed_s=float(rng.uniform(0.1, 0.5)),
        condition=condition,
    )


def write_detection(
    path: str | Path,
    *,
    model: str = "sample-model",
    n_layers: int = 8,
    n_heads: int = 8,
    lengths: tuple[int, ...] = (1000, 2000, 4000, 8000),
    depths: tuple[float, ...] = (0.0, 25.0, 50.0, 75.0, 100.0),
    needles: int = 2,
    seed: int = 0,
    needle_text: str = "The best thing to do in San Francisco is eat a sandwich.",
    answer: str = "eat a sandwich",
    table: np.ndarray | None = None,
    extra_meta: dict[str, Any] | None = None,
    extra_scorer: str | None = None,
) -> Path:
    """A finished detection run: ``lengths`` x ``depths`` x ``needles`` trials (with a second
    scorer named ``extra_scorer`` when given)."""
    rng = np.random.default_rng(seed)
    table = sample_scores(rng, n_layers, n_heads) if table is None else np.asarray(table)
    config = {"lengths": list(lengths), "depths": list(depths), "needles": needles}
    with ResultsDir(
        path, model=model, config=config, seed=seed, overwrite=True, extra_meta=extra_meta
    ) as run:
        for length in lengths:
            for depth in depths:
                for n in range(needles):
                    p_pass = 0.95 - 0.5 * (length / max(lengths)) * (0.5 + depth / 200)
                    params = {
                        "context_length": length,
                        "depth_percent": depth,
                        "needle_id": f"needle-{n}",
                        "needle": needle_text,
                        "question": "What is the best thing to do in San Francisco?",
                    }
                    run.append(
                        _record(
                            rng,
                            f"L{length}-d{int(depth):03d}-n{n}",
                            params,
                            table,
                            bool(rng.random() < p_pass),
                            expected=answer,
                            generated=answer,
                            extra_scorer=extra_scorer,
                        )
                    )
        run.finalize()
    return Path(path)


def write_ablation(
    path: str | Path,
    *,
    model: str = "sample-model",
    n_layers: int = 8,
    n_heads: int = 8,
    ks: tuple[int, ...] = (0, 1, 2, 5, 10, 20),
    draws: int = 3,
    lengths: tuple[int, ...] = (1000, 2000, 4000, 8000),
    depths: tuple[float, ...] = (0.0, 33.0, 67.0, 100.0),
    seed: int = 1,
    answer: str = "eat a sandwich",
    answer_classes: bool = True,
    tasks: tuple[str | None, ...] = (None,),
) -> Path:
    """A finished ablation run: per K, top-K (one draw) and random-K (``draws`` draws); K = 0
    is the baseline (selection ``"none"``). With ``tasks``, every condition runs per task
    (``params["task"]``; only ``"niah"`` or ``None`` trials carry the context grid)."""
    rng = np.random.default_rng(seed)
    table = sample_scores(rng, n_layers, n_heads)
    config = {"k": list(ks), "draws": draws, "selection": ["top", "random"]}
    with ResultsDir(
        path, model=model, config=config, kind="ablate", seed=seed, overwrite=True
    ) as run:
        conditions = [(0, "none", 0)]
        for k in ks:
            if k:
                conditions.append((k, "top", 0))
                conditions += [(k, "random", d) for d in range(draws)]
        for task, (k, selection, draw) in ((t, c) for t in tasks for c in conditions):
            share = k / max(ks)
            drop = 0.8 * share**0.5 if selection == "top" else 0.1 * share
            for length in lengths:
                for depth in depths:
                    p_pass = max(0.02, 0.95 - 0.15 * length / max(lengths) - drop)
                    passed = bool(rng.random() < p_pass)
                    params: dict[str, Any] = {}
                    if task in (None, "niah"):
                        params.update(context_length=length, depth_percent=depth)
                    if task is not None:
                        params["task"] = task
                    if answer_classes:
                        params["answer_class"] = (
                            "correct"
                            if passed
                            else str(
                                rng.choice(
                                    ["partial", "in_context", "not_in_context", "empty"],
                                    p=[0.2, 0.3, 0.4, 0.1],
                                )
                            )
                        )
                    tid = f"k{k:03d}-{selection}-d{draw}-L{length}-p{int(depth):03d}"
                    if task is not None:
                        tid = f"{task}-{tid}"
                    tag = f"{selection}|k={k}|draw={draw}"
                    condition = HeadAblation(k, selection, draw, (), "uniform", "decode", tag)
                    run.append(
                        _record(
                            rng,
                            tid,
                            params,
                            table,
                            passed,
                            expected=answer,
                            generated=answer,
                            condition=condition,
                        )
                    )
        run.finalize()
    return Path(path)
