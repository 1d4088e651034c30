"""The ``retrieval-heads`` command: parse, call the library, print. No logic the library lacks.

Subcommands: ``detect``, ``ablate``, ``patch``, ``kv-sim``, ``report``, ``compare``, ``export``,
``merge``, ``models``. ``detect``, ``ablate`` and ``kv-sim`` run a share of the sweep with
``--shard i/N`` or under ``torchrun`` (``retrieval_heads.sharding``).

Errors a user can fix (bad input, a model that is not there, results from another run) print one
short message and exit 2; nothing already written is touched. A failure of the machine (a full
disk, an I/O error) prints one line and exits 1, as does a run that produced no result
(no trial passed). The catalogue of errors is in ``docs/errors.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

USER_ERRORS = (ValueError, KeyError, FileNotFoundError, PermissionError, IsADirectoryError)


class _Listed(argparse.Action):
    """A list option that takes commas, spaces or both: ``--lengths 1000,2000`` or
    ``--lengths 1000 2000`` (each piece is parsed by the option's ``type``, then flattened)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("nargs", "+")
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, [x for piece in values for x in piece])


# --- option values: each type refuses what the option cannot mean, naming what it can ---------

_INT = re.compile(r"\s*[+-]?[0-9]+\s*")
_NUMBER = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*")


def _integer(low: int | None = None):
    """An ``int`` type written in ASCII digits (not ``1.5``, ``1e3``, ``1_000``), ``>= low``."""

    def parse(text: str) -> int:
        if not _INT.fullmatch(text):
            allowed = f" (expected an integer >= {low})" if low is not None else ""
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}{allowed}")
        value = int(text)
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


_any_int = _integer()  # a bound checked later, with its own message (docs/errors.md)
_positive_int = _integer(1)
_non_negative_int = _integer(0)


def _int_list(low: int | None = None):
    """Comma-separated integers (at least one), each ``>= low``; empty pieces are skipped."""

    def parse(text: str) -> list[int]:
        pieces = [x for x in text.split(",") if x.strip()]
        if not pieces or not all(_INT.fullmatch(x) for x in pieces):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        values = [int(x) for x in pieces]
        for value in values:
            if low is not None and value < low:
                raise argparse.ArgumentTypeError(
                    f"expected comma-separated integers >= {low}, got {value} in {text!r}"
                )
        return values

    return parse


_ints = _int_list()
_positive_ints = _int_list(1)


def _floats(text: str) -> list[float]:
    """Comma-separated finite numbers (at least one); not ``nan``, ``inf`` or ``1e999``."""
    pieces = [x for x in text.split(",") if x.strip()]
    if not pieces or not all(_NUMBER.fullmatch(x) for x in pieces):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    values = [float(x) for x in pieces]
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def _fraction(text: str) -> float:
    """A number from 0 to 1 (a share of accuracy)."""
    if not _NUMBER.fullmatch(text) or not 0 <= float(text) <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return float(text)


