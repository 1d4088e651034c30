"""KV-cache what-if without a model: masks, shares, head choice, curves, exports."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from retrieval_heads import analysis, kvcache
from retrieval_heads.conditions import KVWindow
from retrieval_heads.interventions import window_mask
from retrieval_heads.kvcache import KVPolicy
from retrieval_heads.records import TrialRecord


@given(
    n_keys=st.integers(1, 40),
    data=st.data(),
    sink=st.integers(0, 8),
    window=st.integers(1, 50),
)
def test_window_mask_matches_its_definition(n_keys, data, sink, window):
    n_queries = data.draw(st.integers(1, n_keys))
    mask = window_mask(n_queries, n_keys, sink, window)
    assert mask.shape == (n_queries, n_keys)
    for i in range(n_queries):
        q = n_keys - n_queries + i
        for k in range(n_keys):
            assert bool(mask[i, k]) == (k < sink or q - window < k <= q or k > q)
        # Among the visible keys (k <= q), exactly min(q + 1, sink + window) survive.
        assert int(mask[i, : q + 1].sum()) == min(q + 1, sink + window)


def test_window_mask_rejects_nonsense():
    with pytest.raises(ValueError, match="window >= 1"):
        window_mask(1, 5, 0, 0)
    with pytest.raises(ValueError, match="cannot follow"):
        window_mask(6, 5, 0, 2)


def test_kv_share_by_hand():
    everything_windowed = KVPolicy(frozenset(), sink=4, window=60)
    assert everything_windowed.kv_share(8, 4, 1000) == pytest.approx(0.064)
    half = KVPolicy(frozenset((layer, 0) for layer in range(8)) | {(0, 1)}, 4, 60)
    # 9 of 32 KV heads full: (9 * 1000 + 23 * 64) / (32 * 1000)
    assert half.kv_share(8, 4, 1000) == pytest.approx((9000 + 23 * 64) / 32000)
    assert half.kv_share(8, 4, 50) == 1.0
    with pytest.raises(ValueError, match="outside the model"):
        KVPolicy(frozenset({(8, 0)})).kv_share(8, 4, 100)


def test_kv_share_with_sliding_window_layers_by_hand():
    """Gemma-style: layers 0 and 1 slide over 512 tokens, layer 2 is global; 1 KV head each.
    At 2000 tokens the model's own cache is 512 + 512 + 2000 = 3024 tokens."""
    windows = [512, 512, None]
    nothing = KVPolicy(frozenset(), sink=4, window=60)  # every head keeps 64
    assert nothing.kv_share(3, 1, 2000, windows) == pytest.approx(3 * 64 / 3024)
    only_global = KVPolicy(frozenset({(2, 0)}), sink=4, window=60)
    assert only_global.kv_share(3, 1, 2000, windows) == pytest.approx((64 + 64 + 2000) / 3024)
    all_full = KVPolicy(frozenset({(0, 0), (1, 0), (2, 0)}), sink=4, window=60)
    assert all_full.kv_share(3, 1, 2000, windows) == 1.0
    # without the windows the same policy would claim another share: the old, wrong count
    assert only_global.kv_share(3, 1, 2000) == pytest.approx((64 + 64 + 2000) / 6000)
    # a short prompt fits every window: nothing is saved
    assert nothing.kv_share(3, 1, 50, windows) == 1.0
    with pytest.raises(ValueError, match="3 layers"):
        nothing.kv_share(3, 1, 100, [512, None])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sink": -1}, "sink must be an integer >= 0"),
        ({"window": 0}, "window must be an integer >= 1"),
        ({"window": 2.5}, "window must be an integer >= 1"),
        ({"phase": "prefill"}, "unknown phase"),
    ],
)
def test_policy_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KVPolicy(frozenset(), **kwargs)


def test_kv_head_scores_reduce_each_group():
    table = np.array([[0.9, 0.1, 0.0, 0.2], [np.nan, 0.4, 0.6, 0.6]])
    assert kvcache.kv_head_scores(table, 2).tolist() == [[0.9, 0.2], [0.4, 0.6]]
    np.testing.assert_allclose(kvcache.kv_head_scores(table, 2, "mean"), [[0.5, 0.1], [0.2, 0.6]])
    assert kvcache.kv_head_scores(table, 4).tolist() == np.nan_to_num(table).tolist()
    with pytest.raises(ValueError, match="do not split"):
        kvcache.kv_head_scores(table, 3)
    with pytest.raises(ValueError, match="unknown reduction"):
        kvcache.kv_head_scores(table, 2, "median")


def test_top_and_random_kv_heads():
    kv = np.array([[0.1, 0.9], [0.9, 0.3]])
    assert kvcache.top_kv_heads(kv, 3) == [(0, 1), (1, 0), (1, 1)]  # tie: layer-major
    a = kvcache.random_kv_heads(4, 8, 5, seed=1, draw=0)
    assert a == kvcache.random_kv_heads(4, 8, 5, seed=1, draw=0)
    assert a != kvcache.random_kv_heads(4, 8, 5, seed=1, draw=1)
    assert len(set(a)) == 5 and a == sorted(a)
    # pinned: the stream of seeded_rng("kv-random", seed, draw, k); a numpy K draws the same
    assert kvcache.random_kv_heads(4, 8, 3, seed=1, draw=0) == [(0, 0), (2, 4), (3, 1)]
    assert kvcache.random_kv_heads(4, 8, np.int64(3), seed=1, draw=0) == [(0, 0), (2, 4), (3, 1)]
    with pytest.raises(ValueError, match="K must be an integer from 0"):
        kvcache.top_kv_heads(kv, 5)


