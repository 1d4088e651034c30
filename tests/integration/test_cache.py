"""The in-place KV cache (``model/cache.py``) and the batched step statistics.

``GrowingLayer`` writes each step into a buffer with room to spare instead of concatenating
(which copies the whole cache at every step). It must hold exactly what ``DynamicLayer``
holds, after any sequence of updates, growths, crops and batch selections, and a decode with it
must give the logits and attention rows a decode with transformers' own cache gives.
``_BatchStepStats`` reduces a batch's rows at once; it must give each row exactly what one
trial's ``_StepStats`` gives.
"""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from retrieval_heads.model import cache as cache_module
from retrieval_heads.model.cache import GrowingLayer, growing_cache
from retrieval_heads.step_stats import _BatchStepStats, _StepStats

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _kv(batch, new, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, new, 4, generator=g), torch.randn(batch, 2, new, 3, generator=g)


def test_a_growing_layer_holds_what_a_dynamic_layer_holds(monkeypatch):
    monkeypatch.setattr(cache_module, "GROW_BY", 3)  # grow often
    growing, dynamic = GrowingLayer(), DynamicLayer()
    grown = 0
    for i, new in enumerate([5, 1, 1, 1, 4, 1, 2, 1, 1, 1, 7]):
        k, v = _kv(2 if i <= 8 else 1, new, i)  # one row left after the selection
        before = growing._key_buffer
        got, want = growing.update(k, v), dynamic.update(k, v)
        grown += before is not growing._key_buffer
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
        assert growing.get_seq_length() == dynamic.get_seq_length()
        if i == 6:  # a crop replaces keys from outside: the buffer must not come back stale
            growing.crop(-3)
            dynamic.crop(-3)
        if i == 8:
            growing.batch_select_indices(torch.tensor([1]))
            dynamic.batch_select_indices(torch.tensor([1]))
    assert torch.equal(growing.keys, dynamic.keys) and torch.equal(growing.values, dynamic.values)
    assert 2 < grown < 11, "it grew in steps of room, not at every update"
    assert growing._key_buffer is not None
    assert growing._key_buffer.shape[-2] - growing.get_seq_length() <= 3 + 7


def test_growing_cache_replaces_only_full_attention_layers(gemma3_gqa_model, llama_model):
    cache = growing_cache(gemma3_gqa_model.hf_model.config)
    kinds = {type(layer).__name__ for layer in cache.layers}
    assert kinds == {"GrowingLayer", "DynamicSlidingWindowLayer"}
    llama = growing_cache(llama_model.hf_model.config)
    assert llama.layers and all(type(layer) is GrowingLayer for layer in llama.layers)


MODELS = ["llama_model", "gqa_model", "gpt2_model", "gemma3_gqa_model"]


def _decode(model, ids, steps, lean):
    state = model.prefill(ids[:, :-1])
    token = ids[:, -1]
    seen = []
    for _ in range(steps):
        rows: dict = {}
        if lean:
            logits = model.step_rows(
                state, token, lambda layer, r, rows=rows: rows.update({layer: r})
            )
        else:
            logits = model.step(state, token)
        seen.append((logits, rows))
        token = logits.argmax(dim=-1)
    return seen


@pytest.mark.parametrize("fixture", MODELS)
@pytest.mark.parametrize("lean", [True, False])
def test_decoding_with_the_growing_cache_matches_transformers_cache(
    fixture, lean, request, random_ids, monkeypatch
):
    model = request.getfixturevalue(fixture)
    monkeypatch.setattr(cache_module, "GROW_BY", 2)  # several growths within the decode
    ids = random_ids(30, seed=3, batch=2)
    got = _decode(model, ids, 6, lean)
    monkeypatch.setattr(
        type(model), "_new_cache", lambda self: DynamicCache(config=self.hf_model.config)
    )
    want = _decode(model, ids, 6, lean)
    for (logits, rows), (want_logits, want_rows) in zip(got, want, strict=True):
        torch.testing.assert_close(logits, want_logits, atol=1e-6, rtol=1e-6)
        assert torch.equal(logits.argmax(-1), want_logits.argmax(-1))
        assert sorted(rows) == sorted(want_rows)
        for layer, row in rows.items():
            torch.testing.assert_close(row, want_rows[layer], atol=1e-7, rtol=1e-6)


def test_batched_step_stats_equal_each_trials_own():
    """Rows of several lengths (a sliding layer's are shorter), answers of several lengths,
    spans inside and outside a sliding row: each row's tables equal one trial's, exactly."""
    g = torch.Generator().manual_seed(0)
    n_layers, n_heads, first_query = 3, 4, 40
    spans = [(30, 33), (5, 7), (36, 39), (10, 13)]
    batch = _BatchStepStats(n_layers, n_heads, spans, first_query)
    single = [_StepStats(n_layers, n_heads, span, first_query) for span in spans]
    steps = 4
    for step in range(steps):
        batch.new_step(torch.device("cpu"))
        for s in single:
            s.new_step(torch.device("cpu"))
        for layer in range(n_layers):
            keys = first_query + step + 1 if layer != 1 else 8  # layer 1: a window of 8
            rows = torch.rand(len(spans), n_heads, keys, generator=g).softmax(-1)
            if layer != 1:
                rows[0, 0, 31] = 2.0  # an argmax inside a span
            batch.add(layer, rows)
            for b, s in enumerate(single):
                s.add(layer, rows[b].clone())
    for b, s in enumerate(single):
        s.flush()
        got = batch.trial(b, steps - b % 2)  # rows may have run fewer steps
        assert got.span == spans[b] and len(got.argmax) == steps - b % 2
        for name in ("argmax", "topk_mass", "span_mass"):
            for want, have in zip(getattr(s, name), getattr(got, name), strict=False):
                assert torch.equal(want, have), (b, name)
    assert int(batch.trial(0, steps).argmax[0][0, 0]) == 31