def _path(text: str) -> Path:
    """A path; not an empty one, which would silently mean the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"expected a path, got {text!r} (an empty path would mean the current directory)"
        )
    return Path(text)


def _model_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"expected a registry name, a model directory, a .gguf file or a hub id, got {text!r}"
        )
    return text


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", type=_model_name, default="tiny", help="registry name, HF directory or hub id"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument(
        "--n-ctx", type=_any_int, default=None, help="context limit (default: the model's)"
    )
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument(
        "--device-map",
        type=_device_map,
        default=None,
        help="split the model over GPUs: auto, balanced, balanced_low_0, sequential, or a JSON "
        "{module: device} map (inline or a file)",
    )
    p.add_argument("--n-devices", type=_any_int, default=None, help="split evenly over N GPUs")
    p.add_argument(
        "--max-memory", type=_max_memory, default=None, help="per device: 0=70GiB,1=70GiB or JSON"
    )


# --- multi-device and sharding options (docs/scale.md) -----------------------------------------


def _device_map(text: str):
    from retrieval_heads.model import DEVICE_MAP_DIRECTIVES

    if text in DEVICE_MAP_DIRECTIVES:
        return text
    source = text
    if not text.lstrip().startswith("{"):
        if not Path(text).is_file():
            raise argparse.ArgumentTypeError(
                f"expected {', '.join(DEVICE_MAP_DIRECTIVES)}, a JSON object or a JSON file; "
                f"got {text!r}"
            )
        source = Path(text).read_text(encoding="utf-8")
    try:
        mapping = json.loads(source)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({exc})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise argparse.ArgumentTypeError(
            f"expected a JSON object {{module: device}} of at least one entry, got {text!r}"
        )
    return mapping


def _max_memory(text: str) -> dict:
    """``0=70GiB,1=70GiB,cpu=200GiB`` or JSON; GPU indices become integers, as accelerate wants."""
    try:
        pairs = json.loads(text) if text.lstrip().startswith("{") else None
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({exc})") from None
    if pairs is None:
        items = [item.split("=", 1) for item in text.split(",") if item.strip()]
        if not items or any(len(item) != 2 or not all(x.strip() for x in item) for item in items):
            raise argparse.ArgumentTypeError(
                f"expected DEVICE=SIZE pairs like 0=70GiB,1=70GiB,cpu=200GiB; got {text!r}"
            )
        pairs = {k.strip(): v.strip() for k, v in items}
    if not isinstance(pairs, dict) or not pairs:
        raise argparse.ArgumentTypeError(
            f"expected a JSON object {{device: size}} of at least one entry, got {text!r}"
        )
    return {
        (int(k) if str(k).isdigit() else k): (int(v) if str(v).isdigit() else v)
        for k, v in pairs.items()
    }


def _shard(text: str):
    from retrieval_heads.sharding import Shard

    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


SHARD_HELP = "run share I of N of the sweep (from 0) into OUT/shards/; then: merge OUT"


def _add_trial_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lengths", type=_positive_ints, action=_Listed, default=None, help="e.g. 1000,2000,4000"
    )
    p.add_argument("--min-length", type=_positive_int, default=None)
    p.add_argument("--max-length", type=_positive_int, default=None)
    p.add_argument("--n-lengths", type=_positive_int, default=5)
    p.add_argument(
        "--depths", type=_floats, action=_Listed, default=None, help="percent, e.g. 0,50,100"
    )
    p.add_argument("--n-depths", type=_positive_int, default=5)
    p.add_argument(
        "--needles", type=_path, default=None, help="JSONL: id, needle, question, answer"
    )
    p.add_argument(
        "--n-needles",
        type=_positive_int,
        default=None,
        help="needles to use as targets: the first N built-in ones (4) or of --needles (all)",
    )
    p.add_argument("--n-distractors", type=_non_negative_int, default=2)
    p.add_argument("--haystack", type=_path, default=None, help="a .txt file or a folder of them")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the prompt in the tokenizer's chat template (default: on for instruct models "
        "of the registry, off otherwise)",
    )
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--max-new-tokens", type=_positive_int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrieval-heads",
        description="Find, test and show the attention heads a model uses to retrieve from context.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("detect", help="score every head on a needle-in-a-haystack grid")
    _add_model_args(p)
    _add_trial_args(p)
    p.add_argument("--out", type=_path, required=True, help="results directory (resumable)")
    p.add_argument("--top", type=_positive_int, default=10, help="top heads to print")
    p.add_argument("--shard", type=_shard, default=None, metavar="I/N", help=SHARD_HELP)

    p = sub.add_parser("ablate", help="K-sweep: mask top-K retrieval heads vs K random heads")
    _add_model_args(p)
    _add_trial_args(p)
    p.add_argument("--scores", type=_path, required=True, help="a detect results directory")
    p.add_argument(
        "--top-k", type=_ints, action=_Listed, default=[0, 1, 2, 5, 10, 20, 50], help="K values"
    )
    p.add_argument("--random", type=_any_int, default=5, help="random draws per K")
    p.add_argument("--mode", default="uniform", help="uniform, zero, mean, resample, knockout")
    p.add_argument("--phase", default="decode", choices=["decode", "all"])
    p.add_argument("--out", type=_path, required=True)
    p.add_argument("--shard", type=_shard, default=None, metavar="I/N", help=SHARD_HELP)

    p = sub.add_parser(
        "patch", help="activation patching per head (clean needle into corrupt; tiny models)"
    )
    _add_model_args(p)
    p.add_argument("--pairs", type=_any_int, default=8)
    p.add_argument("--length", type=_positive_int, default=128)
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--scores", type=_path, default=None, help="detect results to correlate with")
    p.add_argument("--out", type=_path, required=True)

    p = sub.add_parser(
        "kv-sim", help="KV-cache what-if: accuracy vs KV share when only some heads keep it all"
    )
    _add_model_args(p)
    _add_trial_args(p)
    p.add_argument("--scores", type=_path, required=True, help="a detect results directory")
    p.add_argument("--out", type=_path, required=True, help="results directory (resumable)")
    p.add_argument("--sink", type=_any_int, default=4, help="first tokens every head keeps")
    p.add_argument("--window", type=_any_int, default=64, help="recent tokens every head keeps")
    p.add_argument(
        "--top-k",
        type=_ints,
        action=_Listed,
        default=None,
        help="full KV heads, e.g. 0,1,2,4 (default: 0,1,2,4..)",
    )
    p.add_argument("--random", type=_any_int, default=3, help="random draws per K")
    p.add_argument(
        "--uniform-windows",
        type=_positive_ints,
        action=_Listed,
        default=None,
        help="windows for all-heads windowing",
    )
    p.add_argument("--phase", default="decode", choices=["decode", "all"])
    p.add_argument("--reduce", default="max", choices=["max", "mean"], help="query -> KV head")
    p.add_argument(
        "--tolerance", type=_fraction, default=0.05, help="accuracy loss allowed for the export"
    )
    p.add_argument("--shard", type=_shard, default=None, metavar="I/N", help=SHARD_HELP)

    p = sub.add_parser("report", help="one self-contained HTML report from results directories")
    p.add_argument("dirs", type=_path, nargs="+")
    p.add_argument("--out", type=_path, default=Path("report.html"))
    p.add_argument(
        "--model", type=_model_name, default=None, help="load this model to draw attention views"
    )

    p = sub.add_parser("compare", help="agreement of two score files or results directories")
    p.add_argument("a", type=_path)
    p.add_argument("b", type=_path)
    p.add_argument("--k", type=_positive_int, default=20, help="top-k for the Jaccard index")

    p = sub.add_parser("export", help="write scores in the published {'L-H': [...]} format")
    p.add_argument("results", type=_path)
    p.add_argument("--out", type=_path, required=True)

    p = sub.add_parser(
        "merge", help="merge the shards of a detect, ablate or kv-sim run (DIR/shards/)"
    )
    p.add_argument("dir", type=_path, help="the --out of the sharded run")
    p.add_argument("--top", type=_positive_int, default=10, help="top heads to print")

    sub.add_parser("models", help="list registered models and supported architectures")
    return parser


# --- commands -----------------------------------------------------------------------------------


def load(args):
    from retrieval_heads.model import load_model

    return load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        n_ctx=args.n_ctx,
        trust_remote_code=args.trust_remote_code,
        device_map=args.device_map,
        n_devices=args.n_devices,
        max_memory=args.max_memory,
    )


def trials_for(model, args):
    """The NIAH grid for this model: its own world's prompts for the embedded model."""
    from retrieval_heads.trials import make_trials, uses_chat
    from retrieval_heads.trials.grid import default_lengths, linspace_depths

    # the command line's own default lengths: up to 32768 tokens less 32 for the answer, the
    # shortest an eighth of the longest (the experiment scripts keep default_lengths' defaults)
    lengths = args.lengths or default_lengths(
        model.n_ctx,
        args.n_lengths,
        room=32,
        shortest=8,
        floor=True,
        cap=32768,
        min_length=args.min_length,
        max_length=args.max_length,
    )
    depths = args.depths if args.depths is not None else linspace_depths(args.n_depths)
    args.chat = uses_chat(model, args.chat)  # resolved here: the run's config records it
    trials = make_trials(
        model,
        lengths=lengths,
        depths=depths,
        n_needles=args.n_needles,
        n_distractors=args.n_distractors,
        seed=args.seed,
        needles=args.needles,
        haystack=args.haystack,
        chat=args.chat,
    )
    if args.n_needles is None:  # recorded as what it was: 4 built-in, or the whole file
        args.n_needles = len({t.target.needle.needle_id for t in trials})
    return trials