def test_plan_has_baseline_top_random_and_uniform():
    kv = np.arange(8, dtype=float).reshape(2, 4) / 10
    plan = kvcache.plan_kv_conditions(kv, draws=2, sink=4, window=32)
    tags = [c.tag for c in plan]
    assert len(tags) == len(set(tags))
    assert plan[0].policy is None and plan[0].selection == "none"
    tops = [c for c in plan if c.selection == "top"]
    assert [c.k for c in tops] == [0, 1, 2, 4]
    assert tops[1].policy.full_kv_heads == {(1, 3)}
    assert sum(c.selection == "random" for c in plan) == 3 * 2
    windows = [c.policy.window for c in plan if c.selection == "uniform"]
    assert windows == [16, 64, 128, 256]  # 32 is top K=0 already
    assert all(not c.policy.full_kv_heads for c in plan if c.selection == "uniform")


def _record(selection, k, window, draw, passed, share, trial="t"):
    tag = f"{selection}|{k}|{window}|{draw}"
    full = "all" if selection == "none" else ()
    return TrialRecord(
        trial_id=f"{trial}|{tag}",
        params={"kv_share": share},
        condition=KVWindow(selection, k, draw, 4, window, "decode", full, tag),
        expected="x",
        generated_ids=[],
        generated_text="",
        passed=passed,
        recall=float(passed),
        reason=None,
        scores={},
        copy_events=[],
        n_layers=1,
        n_heads=1,
    )


def test_kv_curve_pools_draws_and_chooses_the_smallest_sufficient_k():
    records = [
        _record("none", 8, None, 0, True, 1.0),
        _record("none", 8, None, 0, True, 1.0, trial="u"),
        _record("top", 1, 32, 0, False, 0.2),
        _record("top", 1, 32, 0, True, 0.2, trial="u"),
        _record("top", 2, 32, 0, True, 0.3),
        _record("top", 2, 32, 0, True, 0.3, trial="u"),
        _record("top", 4, 32, 0, True, 0.5),
        _record("random", 2, 32, 0, False, 0.3),
        _record("random", 2, 32, 1, True, 0.3),
    ]
    curve = analysis.kv_curve(records)
    assert [p.selection for p in curve] == ["none", "top", "top", "top", "random"]
    random = curve[-1]
    assert (random.n_draws, random.accuracy) == (2, 0.5)
    assert random.accuracy_std == pytest.approx(np.std([0, 1], ddof=1))
    assert analysis.smallest_sufficient_k(curve).k == 2
    assert analysis.smallest_sufficient_k(curve, tolerance=0.5).k == 1
    assert analysis.baseline_accuracy(curve) == 1.0
    top1 = curve[1]  # 1 of 2 answers kept: 0.5 below the baseline
    assert not analysis.is_sufficient(top1, curve) and analysis.is_sufficient(top1, curve, 0.5)
    # none sufficient: the largest K is returned, and is_sufficient says it is not
    largest = analysis.smallest_sufficient_k(curve[:2])
    assert largest is top1 and not analysis.is_sufficient(largest, curve[:2])
    assert "KV share" in analysis.format_kv_curve(curve)
    with pytest.raises(ValueError, match="not a kv-sim record"):
        analysis.kv_curve([dataclasses.replace(records[0], condition=None)])


def test_export_is_duo_attention_layout_and_a_json_list(tmp_path):
    kv = np.array([[0.2, 1.3], [0.0, 0.7], [0.5, 0.1]])
    paths = kvcache.export_heads(
        tmp_path, [(0, 1), (1, 1)], kv, sink=4, window=64, group_size=2, info={"model": "m"}
    )
    full = np.loadtxt(paths["duo_tsv"], delimiter="\t")
    assert full.tolist() == [[0, 1], [0, 1], [0, 0]]
    assert json.loads(paths["duo_config"].read_text()) == {"sink_size": 4, "recent_size": 64}
    graded = np.loadtxt(paths["scores_tsv"], delimiter="\t")
    assert graded.tolist() == [[0.2, 1.0], [0.0, 0.7], [0.5, 0.1]]  # clipped to [0, 1]
    listing = json.loads(paths["json"].read_text())
    assert listing["full_attention_heads"] == [[0, 1], [1, 1]]
    assert listing["query_heads"] == ["0.2", "0.3", "1.2", "1.3"]
    assert listing["model"] == "m" and listing["window"] == 64


def test_window_mask_runs_on_the_scores_device():
    mask = window_mask(2, 6, 1, 2, device=torch.device("cpu"))
    assert mask.tolist() == [
        [True, False, False, True, True, True],  # query 4 keeps 0 and 3, 4 (5 is future)
        [True, False, False, False, True, True],
    ]
