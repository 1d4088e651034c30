"""KV-cache what-if on tiny models: windowed heads, exactness, GQA shares, the sweep and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from support import subprocess_env

from retrieval_heads import kvcache
from retrieval_heads.interventions import window_hooks, window_mask
from retrieval_heads.kvcache import KVPolicy
from retrieval_heads.scoring import DecodeConfig, detect, score_trial
from retrieval_heads.store import load_results
from retrieval_heads.tiny.trials import tiny_grid

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 24  # prompt length of the mask tests


def patterns(model, ids, hooks_for_step, prefill_hooks=()):
    """Prefill all but the last token, decode it; every layer's pattern row of that step."""
    store = {}

    def make(layer):
        def fn(pattern, hook):
            store[layer] = pattern[0, :, -1].detach().clone()  # [head, key]

        return fn

    record = [(model.hook_name(layer, "pattern"), make(layer)) for layer in range(model.n_layers)]
    state = model.prefill(ids[:, :-1], fwd_hooks=list(prefill_hooks))
    logits = model.step(state, ids[:, -1], fwd_hooks=[*hooks_for_step, *record])
    return store, logits


@pytest.mark.parametrize("phase", ["decode", "all"])
def test_a_window_covering_the_context_is_the_unmodified_model_exactly(
    any_model, random_ids, phase
):
    m = any_model
    ids = random_ids(N, seed=3)
    # Hooks in the prefill send it through the bridge instead of the fast kernel (equal to
    # ~1e-7, not bitwise): the unmodified run takes the same path through a hook that does
    # nothing, so "exactly" can mean bitwise.
    same_path = [(m.hook_name(0, "attn_scores"), lambda scores, hook: None)]
    base, base_logits = patterns(m, ids, [], same_path if phase == "all" else ())
    covering = KVPolicy(frozenset(), sink=0, window=N, phase=phase)  # every head windowed
    prefill, decode = covering.hooks(m)
    assert decode and (bool(prefill) == (phase == "all"))
    got, logits = patterns(m, ids, decode, prefill)
    assert torch.equal(logits, base_logits)
    for layer in range(m.n_layers):
        assert torch.equal(got[layer], base[layer])
    # One token short of the context and the oldest key is gone: the boundary is tight.
    short = KVPolicy(frozenset(), sink=0, window=N - 1, phase=phase)
    prefill, decode = short.hooks(m)
    got, logits = patterns(m, ids, decode, prefill)
    assert not torch.equal(logits, base_logits)
    assert got[0][:, 0].abs().max() == 0


def test_masks_touch_only_the_windowed_heads(gqa_model, random_ids):
    """Window KV head 0 of layer 1 (query heads 1.0 and 1.1): layer 0 and heads 1.2, 1.3 keep
    their exact patterns; the windowed rows are the old rows renormalised over sink + window."""
    m = gqa_model
    assert (m.n_layers, m.n_heads, m.n_kv_heads) == (2, 4, 2)
    ids = random_ids(N, seed=4)
    sink, window = 2, 5
    full = {(0, 0), (0, 1), (1, 1)}
    policy = KVPolicy(frozenset(full), sink=sink, window=window)
    assert policy.windowed_query_heads(m) == [(1, 0), (1, 1)]
    base, _ = patterns(m, ids, [])
    got, _ = patterns(m, ids, policy.hooks(m)[1])
    assert torch.equal(got[0], base[0])
    assert torch.equal(got[1][2:], base[1][2:])
    keep = window_mask(1, N, sink, window)[0]  # [key]
    assert keep.sum() == sink + window
    for head in (0, 1):
        old, new = base[1][head], got[1][head]
        assert new[~keep].abs().max() == 0
        torch.testing.assert_close(new, old * keep / (old * keep).sum(), atol=1e-6, rtol=0)


