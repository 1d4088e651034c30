"""Plumbing shared by the experiment scripts: arguments, models, detection, output files.

Not an experiment. Each script in this folder imports it as ``_common`` (the scripts' folder is
first on ``sys.path`` when a script runs; the slow tests put it there too).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_DEPTHS = [0.0, 50.0, 100.0]


def parser(doc: str | None, out: str) -> argparse.ArgumentParser:
    """An argument parser with ``--out`` (default ``out``) and ``--seed``; the description is the
    first paragraph of the script's docstring."""
    description = (doc or "").strip().split("\n\n")[0]
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path(out), help=f"results directory ({out})")
    p.add_argument("--seed", type=int, default=0, help="seed of trials and random draws (0)")
    return p


def ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc


def floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def add_grid_args(p: argparse.ArgumentParser, *, n_needles: int = 2, shard: bool = True) -> None:
    """Arguments of a detection grid (defaults fit the model's context: 3 lengths up to it), and
    ``--shard`` for scripts whose detection goes through :func:`detection`."""
    p.add_argument("--lengths", type=ints, default=None, help="e.g. 200,600,1000 (fit to n_ctx)")
    p.add_argument("--depths", type=floats, default=DEFAULT_DEPTHS, help="percent (0,50,100)")
    p.add_argument("--n-needles", type=int, default=n_needles, help=f"needles ({n_needles})")
    p.add_argument("--n-distractors", type=int, default=2, help="distractor needles (2)")
    if shard:
        p.add_argument(
            "--shard",
            default=None,
            metavar="I/N",
            help="detect only share I of N of the grid, then stop (docs/scale.md)",
        )


class Clock:
    """Prints messages with the seconds since the script started."""

    def __init__(self) -> None:
        self.began = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.began


@functools.cache
def load(name: str) -> Any:
    """A model by registry name or directory, loaded once per process (scripts share it)."""
    from retrieval_heads.model import load_model

    return load_model(name)


def grid_for(
    model: Any,
    *,
    lengths: Sequence[int] | None,
    depths: Sequence[float],
    n_needles: int,
    n_distractors: int,
    seed: int,
) -> list:
    """The NIAH grid for ``model`` (:func:`retrieval_heads.trials.make_trials`): the embedded
    world's for the tiny models, else the built-in filler and needles, in the chat template for
    instruct models. Without ``lengths``, 3 up to the model's context
    (:func:`retrieval_heads.trials.default_lengths`: tiny 200, 600, 1000)."""
    from retrieval_heads.trials import default_lengths, make_trials

    return make_trials(
        model,
        lengths=list(lengths) if lengths else default_lengths(model.n_ctx),
        depths=depths,
        n_needles=n_needles,
        n_distractors=n_distractors,
        seed=seed,
    )


def sweep_grid(model: Any, args: argparse.Namespace) -> list:
    """The grid a script's sweep runs on (``--sweep-lengths``, ``--sweep-depths``,
    ``--sweep-needles``, ``--n-distractors``): :func:`grid_for` with other needles than
    detection's (seed + 1), so the heads are not tested on the trials that chose them."""
    return grid_for(
        model,
        lengths=args.sweep_lengths,
        depths=args.sweep_depths,
        n_needles=args.sweep_needles,
        n_distractors=args.n_distractors,
        seed=args.seed + 1,
    )


def detect_or_load(
    model_name: str,
    out: Path,
    *,
    scores: str | Path | None = None,
    lengths: Sequence[int] | None = None,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    n_needles: int = 2,
    n_distractors: int = 2,
    seed: int = 0,
    say: Clock | None = None,
    shard: Any = None,
) -> tuple[dict[str, Any], Any, list, str] | None:
    """``(meta, HeadScores, records, source)``: read ``scores`` (a results directory or any file
    :func:`~retrieval_heads.store.load_results` reads) when given, else detect on
    ``model_name`` into ``out`` (resumable: a rerun reuses what is there). With ``shard`` (a
    :class:`~retrieval_heads.sharding.Shard`) only that share is detected, into
    ``out/shards/``, and ``None`` is returned: the run's scores exist once the shards are
    merged."""
    from retrieval_heads.scoring import detect
    from retrieval_heads.store import load_results

    if scores is not None:
        meta, head_scores, records = load_results(scores)
        if say:
            say(f"read scores from {scores} ({head_scores.n_passed} passing trials)")
        return meta, head_scores, records, str(scores)
    model = load(model_name)
    trials = grid_for(
        model,
        lengths=lengths,
        depths=depths,
        n_needles=n_needles,
        n_distractors=n_distractors,
        seed=seed,
    )
    used = sorted({t.context_length for t in trials})
    if say:
        say(f"detect on {model.name}: {len(trials)} trials, lengths {used} -> {out}")
    grid = {
        "lengths": used,
        "depths": list(depths),
        "n_needles": n_needles,
        "n_distractors": n_distractors,
    }
    detect(
        model,
        trials,
        out=out,
        model_name=model.name,
        run_config={"grid": grid},
        seed=seed,
        shard=shard,
    )
    if shard is not None:
        return None
    meta, head_scores, records = load_results(out)
    return meta, head_scores, records, str(out)


