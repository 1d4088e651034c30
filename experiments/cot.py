"""Claim 6 - retrieval heads matter for answers that re-read the context, not for recall from weights.

Wu et al. (2024) mask retrieval heads on tasks beyond needle retrieval: chain-of-thought
reasoning (GSM8K, MMLU with CoT) and extractive QA (MuSiQue) suffer, while direct answers to
knowledge questions (MMLU without CoT), which come from the weights, barely move.

On the embedded model (the default) the two sides are its own tasks, both under top-K and
random-K ablation (:func:`retrieval_heads.tiny.controls.control_sweep`):

- **chain** following: links "the key of the red box is in the blue cup ." in the context; the
  answer writes every hop, re-reading the context at each step (the analogue of a chain of
  thought);
- memorised **facts**: "where does the quiet baker live ?", answered from the weights (the
  fact is never in the context; the analogue of a direct knowledge answer).

For real models, ``--questions FILE.jsonl`` runs the harness :mod:`retrieval_heads.cot` instead:
each question answered directly and with "Let's think step by step.", with nothing, the
top-K retrieval heads or K random heads ablated, graded by kind (numeric, choice letter, token
F1). ``experiments/questions.jsonl`` is a small set written for this project:

    python experiments/cot.py                                       # embedded model
    python experiments/cot.py --model /path/to/Mistral-7B-Instruct --chat \\
        --scores ../shared/reference/retrieval_head_scores/Mistral-7B-v0.2-hf.json \\
        --questions experiments/questions.jsonl --ks 0,20 --draws 2

Writes ``cot.json``, ``table.txt``, ``accuracy.html`` and the results directory ``controls/``
(embedded) or ``answers/`` (harness), both resumable.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def accuracy_figure(groups: dict, title: str):
    """Grouped bars: one group per task, one bar per condition (mean ± std over draws)."""
    import plotly.graph_objects as go

    colors = {"none": "#7f7f7f", "top": "#d62728", "random": "#1f77b4"}
    fig = go.Figure()
    conditions: dict = {}
    for task, rows in groups.items():
        for r in rows:
            conditions.setdefault((r.k, r.selection), {})[task] = r
    for (k, sel), by_task in sorted(conditions.items(), key=lambda kv: (kv[0][0] > 0, kv[0])):
        label = "nothing ablated" if k == 0 else f"{sel} K={k}"
        tasks = list(by_task)
        fig.add_bar(
            x=tasks,
            y=[by_task[t].accuracy for t in tasks],
            error_y=dict(type="data", array=[by_task[t].accuracy_std for t in tasks]),
            name=label,
            marker_color=colors.get(sel),
            text=[f"{100 * by_task[t].accuracy:.0f}%" for t in tasks],
            textposition="outside",
        )
    fig.update_layout(
        title=title,
        template="plotly_white",
        barmode="group",
        yaxis=dict(title="accuracy", range=[0, 1.12], tickformat=".0%"),
        xaxis_title="task",
    )
    return fig


def _embedded(args, model, scores, out: Path, say) -> tuple[dict, str, dict]:
    from retrieval_heads import analysis, causal, selection
    from retrieval_heads.tiny.controls import control_sweep

    tasks = args.tasks
    k = max(args.ks)
    say(
        f"control sweep on {model.name}: tasks {tasks}, K = {args.ks}, {args.draws} random "
        f"draws, {args.n} trials per task at {args.length} tokens"
    )
    sweep = control_sweep(
        model,
        scores,
        ks=args.ks,
        draws=args.draws,
        seed=args.seed,
        n=args.n,
        length=args.length,
        hops=args.hops,
        tasks=tasks,
        mode=args.mode,
        phase=args.phase,
        out=out / "controls",
    )
    summary = {}
    for task, rows in sweep.rows.items():
        by = {(r.k, r.selection): r for r in rows}
        entry = {f"{sel} K={kk}": r.to_dict() for (kk, sel), r in by.items()}
        base = by.get((0, "none"))
        top, rnd = by.get((k, "top")), by.get((k, "random"))
        if base and top:
            entry["drop_top"] = base.accuracy - top.accuracy
        if base and rnd:
            entry["drop_random"] = base.accuracy - rnd.accuracy
        summary[task] = entry
    classes = causal.answer_classes(sweep.records)
    text = (
        sweep.table()
        + "\n"
        + analysis.format_table(
            [[c, *(f"{100 * v:.0f}%" for v in s.values())] for c, s in classes.items()],
            ["condition", *next(iter(classes.values())).keys()],
        )
    )
    result = {
        "claim": "chain following (re-reads the context) breaks under top-K ablation; "
        "memorised facts (from the weights) do not; random-K leaves both",
        "setting": "embedded",
        "tasks": tasks,
        "k": k,
        "top_heads": [h.dotted for h in selection.top_heads(scores, k)],
        "summary": summary,
        "answer_classes": classes,
    }
    return result, text, sweep.rows


def _harness(args, model, scores, out: Path, say) -> tuple[dict, str, dict]:
    from retrieval_heads import cot

    questions = cot.load_questions(args.questions)
    say(
        f"CoT harness on {model.name}: {len(questions)} questions x {len(args.prompting)} "
        f"promptings, K = {args.ks}, {args.draws} random draws"
    )
    result_run = cot.run(
        model,
        questions,
        scores,
        args.ks,
        draws=args.draws,
        seed=args.seed,
        prompting=args.prompting,
        mode=args.mode,
        phase=args.phase,
        chat=args.chat,
        max_new_tokens={"direct": args.max_direct, "cot": args.max_cot},
        out=out / "answers",
        progress=args.progress,
    )
    rows = result_run.rows
    result = {
        "claim": "masking retrieval heads hurts chain-of-thought and extractive answers more "
        "than direct answers from the weights",
        "setting": "harness",
        "questions": str(args.questions),
        "summary": {
            f"{kind}/{p}": [r.to_dict() for r in group] for (kind, p), group in rows.items()
        },
        "per_question": [
            {
                "id": r.trial_id,
                "passed": r.passed,
                "score": r.recall,
                "extracted": r.params.get("extracted"),
                "answer": r.expected,
                "ablated": list(r.condition.heads),
                "text": r.generated_text,
            }
            for r in result_run.records
        ],
        "notes": result_run.notes,
    }
    return result, result_run.table(), {f"{kind} {p}": g for (kind, p), g in rows.items()}


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, "runs/experiments/cot")
    p.add_argument("--model", default="tiny", help="registry name or HF directory (tiny)")
    p.add_argument("--scores", default=None, help="head scores of this model (else detect)")
    p.add_argument("--ks", type=C.ints, default=[0, 6], help="K values (0,6)")
    p.add_argument("--draws", type=int, default=2, help="random draws per K (2)")
    p.add_argument("--questions", type=Path, default=None, help="JSONL: run the CoT harness")
    # embedded-model controls
    p.add_argument("--tasks", nargs="+", default=["chain", "fact"], help="chain fact [niah]")
    p.add_argument("--n", type=int, default=6, help="trials per task (6)")
    p.add_argument("--length", type=int, default=256, help="tokens per trial (256)")
    p.add_argument("--hops", type=int, default=3, help="links per chain (3)")
    # the harness (and the ablation, for both)
    p.add_argument("--prompting", nargs="+", default=["direct", "cot"], help="direct cot")
    p.add_argument("--mode", default="uniform", choices=["uniform", "zero"])
    p.add_argument("--phase", default="decode", choices=["decode", "all"], help="(decode)")
    p.add_argument("--chat", action="store_true", help="use the tokenizer's chat template")
    p.add_argument("--max-direct", type=int, default=24, help="tokens for a direct answer (24)")
    p.add_argument("--max-cot", type=int, default=256, help="tokens for a CoT answer (256)")
    p.add_argument("--progress", action="store_true")
    C.add_grid_args(p)
    args = p.parse_args(argv)

    say = C.Clock()
    out: Path = args.out
    _, scores, _, source = C.detection(args, out, say)
    model = C.load(args.model)
    if args.questions is not None:
        result, text, groups = _harness(args, model, scores, out, say)
    elif getattr(model, "world", None) == "tiny":
        result, text, groups = _embedded(args, model, scores, out, say)
    else:
        raise SystemExit(
            "cot: the chain and fact controls exist only in the embedded model's world; give a "
            "real model --questions FILE.jsonl (e.g. experiments/questions.jsonl)"
        )
    result["scores"] = source
    print(text)
    files = [
        C.write_json(out / "cot.json", result),
        C.write_text(out / "table.txt", text),
        C.write_figure(
            accuracy_figure(groups, f"{model.name}: accuracy under ablation"),
            out / "accuracy.html",
        ),
    ]
    C.finish(out, files, say)
    return result


if __name__ == "__main__":
    main()