def run_config(args, trials) -> dict:
    keys = ("lengths", "depths", "n_lengths", "n_depths", "n_needles", "n_distractors", "chat")
    config = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    config.update(
        needles=str(args.needles) if args.needles else "built-in",
        haystack=str(args.haystack) if args.haystack else "built-in",
        max_new_tokens=args.max_new_tokens,
        trials=len(trials),
        trial_lengths=sorted({t.context_length for t in trials}),
    )
    return config


def print_top(scores, n: int) -> None:
    print(f"\n{'head':>6}  {'score':>6}  {'95% CI':>15}  passing trials")
    for head in scores.top(n):
        s = scores.stats(head)
        print(
            f"{head.dotted:>6}  {s['mean']:6.3f}  [{s['ci_low']:.3f}, {s['ci_high']:.3f}]  {s['n']}"
        )
    share = len(scores.above(0.1)) / (scores.n_layers * scores.n_heads)
    print(
        f"\n{len(scores.above(0.1))} of {scores.n_layers * scores.n_heads} heads score above 0.1 "
        f"({share:.1%}); {scores.n_passed} of {scores.n_total} trials passed"
    )


def cmd_detect(args) -> int:
    from retrieval_heads.scoring import DecodeConfig, detect

    model = load(args)
    trials = trials_for(model, args)
    print(f"{model.name}: {len(trials)} trials -> {args.out}")
    scores = detect(
        model,
        trials,
        out=args.out,
        config=DecodeConfig(max_new_tokens=args.max_new_tokens),
        model_name=model.name,
        run_config=run_config(args, trials),
        seed=args.seed,
        progress=True,
        shard=args.shard,
    )
    if args.shard is None:  # a share's scores are not the run's: merge prints those
        print_top(scores, args.top)
    return 0


