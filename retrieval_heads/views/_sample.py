"""Synthetic but well-formed result directories, for tests, previews and the browser check.

The records are real :class:`TrialRecord`\\ s written through :class:`ResultsDir` (so they pass
the same validation as a scorer's), with random scores shaped like the paper's: a few strong
retrieval heads, a tail of weak ones, most heads exactly 0, copy events consistent with the
scores. Nothing here runs a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval_heads.conditions import HeadAblation
from retrieval_heads.records import TrialRecord
from retrieval_heads.store import ResultsDir

if TYPE_CHECKING:  # pragma: no cover
    from retrieval_heads.trials.trial import Trial

__all__ = ["sample_scores", "write_detection", "write_trial_detection", "write_ablation"]

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
    answer_ids: Sequence[int] | None = None,
    answer_start: int | None = None,
    wrong_ids: Sequence[int] | None = None,
    wrong_text: str = "something else",
    condition: HeadAblation | None = None,
) -> TrialRecord:
    """One record. With ``answer_ids`` (the answer's tokens in the prompt, from
    ``answer_start`` on) a passing record generates exactly them and its copy events point at
    them; a failing one generates ``wrong_ids`` (``wrong_text``). Else random ids and positions."""
    n_layers, n_heads = table.shape
    n_answer = _ANSWER_TOKENS if answer_ids is None else len(answer_ids)
    # per trial: each head copies round(score * answer tokens) of them (noisy)
    noisy = np.clip(table + rng.normal(0, 0.08, table.shape) * (table > 0), 0, 1)
    copies = np.rint(noisy * n_answer).astype(int) if passed else np.zeros_like(table, int)
    scores = copies / n_answer
    if answer_start is None:
        answer_start = 100 + int(rng.integers(0, 400))
    events = []
    for layer, head in np.argwhere(copies > 0):
        for step in sorted(rng.choice(n_answer, copies[layer, head], replace=False)):
            events.append((int(step), int(layer), int(head), answer_start + int(step)))
    events.sort()
    recall = 1.0 if passed else float(rng.choice([0.0, 0.2, 0.4]))
    extra = {}
    if extra_scorer:  # e.g. a patching effect: correlated with the score, noisier
        extra[extra_scorer] = np.clip(0.8 * table + rng.normal(0, 0.05, table.shape), -1, 1)
    if answer_ids is None:
        generated_ids = [int(t) for t in rng.integers(3, 100, _ANSWER_TOKENS)]
    else:
        generated_ids = [int(t) for t in (answer_ids if passed else wrong_ids or [])]
    return TrialRecord(
        trial_id=trial_id,
        params=params,
        expected=expected,
        generated_ids=generated_ids,
        generated_text=generated if passed else wrong_text,
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


def write_trial_detection(
    path: str | Path,
    trials: Sequence[Trial],
    *,
    model: str = "sample-model",
    n_layers: int = 8,
    n_heads: int = 8,
    seed: int = 0,
    table: np.ndarray | None = None,
    tokenizer: Any = None,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """A finished detection run of ``trials``: one record per trial, as the scorer writes it
    (the trial's id, its params with ``context_length``, ``depth_percent``, ``needle_id`` and
    ``answer_span``, its answer expected). A passing record generated the answer's tokens as they
    stand in the prompt, and its copy events point at them; a failing one generated the
    context's first tokens. ``tokenizer`` decodes the generated text (else the answer itself, or
    ``"something else"``). Which trials pass is drawn from ``seed`` (longer and deeper fail
    more often, as in :func:`write_detection`)."""
    if not trials:
        raise ValueError("write_trial_detection needs at least one trial")
    rng = np.random.default_rng(seed)
    table = sample_scores(rng, n_layers, n_heads) if table is None else np.asarray(table)
    lengths = sorted({t.context_length for t in trials})
    depths = sorted({t.depth_percent for t in trials})
    config = {"lengths": lengths, "depths": depths, "trials": len(trials)}

    def text(ids: Sequence[int], default: str) -> str:
        if tokenizer is None:
            return default
        return str(tokenizer.decode(list(ids), skip_special_tokens=True)).strip()

    with ResultsDir(
        path, model=model, config=config, seed=seed, overwrite=True, extra_meta=extra_meta
    ) as run:
        for trial in trials:
            a0, a1 = trial.answer_span
            c0 = trial.context_span[0]
            answer_ids = trial.input_ids[a0:a1]
            wrong_ids = trial.input_ids[c0 : c0 + len(answer_ids)]
            share = trial.context_length / max(lengths)
            p_pass = 0.95 - 0.5 * share * (0.5 + trial.depth_percent / 200)
            params = dict(trial.params)
            params.update(
                context_length=trial.context_length,
                depth_percent=trial.depth_percent,
                needle_id=trial.target.needle.needle_id,
                answer_span=[a0, a1],
            )
            run.append(
                _record(
                    rng,
                    trial.trial_id,
                    params,
                    table,
                    bool(rng.random() < p_pass),
                    expected=trial.answer,
                    generated=text(answer_ids, trial.answer),
                    answer_ids=answer_ids,
                    answer_start=a0,
                    wrong_ids=wrong_ids,
                    wrong_text=text(wrong_ids, "something else"),
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
