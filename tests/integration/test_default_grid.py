"""The lengths a model's grid gets when none are given: one rule
(:func:`retrieval_heads.trials.default_lengths`), with the command line's parameters in
``retrieval-heads detect`` and its defaults in the experiment scripts (``_common.grid_for``,
which ``causal_sweep`` shares for the tiny and the real models alike)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

import retrieval_heads.trials as trials_module
from retrieval_heads import cli

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _common():
    spec = importlib.util.spec_from_file_location("_common", EXPERIMENTS / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_lengths(model, *extra: str) -> list[int]:
    args = cli.build_parser().parse_args(["detect", "--out", "x", *extra])
    return sorted({t.context_length for t in cli.trials_for(model, args)})


def experiment_lengths(model) -> list[int]:
    grid = _common().grid_for(
        model, lengths=None, depths=[50.0], n_needles=1, n_distractors=0, seed=0
    )
    return sorted({t.context_length for t in grid})


def test_tiny_default_grids(tiny_model):
    assert tiny_model.n_ctx == 1024
    few = ["--n-depths", "1", "--n-needles", "1", "--n-distractors", "0"]
    assert cli_lengths(tiny_model, *few) == [124, 341, 558, 775, 992]
    assert cli_lengths(tiny_model, *few, "--max-length", "1007") == [125, 346, 566, 786, 1007]
    assert experiment_lengths(tiny_model) == [200, 600, 1000]


@pytest.fixture(scope="module")
def long_llama(tiny_llama_dir, tmp_path_factory):
    """A config-built model of a real model's shape: the tiny Llama (rotary positions) with an
    8192-token context and no synthetic world (its grid is the built-in filler's)."""
    from retrieval_heads import load_model

    path = tmp_path_factory.mktemp("long-llama")
    shutil.copytree(tiny_llama_dir, path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 8192
    (path / "config.json").write_text(json.dumps(config))
    return load_model(path, device="cpu")


def test_real_shaped_default_grids(long_llama, monkeypatch):
    # the word tokenizer cannot spell the filler: keep the lengths make_trials is asked for
    asked: list[list[int]] = []

    def make_trials(model, **kwargs):
        asked.append(list(kwargs["lengths"]))
        return []

    monkeypatch.setattr(trials_module, "make_trials", make_trials)
    assert long_llama.n_ctx == 8192 and long_llama.world is None
    cli.trials_for(long_llama, cli.build_parser().parse_args(["detect", "--out", "x"]))
    _common().grid_for(
        long_llama, lengths=None, depths=[50.0], n_needles=1, n_distractors=0, seed=0
    )
    assert asked == [[1020, 2805, 4590, 6375, 8160], [1634, 4901, 8168]]