def model_and_scores(args):
    """The model and the ``--scores`` detected on it, checked before any trial runs: a finished
    detection (or a score file) with a passing trial, of a model of this shape. Scores of
    another model of the same shape (another checkpoint) are used with a warning."""
    import numpy as np

    from retrieval_heads.store import load_results

    meta, scores, _ = load_results(args.scores)
    kind = meta.get("kind")
    if kind is not None and kind != "detect":
        raise ValueError(
            f"{args.scores} is {'an' if kind[0] in 'aeiou' else 'a'} {kind} run, whose scores are measured under its intervention: "
            "pass the folder `retrieval-heads detect` wrote"
        )
    if scores.n_passed == 0 or not np.isfinite(scores.mean).any():
        raise ValueError(
            f"{args.scores} holds no passing trial (every score is empty or NaN), so it ranks "
            "no head: detect again until some trials pass (more --max-new-tokens, shorter "
            "--lengths, --chat for a chat model)"
        )
    if kind == "detect" and meta.get("status") != "finished":
        raise ValueError(
            f"{args.scores} is an unfinished detection ({meta.get('status')}): rerun the same "
            "detect command to finish it (or merge its shards) before using its scores"
        )
    model = load(args)
    if (scores.n_layers, scores.n_heads) != (model.n_layers, model.n_heads):
        raise ValueError(
            f"{args.scores} holds scores for {scores.n_layers} x {scores.n_heads} heads but "
            f"{model.name} has {model.n_layers} x {model.n_heads}: detect on this model first"
        )
    detected_on = meta.get("model")
    if detected_on is not None and detected_on != model.name:
        print(
            f"warning: {args.scores} was detected on {detected_on!r}, not {model.name!r}; the "
            "shapes match (another checkpoint?), so its ranking is used as it is",
            file=sys.stderr,
        )
    return model, scores


