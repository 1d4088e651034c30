"""The lean decode step (``HookedModel.step_rows``) against the bridge's hooked step.

``step_rows`` runs a decode step through the SDPA twin with an attention function that hands
each layer's attention row to a sink, without the bridge and without copying the KV cache per
query head. It must give exactly what ``step`` with ``hook_pattern`` hooks gives: the same rows
(same argmax everywhere, probabilities within float32 rounding), the same logits and tokens,
and through ``score_trial`` the same record. Checked on Llama (no GQA), Qwen2 (GQA, q/k/v
biases), GPT-2 (fused QKV), Gemma 3 (GQA, sliding-window and global layers, a prompt longer
than the window) and the shipped ``tiny`` model.
"""

from __future__ import annotations

import pytest
import torch

from retrieval_heads.scoring import DecodeConfig, _StepStats, score_trial
from retrieval_heads.trials.builder import build_trial
from retrieval_heads.trials.haystacks import Haystack
from retrieval_heads.trials.needles import Needle
from retrieval_heads.trials.template import PromptTemplate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOW = 8


MODELS = ["llama_model", "gqa_model", "gpt2_model", "gemma3_gqa_model"]


def pattern_keeper(rows, layer):
    def hook(pattern, hook):  # [batch, head, query, key]
        rows[layer] = pattern[:, :, -1]

    return hook


def decode_both(model, ids, steps):
    """Greedy decode ``steps`` tokens after prefilling ``ids[:, :-1]``, once through the
    bridge with ``hook_pattern`` hooks and once through ``step_rows``: per step, the rows
    ``{layer: [batch, head, key]}`` and the logits of each path."""
    assert model.lean_decode, model.lean_decode_reason
    out = {}
    for path in ("bridge", "lean"):
        state = model.prefill(ids[:, :-1])
        token = ids[:, -1]
        steps_seen = []
        for _ in range(steps):
            rows: dict = {}
            if path == "lean":
                logits = model.step_rows(
                    state, token, lambda layer, row, rows=rows: rows.update({layer: row})
                )
            else:
                hooks = [
                    (model.hook_name(layer, "pattern"), pattern_keeper(rows, layer))
                    for layer in range(model.n_layers)
                ]
                logits = model.step(state, token, fwd_hooks=hooks)
            steps_seen.append((rows, logits))
            token = logits.argmax(dim=-1)
        out[path] = steps_seen
        assert state.position == ids.shape[1] + steps - 1
        assert state.cache.get_seq_length() == state.position
    return out["bridge"], out["lean"]


@pytest.mark.parametrize("fixture", MODELS)
def test_lean_rows_equal_the_bridge_pattern_rows(fixture, request, random_ids):
    model = request.getfixturevalue(fixture)
    prompt = 3 * WINDOW  # longer than Gemma's window
    ids = random_ids(prompt, seed=5)
    bridge, lean = decode_both(model, ids, steps=5)
    windows = model.layer_windows()
    for step, ((want, want_logits), (got, got_logits)) in enumerate(zip(bridge, lean, strict=True)):
        assert sorted(got) == sorted(want) == list(range(model.n_layers))
        query = prompt - 1 + step
        for layer in range(model.n_layers):
            # Full attention: every key up to the query; sliding: the window only.
            keys = query + 1 if windows[layer] is None else min(windows[layer], query + 1)
            assert got[layer].shape == want[layer].shape == (1, model.n_heads, keys), layer
            torch.testing.assert_close(got[layer], want[layer], atol=1e-5, rtol=0)
            assert torch.equal(got[layer].argmax(-1), want[layer].argmax(-1)), (step, layer)
        torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(got_logits.argmax(-1), want_logits.argmax(-1)), step
    if fixture == "gemma3_gqa_model":
        assert {w for w in windows} == {WINDOW, None}, "both kinds of layer are checked"


