"""Ablation validation that needs no model."""

from __future__ import annotations

import math

import pytest
import torch

from retrieval_heads import Head
from retrieval_heads.interventions import MODES, Ablation, RecordedZ


def test_unknown_mode_lists_the_modes():
    with pytest.raises(ValueError, match="unknown ablation mode 'zeroed'") as err:
        Ablation(["1.2"], "zeroed")
    for mode in MODES:
        assert mode in str(err.value)


def test_unknown_phase():
    with pytest.raises(ValueError, match="unknown phase 'prefill'"):
        Ablation(["1.2"], "zero", phase="prefill")


@pytest.mark.parametrize(
    "mode, needs", [("mean", "mean_z"), ("resample", "resample"), ("knockout", "blocked")]
)
def test_mode_without_its_data(mode, needs):
    with pytest.raises(ValueError, match=f"mode '{mode}' needs {needs}"):
        Ablation(["0.0"], mode)


def test_data_for_another_mode():
    with pytest.raises(ValueError, match="only used by mode 'mean'"):
        Ablation(["0.0"], "zero", mean_z=torch.zeros(2, 4, 16))
    with pytest.raises(ValueError, match="only used by mode 'knockout'"):
        Ablation(["0.0"], "uniform", blocked_positions=[3])


def test_heads_are_parsed_deduplicated_and_sorted():
    abl = Ablation(["L1H2", "0-3", Head(1, 2), (0, 1)], "zero")
    assert abl.heads == [Head(0, 1), Head(0, 3), Head(1, 2)]
    with pytest.raises(ValueError, match="malformed head label"):
        Ablation(["one.two"], "zero")


def test_mean_z_checks():
    with pytest.raises(ValueError, match=r"\[n_layers, n_heads, d_head\]"):
        Ablation(["0.0"], "mean", mean_z=torch.zeros(4, 16))
    with pytest.raises(ValueError, match="out of range"):
        Ablation(["2.0"], "mean", mean_z=torch.zeros(2, 4, 16))
    mean_z = torch.zeros(2, 4, 16)
    mean_z[1, 3] = math.nan
    Ablation(["1.2"], "mean", mean_z=mean_z)
    with pytest.raises(ValueError, match="not finite for heads 1.3"):
        Ablation(["1.2", "1.3"], "mean", mean_z=mean_z)


def test_blocked_positions_checks():
    assert Ablation(["0.0"], "knockout", blocked_positions=range(5, 2, -1)).blocked_positions == (
        3,
        4,
        5,
    )
    with pytest.raises(ValueError, match="empty"):
        Ablation(["0.0"], "knockout", blocked_positions=[])
    with pytest.raises(ValueError, match=">= 0"):
        Ablation(["0.0"], "knockout", blocked_positions=[-1, 2])


def test_resample_needs_a_recording_with_decode_steps():
    with pytest.raises(ValueError, match="must be a RecordedZ"):
        Ablation(["0.0"], "resample", resample=torch.zeros(3))
    empty = RecordedZ([Head(0, 0)])
    with pytest.raises(ValueError, match="no decode steps"):
        Ablation(["0.0"], "resample", resample=empty)
    rec = RecordedZ([Head(0, 0), Head(0, 2)], decode={0: torch.zeros(1, 3, 2, 16)})
    assert rec.n_steps == 3 and rec.columns(0) == [0, 2]
    assert rec.z("0.2").shape == (1, 3, 16)
    Ablation(["0.2"], "resample", resample=rec)
