"""What a run command starts from: the model (``load``, from the model options), its trial grid
(``trials_for``), the config a run records (``run_config``) and the ``--scores`` a command
uses (``model_and_scores``, checked before any trial runs).

Tests stand a loaded model in for ``load`` by patching ``retrieval_heads.cli.inputs.load``:
every command reaches it as ``inputs.load``.
"""

from __future__ import annotations

import sys


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
