"""Training the embedded model's pipeline for a few hundred steps lowers the loss."""

from __future__ import annotations

import json

import pytest

from retrieval_heads.tiny import train

pytestmark = pytest.mark.slow


def test_a_few_hundred_steps_on_a_reduced_model_lower_the_loss(tmp_path):
    train.HISTORY.clear()
    train.main(
        ["--out", str(tmp_path), "--reduced", "--short-steps", "300", "--long-steps", "0"]
        + ["--workers", "0", "--device", "cpu"]
    )
    log = json.loads((tmp_path / "short" / "training.json").read_text())["log"]
    assert log[-1]["step"] == 300
    assert log[-1]["loss"] < log[0]["loss"] - 0.5, log
    assert (tmp_path / "short" / "model.safetensors").exists()