def is_results(source: str | Path) -> bool:
    """Whether ``source`` names stored scores (a score file, a ``trials.jsonl``, or a results
    directory) rather than a model (a registry name or an HF directory, to detect on)."""
    path = Path(source)
    if path.is_file():
        return True
    names = ("meta.json", "head_scores.json", "trials.jsonl")
    return path.is_dir() and any((path / n).exists() for n in names)


def label_for(source: str | Path, meta: dict[str, Any] | None = None) -> str:
    """A short name for a result set: a file's stem, a results directory's model, or the
    model name as given."""
    path = Path(source)
    if path.is_file():
        return path.stem
    if is_results(path):
        return str((meta or {}).get("model") or path.name)
    return str(source)


def _clean(value: Any) -> Any:
    """JSON-able: NaN/inf to None, tuples to lists, Heads to "L.H", numpy to Python."""
    import numpy as np

    from retrieval_heads.heads import Head

    if isinstance(value, Head):
        return value.dotted
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, np.generic):
        return _clean(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _check_output(path: Path) -> None:
    """An experiment's file never lands on a results folder's own files (meta.json, trials/,
    ...); rewriting its own earlier output is fine."""
    from retrieval_heads.files import check_output_file

    check_output_file(path, "experiment output", is_ours=lambda _: True)


def write_json(path: Path, value: Any) -> Path:
    from retrieval_heads.files import atomic_write_text

    _check_output(path)
    atomic_write_text(path, json.dumps(_clean(value), indent=2, allow_nan=False) + "\n")
    return path


def write_text(path: Path, text: str) -> Path:
    from retrieval_heads.files import atomic_write_text

    _check_output(path)
    atomic_write_text(path, text)
    return path


def write_figure(fig: Any, path: Path) -> Path:
    """A standalone HTML file (plotly.js inlined: opens offline)."""
    _check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path


def finish(out: Path, files: Sequence[Path], say: Clock) -> None:
    """Print where the results went."""
    say(f"results in {out}/")
    for f in files:
        print(f"  {f}")


def detection(args: argparse.Namespace, out: Path, say: Clock):
    """``detect_or_load`` with the grid options every experiment script takes (``add_grid_args``).

    Only the detection is sharded (it is where the model time goes; what follows runs in one
    process). With ``--shard I/N`` this process detects its share into ``out/detect/shards/``
    and the script stops; once every share is written, ``retrieval-heads merge out/detect``
    and the script rerun without ``--shard`` goes on from the merged detection. Under torchrun
    each rank detects its share, rank 0 merges and goes on alone, the other ranks stop.
    """
    from retrieval_heads.scoring import detection_failure
    from retrieval_heads.sharding import Job, shard_dir

    out.mkdir(parents=True, exist_ok=True)
    grid = dict(
        scores=args.scores,
        lengths=args.lengths,
        depths=args.depths,
        n_needles=args.n_needles,
        n_distractors=args.n_distractors,
        seed=args.seed,
        say=say,
    )
    job = Job.from_env(getattr(args, "shard", None))
    if job.shard is None:
        return detect_or_load(args.model, out / "detect", **grid)
    if args.scores is not None:
        raise SystemExit("--shard splits a detection; with --scores there is none to split")
    with job:
        detect_or_load(args.model, out / "detect", shard=job.shard, **grid)
        job.finish(out / "detect", no_pass_error=detection_failure)
    if not job.merges:
        where = shard_dir(out / "detect", job.shard)
        then = (
            "rank 0 goes on"
            if job.torchrun
            else f"merge with `retrieval-heads merge {out / 'detect'}`"
        )
        say(f"detection shard {job.shard} written to {where}; {then}")
        raise SystemExit(0)
    return detect_or_load(args.model, out / "detect", scores=out / "detect", say=say)