def test_window_hooks_in_prefill_chunks_use_absolute_positions(
    llama_model, random_ids, monkeypatch
):
    """A chunked hooked prefill windows each query by its own position, as one pass would."""
    m = llama_model
    ids = random_ids(N, seed=5)
    hooks = window_hooks(m, ["1.2"], sink=1, window=4)
    rows = {}

    def grab(pattern, hook):
        rows.setdefault("chunks", []).append(pattern[0, 2].detach().clone())

    monkeypatch.setattr(m, "chunk_size", 7)
    m.prefill(ids, fwd_hooks=[*hooks, (m.hook_name(1, "pattern"), grab)])
    n_keys = 0
    for chunk in rows["chunks"]:  # [query, keys so far]
        n_keys += chunk.shape[0]
        keep = window_mask(chunk.shape[0], n_keys, 1, 4)
        assert chunk[~keep].abs().max() == 0
        torch.testing.assert_close(chunk.sum(-1), torch.ones(chunk.shape[0]), atol=1e-6, rtol=0)
    assert n_keys == N


def test_windows_in_sliding_window_layers_use_absolute_positions(gemma3_model, random_ids):
    """A sliding-window layer's cache holds only its last keys, so a row's index is not a
    position: masks must be laid on absolute positions (layers 0 and 2 slide over 8 tokens,
    layer 1 is global; the prompt is 24 tokens)."""
    m = gemma3_model
    assert m.layer_windows() == [8, None, 8]
    ids = random_ids(N, seed=6)
    base, base_logits = patterns(m, ids, [])
    assert base[0].shape[-1] < N == base[1].shape[-1]
    # A recent window as long as the sliding one hides nothing the sliding layers could see.
    same = KVPolicy(frozenset({(1, 0)}), sink=0, window=8)
    got, logits = patterns(m, ids, same.hooks(m)[1])
    assert torch.equal(logits, base_logits)
    assert all(torch.equal(got[layer], base[layer]) for layer in range(3))
    # Sink 2 + window 3 everywhere: the sink is long gone from a sliding layer's cache, so its
    # rows keep exactly the last 3 keys; the global layer keeps positions 0, 1 and 21-23.
    small = KVPolicy(frozenset(), sink=2, window=3)
    got, _ = patterns(m, ids, small.hooks(m)[1])
    for layer in (0, 2):
        row = got[layer]  # [head, keys]
        assert (row[:, :-3] == 0).all() and (row[:, -3:] > 0).all()
    kept = (got[1] > 0).nonzero()[:, 1].unique().tolist()
    assert kept == [0, 1, 21, 22, 23]


def test_kv_share_counts_kv_heads_under_gqa(gqa_model):
    m = gqa_model
    policy = KVPolicy(frozenset({(1, 0)}), sink=4, window=16)
    # 4 KV heads (2 layers x 2), one full: (100 + 3 * 20) / (4 * 100).
    assert policy.kv_share(m.n_layers, m.n_kv_heads, 100) == pytest.approx(0.4)
    assert policy.kv_share(m.n_layers, m.n_kv_heads, 10) == 1.0  # the window holds it all
    # Two query heads of one group are one KV head: the group is kept whole.
    scores = np.zeros((2, 4))
    scores[1, 0] = scores[1, 1] = 0.9
    kv = kvcache.kv_head_scores(scores, m.n_kv_heads)
    assert kvcache.top_kv_heads(kv, 1) == [(1, 0)]


@pytest.fixture(scope="module")
def tiny_sweep(tiny_model, tmp_path_factory):
    trials = tiny_grid(tiny_model.tokenizer, lengths=[300], depths=[0, 100], n_needles=1)
    scores = detect(tiny_model, trials)
    out = tmp_path_factory.mktemp("kv") / "sim"
    sweep = kvcache.simulate(
        tiny_model,
        trials,
        scores,
        ks=[0, 3],
        draws=1,
        sink=4,
        window=16,
        uniform_windows=[16],
        out=out,
    )
    return tiny_model, trials, scores, out, sweep


