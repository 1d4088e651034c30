"""Wall time of a whole detection on one length's slice of the default SmolLM2 grid.

The grid is the one ``experiments/real_models.py`` detects on: 1K, 2K and 4K tokens × 5 depths
× 4 built-in needles, 2 distractors, the chat template, seed 0 (60 trials). This script times
``detect`` on the trials of one length after one warm-up trial, each trial stopping as a real
run does. It uses only APIs that older code has too (``load_model``, ``make_trials``,
``detect``), so the same command measures an older commit: check it out in a worktree and run
this file with ``PYTHONPATH`` set to that worktree. One JSON line on stdout::

    python benchmarks/detect_wall.py 1000 8     # today's code, batches of 8
    python benchmarks/detect_wall.py 1000 -     # no batch_size argument (code before batches)

Needs SmolLM2 (``make real-models``); runs with one torch thread, as the benchmark does.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[0].isdigit() or not (argv[1] == "-" or argv[1].isdigit()):
        print("usage: detect_wall.py LENGTH (1000, 2000 or 4000) BATCH (an integer, or -)")
        return 2
    import torch

    torch.set_num_threads(1)
    import retrieval_heads as rh
    from retrieval_heads.scoring import detect
    from retrieval_heads.trials import make_trials

    length, batch = int(argv[0]), None if argv[1] == "-" else int(argv[1])
    model = rh.load_model("smollm2-135m-instruct")
    trials = make_trials(
        model,
        lengths=[1000, 2000, 4000],
        depths=[0, 25, 50, 75, 100],
        n_needles=4,
        n_distractors=2,
        seed=0,
        chat=True,
    )
    chosen = [t for t in trials if t.params["length"] == length]
    if not chosen:
        print(f"no trials of length {length}: the grid has 1000, 2000 and 4000")
        return 2
    keywords = {} if batch is None else {"batch_size": batch}
    detect(model, trials[:1], require_pass=False)  # warm-up: first calls, the lean step's probe
    began = time.perf_counter()
    detect(model, chosen, require_pass=False, **keywords)
    wall = time.perf_counter() - began
    print(json.dumps({"length": length, "batch": batch, "trials": len(chosen), "wall_s": wall}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