def cmd_ablate(args) -> int:
    from retrieval_heads import analysis, causal
    from retrieval_heads.scoring import DecodeConfig

    model, scores = model_and_scores(args)
    if args.mode == "uniform":
        from retrieval_heads.interventions import check_uniform

        check_uniform(model)  # before the trials are built
    trials = trials_for(model, args)
    records = causal.k_sweep(
        model,
        trials,
        scores,
        args.top_k,
        draws=args.random,
        seed=args.seed,
        mode=args.mode,
        phase=args.phase,
        out=args.out,
        config=DecodeConfig(max_new_tokens=args.max_new_tokens),
        progress=True,
        shard=args.shard,
    )
    if args.shard is None:
        print(analysis.format_k_sweep(analysis.summarise_k_sweep(records)))
    return 0


def sharded(command):
    """``command`` (detect, ablate, kv-sim) as this process's share: ``--shard i/N``, or torchrun's rank
    (``args.shard`` is set to it). Under torchrun every rank waits for the others and rank 0
    merges and prints the whole run; with ``--shard`` it says where the share went."""

    def run(args) -> int:
        from retrieval_heads.files import check_output_folder
        from retrieval_heads.scoring import detection_failure
        from retrieval_heads.sharding import Job, shard_dir

        check_output_folder(args.out)  # before the model loads
        with Job.from_env(args.shard) as job:
            args.shard = job.shard
            args.device = job.device(args.device, args.device_map)
            code = command(args)
            if job.shard is None:
                return code
            merged = job.finish(args.out, no_pass_error=detection_failure)
        where = shard_dir(args.out, job.shard)
        if merged is not None:
            print_merged(merged, getattr(args, "top", 10))
        elif job.torchrun:
            print(f"shard {job.shard} written to {where}; rank 0 merges the run")
        else:
            print(
                f"shard {job.shard} written to {where}; once all are: retrieval-heads merge {args.out}"
            )
        return code

    return run


def print_merged(merged, top: int) -> None:
    from retrieval_heads import analysis
    from retrieval_heads.scores import HeadScores

    print(f"merged {merged.count} shards: {len(merged.records)} trials -> {merged.path}")
    if merged.kind == "detect":
        print_top(HeadScores.from_records(merged.records), top)
    elif merged.kind == "ablate":
        print(analysis.format_k_sweep(analysis.summarise_k_sweep(merged.records)))
    elif merged.kind == "kv-sim":
        print_kv_sim(merged.path, merged.records, merged.meta)


def cmd_merge(args) -> int:
    from retrieval_heads.scoring import detection_failure
    from retrieval_heads.sharding import merge

    print_merged(merge(args.dir, no_pass_error=detection_failure), args.top)
    return 0


def cmd_patch(args) -> int:
    import json

    from retrieval_heads import patching, registry
    from retrieval_heads.files import atomic_write_text, check_output_file, check_output_folder
    from retrieval_heads.store import load_results

    entry = registry.lookup(args.model)
    if entry is None or entry.world != "tiny":
        raise ValueError(
            f"patch builds its clean/corrupt needle pairs in the embedded model's synthetic "
            f"world, which {args.model} does not speak: use --model tiny or tiny-short "
            "(per-head patching on any model: retrieval_heads.interventions.patch_heads)"
        )
    if args.pairs < 1:
        raise ValueError(f"--pairs must be at least 1, got {args.pairs}")
    check_output_folder(args.out)
    check_output_file(args.out / "patching.json", "patching map", owns={"patching.json"})
    model = load(args)
    effect = patching.patching_map(model, n_pairs=args.pairs, seed=args.seed, length=args.length)
    out = {"model": model.name, "pairs": args.pairs, "seed": args.seed, "effect": effect.tolist()}
    if args.scores:
        _, scores, _ = load_results(args.scores)
        out["agreement"] = patching.patching_vs_scores(effect, scores)
        print(f"agreement with retrieval scores: {out['agreement']}")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "patching.json", json.dumps(out, indent=1))
    print(f"wrote {args.out / 'patching.json'}")
    return 0


def cmd_kv_sim(args) -> int:
    from retrieval_heads import kvcache
    from retrieval_heads.scoring import DecodeConfig

    model, scores = model_and_scores(args)
    trials = trials_for(model, args)
    sweep = kvcache.simulate(
        model,
        trials,
        scores,
        ks=args.top_k,
        draws=args.random,
        seed=args.seed,
        sink=args.sink,
        window=args.window,
        uniform_windows=args.uniform_windows,
        phase=args.phase,
        reduce=args.reduce,
        out=args.out,
        config=DecodeConfig(max_new_tokens=args.max_new_tokens),
        progress=True,
        shard=args.shard,
    )
    if args.shard is None:
        from retrieval_heads.store import read_meta

        print_kv_sim(args.out, sweep.records, read_meta(args.out), args.tolerance)
    return 0


