"""The ``retrieval-heads`` parser: the option groups commands share (the model, the trial
grid) and one subparser per command. Option values are parsed by :mod:`.options`."""

from __future__ import annotations

import argparse
from pathlib import Path

from retrieval_heads.cli.options import (
    _any_int,
    _batch_size,
    _device_map,
    _floats,
    _fraction,
    _ints,
    _Listed,
    _max_memory,
    _model_name,
    _non_negative_int,
    _path,
    _positive_int,
    _positive_ints,
    _scorer_names,
    _shard,
)

SHARD_HELP = "run share I of N of the sweep (from 0) into OUT/shards/; then: merge OUT"


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
    p.add_argument(
        "--batch-size",
        type=_batch_size,
        default=None,
        metavar="N|auto",
        help="trials of one length run together (auto: 1 on a CPU, else from the GPU's memory, "
        "at most 16); the records do not depend on it beyond float rounding in the "
        "attention masses",
    )


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
    p.add_argument(
        "--scorers",
        type=_scorer_names,
        action=_Listed,
        default=[],
        help="other detectors on every trial: write (direct logit attribution of the answer), "
        "query_focused (QRHead); the copy score always runs",
    )
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
        "compare-detectors",
        help="which detector's heads matter: ablate each detector's top-K vs shared random heads",
    )
    _add_model_args(p)
    _add_trial_args(p)
    p.add_argument(
        "--scores",
        type=_path,
        required=True,
        help="a detect results directory; each scorer its records carry is a detector (run "
        "`detect --scorers write,query_focused` for the write and query-focused ones)",
    )
    p.add_argument(
        "--top-k",
        type=_positive_ints,
        action=_Listed,
        default=[1, 2, 4, 8],
        help="K values (the unablated baseline always runs)",
    )
    p.add_argument(
        "--random", type=_positive_int, default=3, help="random draws per K, shared by detectors"
    )
    p.add_argument(
        "--patterns",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add TransformerLens' pattern scores (previous token, duplicate token, induction) "
        "as detectors (default: on)",
    )
    p.add_argument(
        "--mode",
        default="uniform",
        choices=["uniform", "zero", "mean", "resample", "knockout"],
        help="how the heads are ablated",
    )
    p.add_argument("--out", type=_path, required=True, help="results directory (resumable)")

    p = sub.add_parser(
        "patch", help="activation patching per head (clean needle into corrupt; tiny models)"
    )
    _add_model_args(p)
    p.add_argument("--pairs", type=_any_int, default=8)
    p.add_argument("--length", type=_positive_int, default=128)
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--scores", type=_path, default=None, help="detect results to correlate with")
    p.add_argument("--out", type=_path, required=True)
    p.add_argument(
        "--batch-size",
        type=_batch_size,
        default=None,
        metavar="N|auto",
        help="pairs patched together, each a layer's heads as copies of its prompt (auto: 1 on "
        "a CPU, else from the GPU's memory, at most 16); the map does not depend on it beyond "
        "float rounding",
    )

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