def test_lean_rows_on_a_batch(gqa_model, random_ids):
    ids = random_ids(40, seed=9, batch=2)
    bridge, lean = decode_both(gqa_model, ids, steps=3)
    for (want, want_logits), (got, got_logits) in zip(bridge, lean, strict=True):
        for layer in want:
            assert got[layer].shape[0] == 2
            torch.testing.assert_close(got[layer], want[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)


def test_the_lean_step_switches_only_the_twin_and_only_during_the_step(gqa_model, random_ids):
    bridge_impl = gqa_model.hf_model.config._attn_implementation
    state = gqa_model.prefill(random_ids(16, seed=2))
    seen = []

    def sink(layer, row):
        seen.append(gqa_model._fast.config._attn_implementation)

    gqa_model.step_rows(state, torch.tensor([10]), sink)
    assert seen and set(seen) == {"retrieval_heads_rows"}
    assert gqa_model._fast.config._attn_implementation == "sdpa"
    assert gqa_model.hf_model.config._attn_implementation == bridge_impl


def test_hooks_or_no_twin_turn_the_lean_step_off(llama_model, random_ids):
    from retrieval_heads.model import HookedModel

    assert llama_model.lean_decode
    with llama_model.hooks([(llama_model.hook_name(0, "pattern"), lambda a, hook: None)]):
        assert not llama_model.lean_decode  # the hook would not fire in the twin
    assert llama_model.lean_decode
    slow = HookedModel(llama_model.bridge, fast_prefill=False)
    assert not slow.lean_decode and slow.lean_decode_reason
    state = slow.prefill(random_ids(8))
    with pytest.raises(RuntimeError, match="step_rows cannot run"):
        slow.step_rows(state, torch.tensor([10]), lambda layer, row: None)


# --------------------------------------------------------------------------------------------
# score_trial: the lean path gives the record of the bridge path


def assert_same_record(lean, bridge):
    assert lean.generated_ids == bridge.generated_ids
    assert lean.copy_events == bridge.copy_events
    assert lean.scores["retrieval"] == bridge.scores["retrieval"]
    for name in ("topk", "attention_mass"):
        torch.testing.assert_close(
            torch.tensor(lean.scores[name]), torch.tensor(bridge.scores[name]), atol=1e-5, rtol=0
        )
    assert (lean.passed, lean.generated_text) == (bridge.passed, bridge.generated_text)


def count_calls(monkeypatch, model):
    calls = {"step": 0, "step_rows": 0}
    for name in calls:
        original = getattr(model, name)

        def wrapper(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(model, name, wrapper)
    return calls


def test_score_trial_lean_equals_bridge_on_the_shipped_model(tiny_model, tiny_trials, monkeypatch):
    assert tiny_model.lean_decode  # probed once, through the bridge, before the counting
    calls = count_calls(monkeypatch, tiny_model)
    events = 0
    for trial in (tiny_trials[1], tiny_trials[4]):  # both lengths
        lean = score_trial(tiny_model, trial)  # the default when no decode hook is given
        assert calls["step"] == 0 and calls["step_rows"] > 0
        bridge = score_trial(tiny_model, trial, lean=False)
        assert calls["step"] == len(bridge.generated_ids) + (bridge.params["stopped_by"] == "stop")
        calls.update(step=0, step_rows=0)
        assert_same_record(lean, bridge)
        assert lean.passed
        events += len(lean.copy_events)
    assert events > 0, "the trained model copies: the events are compared, not just empty lists"


def gqa_trial(tokenizer, length=96, depth=40):
    words = [f"w{i}" for i in range(100)]
    haystack = Haystack.from_strings([" ".join(words[i : i + 9]) for i in range(0, 90, 9)])
    needle = Needle("n", "w1 w2 w3 w97 w98 w99", "w4 w5 w6", "w97 w98 w99")
    return build_trial(
        tokenizer,
        haystack,
        needle,
        length=length,
        depth_percent=depth,
        template=PromptTemplate(text="{context} {question}"),
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fixture", ["gqa_model", "gemma3_gqa_model"])
def test_score_trial_lean_equals_bridge_on_random_models(fixture, request, word_tokenizer):
    model = request.getfixturevalue(fixture)
    trial = gqa_trial(word_tokenizer)
    config = DecodeConfig(max_new_tokens=8, stop_at_eos=False, stop_strings=())
    lean = score_trial(model, trial, config, lean=True)
    bridge = score_trial(model, trial, config, lean=False)
    assert len(lean.generated_ids) == 8
    assert_same_record(lean, bridge)


def test_decode_hooks_keep_the_bridge(tiny_model, tiny_trials, monkeypatch):
    assert tiny_model.lean_decode
    calls = count_calls(monkeypatch, tiny_model)
    fired = []

    def hooks(_trial):
        return [], [(tiny_model.hook_name(0, "z"), lambda z, hook: fired.append(1))]

    score_trial(tiny_model, tiny_trials[0], DecodeConfig(max_new_tokens=3), hooks=hooks)
    assert calls["step_rows"] == 0 and calls["step"] > 0 and fired
    with pytest.raises(ValueError, match="need the bridge"):
        score_trial(tiny_model, tiny_trials[0], hooks=hooks, lean=True)


# --------------------------------------------------------------------------------------------
# Sliding-window rows are scored at their absolute key positions


def test_step_stats_shift_a_sliding_window_row_to_absolute_positions():
    # Query at position 20, a window of 8 keys: positions 13..20. Span [14, 17).
    stats = _StepStats(n_layers=2, n_heads=1, span=(14, 17), first_query=20)
    stats.new_step(torch.device("cpu"))
    window = torch.tensor([[0.0, 0.1, 0.5, 0.2, 0.0, 0.0, 0.0, 0.2]])  # [head, 8 keys]
    full = torch.zeros(1, 21)
    full[0, 13:] = window[0]  # the same attention over the whole context
    stats.add(0, window)
    stats.add(1, full)
    stats.flush()
    assert stats.argmax[0].tolist() == [[15], [15]]
    torch.testing.assert_close(stats.span_mass[0], torch.full((2, 1), 0.8))
    torch.testing.assert_close(stats.topk_mass[0], torch.full((2, 1), 0.7))  # top 3: .5 .2 .2


def test_gemma_scores_equal_full_attention_patterns(gemma3_gqa_model, word_tokenizer):
    """Span and top-k mass of sliding layers, from window-long rows, equal those read off the
    full ``[query, key]`` patterns of one forward over prompt + answer."""
    model = gemma3_gqa_model
    trial = gqa_trial(word_tokenizer, length=48, depth=100)
    start, end = trial.answer_span
    # Inside the window of the first query, far from key 0: a sliding layer's row (WINDOW
    # keys) read at absolute positions would miss the span.
    assert trial.context_length - WINDOW <= start and end > WINDOW
    config = DecodeConfig(max_new_tokens=4, stop_at_eos=False, stop_strings=())
    record = score_trial(model, trial, config)
    ids = list(trial.input_ids) + record.generated_ids
    _, cache = model.bridge.run_with_cache(
        torch.tensor(ids[:-1])[None], names_filter=lambda n: n.endswith("hook_pattern")
    )
    queries = range(trial.context_length - 1, len(ids) - 1)
    for layer in range(model.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # [head, query, key]
        rows = pattern[:, list(queries)]  # [head, step, key]
        mass = rows[..., start:end].sum(-1).mean(-1)
        values, index = rows.topk(end - start, dim=-1)
        topk = (values * ((index >= start) & (index < end))).sum(-1).mean(-1)
        torch.testing.assert_close(torch.tensor(record.scores["attention_mass"][layer]), mass)
        torch.testing.assert_close(torch.tensor(record.scores["topk"][layer]), topk)
        if layer == 0:
            assert mass.max() > 0.01, "the sliding layer attends to the span: the check bites"


def test_attention_rows_of_sliding_layers_sit_at_absolute_positions(gemma3_gqa_model, random_ids):
    """``attention_rows`` (the views' rows) puts a sliding layer's window-long rows at the
    positions they cover: equal to one full forward's ``[query, key]`` patterns."""
    model = gemma3_gqa_model
    ids = random_ids(40, seed=9)
    queries = [20, 39]
    rows = model.attention_rows(ids[0], queries)  # [layer, head, query, key]
    _, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    for layer in range(model.n_layers):
        full = cache[f"blocks.{layer}.attn.hook_pattern"][0][:, queries]  # [head, query, key]
        torch.testing.assert_close(rows[layer], full.float(), atol=1e-5, rtol=0)
    assert rows[0, :, 1, : 40 - WINDOW].abs().max() == 0  # a sliding layer: the window only
    assert rows[1, :, 1, : 40 - WINDOW].abs().max() > 0  # a global layer sees it all