def print_kv_sim(out: Path, records, meta: dict, tolerance: float = 0.05) -> None:
    """The curve of a finished KV-cache simulation, and its exported smallest sufficient set."""
    from retrieval_heads import analysis, kvcache

    print(analysis.format_kv_curve(analysis.kv_curve(records)))
    from retrieval_heads.views._layers import layer_windows_from_meta

    windows = layer_windows_from_meta(meta, records[0].n_layers) if records else None
    chosen, paths = kvcache.export_chosen(
        out,
        records,
        meta["config"],
        tolerance=tolerance,
        layer_windows=windows,
        info={"model": meta.get("model")},
    )
    print(
        f"\ntop {chosen.k} KV heads keep accuracy {chosen.accuracy:.3f} with "
        f"{chosen.kv_share:.1%} of the KV cache; wrote {paths['json']} and "
        f"{paths['duo_tsv'].parent}/ (DuoAttention layout)"
    )
    listing = json.loads(paths["json"].read_text())
    if not listing["within_tolerance"]:
        print(
            f"warning: no K measured keeps accuracy within {tolerance} of the full cache's "
            f"{listing['baseline_accuracy']:.3f}; exported the largest K measured. Add larger "
            "K to --top-k, or a wider --window, to find a sufficient set"
        )
    sliding = listing.get("full_heads_in_sliding_layers")
    if sliding:
        print(
            f"note: {len(sliding)} of them sit in sliding-window layers, whose cache keeps only "
            "the layer's own window anyway (listed under full_heads_in_sliding_layers)"
        )


def cmd_report(args) -> int:
    from retrieval_heads.files import check_output_file
    from retrieval_heads.views.report import build_report, is_report_file

    check_output_file(args.out, "report", is_ours=is_report_file)  # before the model loads
    model = None
    if args.model:
        from retrieval_heads.model import load_model

        model = load_model(args.model)
    path = build_report(args.dirs, args.out, model=model)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_compare(args) -> int:
    from retrieval_heads import analysis
    from retrieval_heads.store import load_results

    _, a, _ = load_results(args.a)
    _, b, _ = load_results(args.b)
    result = analysis.agreement(a, b, k=args.k)
    print(f"heads compared      {result.n_heads}")
    print(f"Pearson             {result.pearson:.3f}")
    print(f"Spearman            {result.spearman:.3f}")
    print(f"Jaccard of top-{result.k:<4} {result.jaccard:.3f}")
    print(f"shared top heads    {', '.join(h.dotted for h in result.shared_top)}")
    return 0


def cmd_export(args) -> int:
    from retrieval_heads.published import write_published
    from retrieval_heads.store import load_results

    _, scores, _ = load_results(args.results)
    write_published(scores, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_models(args) -> int:
    from retrieval_heads import registry

    for name in registry.names():
        entry = registry.lookup(name)
        print(f"{name:22} {registry.state(name)}")
        print(f"{'':22} {entry.description}")  # type: ignore[union-attr]  # a registered name
    from retrieval_heads.model import supported_architectures

    print("\nAlso: an HF-format folder, a .gguf file (converted once, cached), or a hub id.")
    print("TransformerLens supports these architectures:")
    print(", ".join(supported_architectures()))
    return 0


COMMANDS = {
    "detect": sharded(cmd_detect),
    "ablate": sharded(cmd_ablate),
    "patch": cmd_patch,
    "kv-sim": sharded(cmd_kv_sim),
    "report": cmd_report,
    "compare": cmd_compare,
    "export": cmd_export,
    "merge": cmd_merge,
    "models": cmd_models,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished trials are saved; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"retrieval-heads {args.command}: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # DetectionError and friends: a result, not a crash
        print(f"retrieval-heads {args.command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the machine, not the input: a full disk, an I/O error
        print(f"retrieval-heads {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
