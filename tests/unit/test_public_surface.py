"""The short public surface: ``import retrieval_heads as rh`` is all a notebook needs."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

import retrieval_heads as rh
from retrieval_heads import analysis, kvcache
from retrieval_heads.records import TrialRecord
from retrieval_heads.scores import HeadScores, group_kv_heads


@pytest.mark.parametrize("name", rh.__all__)
def test_every_public_name_resolves(name):
    # Each name is the very object its module defines (the lazy import hands out the real thing).
    target = rh._LAZY.get(name, ("retrieval_heads.heads", name))
    module, attr = (target, name) if isinstance(target, str) else target
    if name == "__version__":
        assert re.fullmatch(r"\d+\.\d+\.\d+", rh.__version__)
    else:
        assert getattr(rh, name) is getattr(importlib.import_module(module), attr)
    assert name in dir(rh)


def test_import_does_not_import_torch():
    code = "import retrieval_heads, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kv_simulate_is_kvcache_simulate_and_k_sweep_runs_one():
    from retrieval_heads import causal

    assert rh.kv_simulate is kvcache.simulate
    assert rh.k_sweep is causal.k_sweep
    assert rh.summarise_k_sweep is analysis.summarise_k_sweep


def test_get_act_name_in_transformer_lens_order():
    assert rh.get_act_name("pattern", 3) == "blocks.3.attn.hook_pattern"
    assert rh.get_act_name("resid_pre", 0) == "blocks.0.hook_resid_pre"
    assert rh.get_act_name("attn", 1) == "blocks.1.attn.hook_pattern"  # TL's alias


def test_get_act_name_matches_hook_name(tiny_model):
    for layer in range(tiny_model.n_layers):
        for name in ("pattern", "attn_scores", "q", "k", "v", "z"):
            assert rh.get_act_name(name, layer) == tiny_model.hook_name(layer, name)
    assert rh.get_act_name("resid_pre", 0) in tiny_model._hook_names


def test_analysis_k_sweep_is_a_deprecated_alias():
    records = [
        TrialRecord(
            trial_id=f"t{i}",
            params={"k": 2, "selection": "top"},
            expected="x",
            generated_ids=[],
            generated_text="x",
            passed=bool(i % 2),
            recall=0.5,
            reason=None,
            scores={},
            copy_events=[],
            n_layers=1,
            n_heads=1,
        )
        for i in range(4)
    ]
    with pytest.warns(DeprecationWarning, match="summarise_k_sweep"):
        old = analysis.k_sweep(records)
    assert old == analysis.summarise_k_sweep(records)


# -- one implementation of query-head -> KV-head aggregation, two NaN policies ---------------

TABLE = np.array([[0.9, np.nan, np.nan, np.nan], [np.nan, 0.4, 0.6, 0.2]])


def test_headscores_kv_heads_ignores_nan():
    hs = HeadScores(TABLE[None])
    got = hs.kv_heads(2)
    np.testing.assert_allclose(got, [[0.9, np.nan], [0.4, 0.6]])  # NaN: a whole group unscored
    np.testing.assert_allclose(hs.kv_heads(2, how="mean"), [[0.9, np.nan], [0.4, 0.4]])
    np.testing.assert_array_equal(got, group_kv_heads(TABLE, 2, "max", nan="ignore"))


def test_kvcache_kv_head_scores_counts_nan_as_zero():
    got = kvcache.kv_head_scores(TABLE, 2)
    assert got.tolist() == [[0.9, 0.0], [0.4, 0.6]]  # never NaN: every KV head is rankable
    np.testing.assert_allclose(kvcache.kv_head_scores(TABLE, 2, "mean"), [[0.45, 0.0], [0.2, 0.4]])
    np.testing.assert_array_equal(got, group_kv_heads(TABLE, 2, "max", nan="zero"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group_kv_heads(TABLE, 2, nan="ignore")  # an all-NaN group warns nothing
    with pytest.raises(ValueError, match="NaN policy"):
        group_kv_heads(TABLE, 2, nan="drop")  # type: ignore[arg-type]


# -- a notebook session through rh. alone ------------------------------------------------------


def test_notebook_flow_through_rh_only(tmp_path):
    model = rh.load_model("tiny")
    trials = rh.make_trials(model, lengths=[150], depths=[0, 100], n_needles=2)
    scores = rh.detect(model, trials, out=tmp_path / "run")
    assert isinstance(scores, rh.HeadScores)
    top = rh.top_heads(scores, 2)
    assert top == scores.top(2) and all(isinstance(h, rh.Head) for h in top)
    ablation = rh.UniformAblation(top)
    assert isinstance(ablation, rh.Intervention)
    masked = rh.detect(model, trials, intervention=ablation, require_pass=False)
    # Same trials scored; under uniform attention the ablated heads no longer retrieve.
    assert isinstance(masked, rh.HeadScores) and masked.trial_ids == scores.trial_ids
    for h in top:
        assert scores.mean[h.layer, h.head] > 0 and masked.mean[h.layer, h.head] == 0, h
    meta, loaded, records = rh.load_results(tmp_path / "run")
    assert isinstance(loaded, rh.HeadScores) and all(isinstance(r, rh.TrialRecord) for r in records)
    np.testing.assert_allclose(loaded.mean, scores.mean, equal_nan=True)
    fig = rh.score_heatmap(loaded)
    assert type(fig).__name__ == "Figure"


def test_no_submodule_shadows_a_public_name():
    """Importing ``retrieval_heads.X`` sets the package's attribute ``X`` to that module, so a
    public name that is also a submodule's name turns into the module once anything imports it."""
    import importlib.util

    import retrieval_heads as rh

    clashes = [n for n in rh.__all__ if importlib.util.find_spec(f"retrieval_heads.{n}")]
    assert clashes == []
