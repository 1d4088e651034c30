"""Shared by tests that start the real CLI as a subprocess (tests/ is on sys.path via conftest)."""

import json
import os
from pathlib import Path

# Offline, quiet and one thread: on shared cores, spinning OpenMP threads make the tiny model many
# times slower, and the results are the same bytes either way.
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment with ``QUIET_ENV`` and ``extra`` on top."""
    return {**os.environ, **QUIET_ENV, **extra}


# The sweeps the fault and distributed tests run through the real command line.
# 12 trials (2 lengths x 3 depths x 2 needles) of at most 250 tokens
DETECT = [
    "detect",
    "--model",
    "tiny",
    "--lengths",
    "150,250",
    "--n-depths",
    "3",
    "--n-needles",
    "2",
]
N_DETECT = 12
# 4 trials x 4 conditions (K=0; top, random and layer-matched K=2) = 16 records
ABLATE = ["ablate", "--model", "tiny", "--lengths", "150", "--n-depths", "2", "--n-needles", "2",
          "--top-k", "0,2", "--random", "1"]  # fmt: skip
N_ABLATE = 16


def records(out) -> list[dict]:
    """A results directory's ``trials.jsonl`` without the timings (for run-vs-run equality)."""
    rows = [json.loads(line) for line in (Path(out) / "trials.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("elapsed_s")
    return rows
