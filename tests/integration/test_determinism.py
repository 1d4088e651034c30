"""Determinism on CPU: the same command and seed give a byte-identical ``head_scores.json``.

Two separate runs (each loading the model itself) into two directories; the slow tier repeats
it with two real processes under different ``PYTHONHASHSEED`` values. What may vary on a GPU
is documented in ``docs/errors.md`` ("Determinism").
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import subprocess_env

from retrieval_heads import cli as cli_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRID = ["--lengths", "150,200", "--n-depths", "2", "--n-needles", "1", "--n-distractors", "1"]


def detect(out: Path, *extra: str) -> Path:
    """``retrieval-heads detect`` in-process, loading the model itself (no shared model)."""
    argv = ["detect", "--model", "tiny", *GRID, *extra, "--out", str(out)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli_module.main(argv) == 0
    return out


def without_timings(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("elapsed_s")
    return rows


def assert_identical(a: Path, b: Path) -> None:
    assert (a / "head_scores.json").read_bytes() == (b / "head_scores.json").read_bytes()
    assert without_timings(a) == without_timings(b)
    meta_a, meta_b = (json.loads((d / "meta.json").read_text()) for d in (a, b))
    assert meta_a["config"] == meta_b["config"] and meta_a["seed"] == meta_b["seed"]


def test_same_seed_gives_byte_identical_head_scores_on_cpu(tmp_path, tiny_model):
    first = detect(tmp_path / "first")
    second = detect(tmp_path / "elsewhere" / "second")
    assert_identical(first, second)

    # the seed is what fixes them: another one places the needles elsewhere (other trial ids)
    from retrieval_heads.tiny.trials import tiny_grid

    def ids(seed: int) -> list[str]:
        grid = tiny_grid(tiny_model.tokenizer, lengths=[150, 200], depths=[0, 100], n_needles=1,
                         n_distractors=1, seed=seed)  # fmt: skip
        return sorted(t.trial_id for t in grid)

    assert ids(0) == [r["trial_id"] for r in without_timings(first)]
    assert ids(1) != ids(0)


@pytest.mark.slow
def test_two_processes_give_byte_identical_head_scores(tmp_path):
    outs = []
    for hash_seed in ("1", "2"):
        cwd = tmp_path / f"cwd{hash_seed}"
        cwd.mkdir()
        env = subprocess_env(PYTHONHASHSEED=hash_seed)
        argv = ["detect", "--model", "tiny", *GRID, "--out", "run"]
        proc = subprocess.run(
            [sys.executable, "-m", "retrieval_heads", *argv],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(cwd / "run")
    assert_identical(*outs)
    assert_identical(outs[0], detect(tmp_path / "in-process"))