def test_simulate_records_shares_and_resumes(tiny_sweep):
    model, trials, scores, out, sweep = tiny_sweep
    # baseline, top K=0 (= uniform 4+16), top K=3, random K=3
    assert len(sweep.records) == 4 * len(trials)
    by_tag = {r.condition.tag: r for r in sweep.records}
    top3 = next(r for r in sweep.records if (r.condition.selection, r.condition.k) == ("top", 3))
    length = len(trials[0].input_ids)
    assert top3.params["kv_share"] == pytest.approx(
        (3 * length + 29 * 20) / (32 * length), abs=1e-6
    )
    assert by_tag["kv:none"].params["kv_share"] == 1.0
    meta, _, records = load_results(out)
    assert meta["kind"] == "kv-sim" and len(records) == len(sweep.records)
    # A rerun finds everything done: no trial is run twice, the results do not change (only
    # meta.json notes the resumption).
    files = ("trials.jsonl", "head_scores.json")
    before = [(out / name).read_bytes() for name in files]
    again = kvcache.simulate(
        model, trials, scores, ks=[0, 3], draws=1, sink=4, window=16, uniform_windows=[16], out=out
    )
    assert [r.trial_id for r in again.records] == [r.trial_id for r in sweep.records]
    assert [(out / name).read_bytes() for name in files] == before


def test_the_baseline_condition_is_the_plain_scorer(tiny_sweep):
    model, trials, _, _, sweep = tiny_sweep
    plain = score_trial(model, trials[0], DecodeConfig())
    base = next(r for r in sweep.records if r.trial_id == f"{trials[0].trial_id}|kv:none")
    assert base.generated_ids == plain.generated_ids
    assert base.scores == plain.scores


def test_kv_sim_cli_writes_curve_exports_and_report(tiny_sweep, tmp_path):
    model, trials, scores, out, _ = tiny_sweep
    detect_dir = tmp_path / "detect"
    detect(model, trials, out=detect_dir)
    sim = tmp_path / "sim"
    args = [
        sys.executable, "-m", "retrieval_heads", "kv-sim", "--model", "tiny",
        "--scores", str(detect_dir), "--out", str(sim), "--lengths", "300", "--depths", "0,100",
        "--n-needles", "1", "--top-k", "0,3", "--random", "1", "--window", "16",
        "--uniform-windows", "16",
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 0, done.stderr
    assert "KV share" in done.stdout and "full_attention_heads.json" in done.stdout
    listing = json.loads((sim / "full_attention_heads.json").read_text())
    table = np.loadtxt(sim / "duo_attention" / "full_attention_heads.tsv", delimiter="\t")
    assert table.shape == (model.n_layers, model.n_kv_heads)
    assert sorted(map(tuple, np.argwhere(table == 1).tolist())) == sorted(
        map(tuple, listing["full_attention_heads"])
    )
    config = json.loads((sim / "duo_attention" / "config.json").read_text())
    assert config == {"sink_size": 4, "recent_size": 16}
    graded = np.loadtxt(sim / "kv_head_scores.tsv", delimiter="\t")
    assert graded.shape == table.shape and 0 <= graded.min() and graded.max() <= 1
    # The report draws the curve.
    report = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "retrieval_heads", "report", str(sim), "--out", str(report)],
        capture_output=True, text=True, env=subprocess_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    html = report.read_text()
    assert "KV share" in html and "kv-curve" in html


def test_kv_sim_cli_refuses_scores_of_another_shape(tmp_path):
    bad = tmp_path / "scores.json"
    bad.write_text(json.dumps({"0-0": [0.5], "0-1": [0.1]}))
    done = subprocess.run(
        [sys.executable, "-m", "retrieval_heads", "kv-sim", "--scores", str(bad),
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=subprocess_env(),
    )  # fmt: skip
    assert done.returncode == 2
    assert "detect on this model first" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()
