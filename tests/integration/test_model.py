"""HookedModel on tiny random models (Llama, Qwen2 with GQA, GPT-2): loading, hooks, decoding."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch

from retrieval_heads import Head, load_model, registry
from retrieval_heads.model import ContextLengthError, HookedModel, ModelLoadError

ATOL = 1e-4  # float32
MODEL_FIXTURES = {"llama": "llama_model", "gqa": "gqa_model", "gpt2": "gpt2_model"}
DIR_FIXTURES = {"llama": "tiny_llama_dir", "gqa": "tiny_gqa_dir", "gpt2": "tiny_gpt2_dir"}


def full_cache(model: HookedModel, ids: torch.Tensor, suffixes: tuple[str, ...]):
    """Reference activations: one bridge.run_with_cache over the whole sequence."""
    _, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith(suffixes))
    return cache


# ---- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, n_kv",
    [("llama", 4), ("gqa", 2), ("gpt2", 4)],
)
def test_loaded_by_directory_has_config_shape(request, kind, n_kv):
    model = request.getfixturevalue(MODEL_FIXTURES[kind])
    assert (model.n_layers, model.n_heads, model.n_kv_heads, model.d_head, model.d_model) == (
        2,
        4,
        n_kv,
        16,
        64,
    )
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.fast_prefill, model.fast_prefill_reason
    assert model.heads() == [Head(layer, h) for layer in range(2) for h in range(4)]


def test_loading_a_directory_makes_no_network_call(tiny_llama_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("load_model tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    model = load_model(str(tiny_llama_dir), device="cpu")
    assert model.n_layers == 2


def test_tokenizer_is_the_saved_one(any_model, word_tokenizer):
    """Qwen2's AutoTokenizer would swap in Qwen2Tokenizer and mis-tokenize the word vocab."""
    text = "the key is w7 w42"
    ids = any_model.to_tokens(text, prepend_bos=False)
    assert ids[0].tolist() == word_tokenizer(text)["input_ids"]
    assert any_model.to_str_tokens(ids) == text.split()
    assert any_model.to_string(ids[0]) == text


@pytest.mark.parametrize("kind", list(DIR_FIXTURES))
def test_load_by_object_matches_load_by_directory(request, kind, word_tokenizer, random_ids):
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(DIR_FIXTURES[kind])
    by_dir = request.getfixturevalue(MODEL_FIXTURES[kind])
    hf = AutoModelForCausalLM.from_pretrained(path)
    by_obj = load_model(hf, tokenizer=word_tokenizer)
    assert isinstance(by_obj, HookedModel) and by_obj.hf_model is hf
    ids = random_ids(12, seed=3)
    torch.testing.assert_close(by_obj.logits(ids), by_dir.logits(ids), atol=ATOL, rtol=0)


def test_registry_name_resolves_to_package_dir(tiny_llama_dir, tmp_path, monkeypatch):
    target = tmp_path / registry.MODELS["tiny"].package_path
    shutil.copytree(tiny_llama_dir, target)
    monkeypatch.setattr(registry, "PACKAGE_DIR", tmp_path)
    assert registry.resolve("tiny") == target
    assert load_model("tiny", device="cpu").n_layers == 2


# ---- errors ---------------------------------------------------------------------------------


def test_error_hub_name_not_available_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="offline"):
        load_model("retrieval-heads-tests/no-such-model-anywhere", device="cpu")


def test_error_registry_model_not_built(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "PACKAGE_DIR", tmp_path)
    with pytest.raises(ModelLoadError, match="make train-tiny"):
        load_model("tiny")
    with pytest.raises(ModelLoadError, match="make train-tiny"):
        load_model("tiny-short")


def test_error_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)


def test_error_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model(str(tmp_path / "nowhere" / "model"))


def test_error_unsupported_architecture(tmp_path):
    from transformers import BioGptConfig

    config = BioGptConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    config.architectures = ["BioGptForCausalLM"]
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="BioGptForCausalLM") as info:
        load_model(tmp_path)
    assert "supported_architectures" in str(info.value)


def test_error_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-type"}))
    with pytest.raises(ModelLoadError):
        load_model(tmp_path)


def test_error_object_without_tokenizer():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2,
    )  # fmt: skip
    with pytest.raises(ModelLoadError, match="tokenizer="):
        load_model(LlamaForCausalLM(config))


def test_error_prompt_longer_than_n_ctx(tiny_llama_dir, random_ids):
    model = load_model(tiny_llama_dir, device="cpu", n_ctx=16)
    assert model.n_ctx == 16
    with pytest.raises(ContextLengthError, match="n_ctx"):
        model.prefill(random_ids(17))
    state = model.prefill(random_ids(16))
    with pytest.raises(ContextLengthError, match="n_ctx"):
        model.step(state, torch.tensor([FIRST_ID]))


FIRST_ID = 20


def test_error_n_ctx_beyond_learned_positions(tiny_gpt2_dir):
    with pytest.raises(ModelLoadError, match="learned positions"):
        load_model(tiny_gpt2_dir, device="cpu", n_ctx=257)


# ---- heads and hooks --------------------------------------------------------------------------


def test_hook_names_and_shapes(any_model, random_ids):
    m = any_model
    names = [m.hook_name(1, n) for n in ("q", "k", "v", "z", "attn_scores", "pattern", "result")]
    assert names[0] == "blocks.1.attn.hook_q" and m.hook_name(0, "hook_z") == "blocks.0.attn.hook_z"
    with pytest.raises(ValueError, match="attention hooks"):
        m.hook_name(0, "no_such_hook")
    ids = random_ids(10, seed=1)
    cache = full_cache(m, ids, ("hook_q", "hook_k", "hook_v", "hook_z", "scores", "pattern"))
    b, p, h, kv, d = 1, 10, m.n_heads, m.n_kv_heads, m.d_head
    assert cache["blocks.1.attn.hook_q"].shape == (b, p, h, d)
    assert cache["blocks.1.attn.hook_k"].shape == (b, p, kv, d)  # kv heads, not expanded
    assert cache["blocks.1.attn.hook_v"].shape == (b, p, kv, d)
    assert cache["blocks.1.attn.hook_z"].shape == (b, p, h, d)
    assert cache["blocks.1.attn.hook_attn_scores"].shape == (b, h, p, p)
    assert cache["blocks.1.attn.hook_pattern"].shape == (b, h, p, p)


def test_check_head(any_model):
    assert any_model.check_head("1.3") == Head(1, 3)
    assert any_model.check_head("L0H2") == Head(0, 2)
    with pytest.raises(ValueError, match="out of range"):
        any_model.check_head("2.0")
    with pytest.raises(ValueError, match="out of range"):
        any_model.check_head("0-4")


def test_gqa_map(gqa_model, llama_model):
    assert [gqa_model.kv_head_of(h) for h in range(4)] == [0, 0, 1, 1]
    assert [llama_model.kv_head_of(h) for h in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        gqa_model.kv_head_of(4)
    k = torch.arange(2.0).reshape(1, 1, 2, 1)
    assert gqa_model.expand_kv(k).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]


def test_gqa_map_matches_the_attention_scores(gqa_model, random_ids):
    """Query head h's scores are its rotated query against kv head kv_head_of(h)'s keys."""
    m = gqa_model
    ids = random_ids(9, seed=2)
    cache = full_cache(m, ids, ("hook_rot_q", "hook_rot_k", "hook_attn_scores"))
    q = cache["blocks.1.attn.hook_rot_q"][0]  # [pos, head, d_head]
    k = cache["blocks.1.attn.hook_rot_k"][0]  # [pos, kv_head, d_head]
    scores = cache["blocks.1.attn.hook_attn_scores"][0]  # [head, q, k]
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    for h in range(m.n_heads):
        expected = q[:, h] @ k[:, m.kv_head_of(h)].T / m.d_head**0.5
        torch.testing.assert_close(scores[h][causal], expected[causal], atol=1e-5, rtol=0)


def test_hooks_context_removes_hooks_even_on_error(llama_model, random_ids):
    seen = []
    name = llama_model.hook_name(0, "pattern")
    with pytest.raises(RuntimeError, match="boom"):
        with llama_model.hooks([(name, lambda t, hook: seen.append(t.shape))]):
            assert llama_model._has_active_hooks()
            llama_model.logits(random_ids(5))
            raise RuntimeError("boom")
    assert seen == [(1, 4, 5, 5)]
    assert not llama_model._has_active_hooks()
    llama_model.logits(random_ids(5))
    assert len(seen) == 1


def test_hook_result_is_switched_on_for_the_block(llama_model, random_ids):
    got = []
    with llama_model.hooks([(llama_model.hook_name(1, "result"), lambda t, hook: got.append(t))]):
        llama_model.logits(random_ids(6))
    assert got[0].shape == (1, 6, 4, 64)
    assert not llama_model.bridge.cfg.use_attn_result


# ---- decoding -------------------------------------------------------------------------------


def test_incremental_decoding_equals_full_forward(any_model, random_ids):
    """Tripwire for the transformers 5.24 bug: with transformers 5.24.0, TransformerLens
    4.3.0's ``return_type="logits_and_cache"`` leaves the cache un-extended and returns wrong
    logits (max diff ~3-6 on these models), so prefill + cached steps silently stop matching
    a full forward pass. ``HookedModel.step`` now raises RuntimeError when the cache does not
    grow; this test fails either way. float32, max abs logit difference <= 1e-4."""
    m = any_model
    ids = random_ids(28, seed=5)
    full = m.logits(ids)[0]  # [pos, vocab]
    state = m.prefill(ids[:, :20])
    torch.testing.assert_close(state.last_logits[0], full[19], atol=ATOL, rtol=0)
    for pos in range(20, 28):
        logits = m.step(state, ids[:, pos])
        torch.testing.assert_close(logits[0], full[pos], atol=ATOL, rtol=0)
        assert state.position == pos + 1
        assert state.cache.get_seq_length() == pos + 1


def test_incremental_decoding_batched(llama_model, random_ids):
    ids = random_ids(14, seed=6, batch=3)
    full = llama_model.logits(ids)
    state = llama_model.prefill(ids[:, :10])
    for pos in range(10, 14):
        logits = llama_model.step(state, ids[:, pos])
    torch.testing.assert_close(logits, full[:, 13], atol=ATOL, rtol=0)


def test_hooked_chunked_prefill_equals_fast_prefill(any_model, monkeypatch, random_ids):
    m = any_model
    monkeypatch.setattr(m, "chunk_size", 5)  # 23 tokens: chunks of 5, 5, 5, 5, 3
    ids = random_ids(23, seed=7)
    fast = m.prefill(ids)
    shapes, offsets = [], []

    def record(pattern, hook):
        shapes.append(tuple(pattern.shape))
        offsets.append(m.position_offset)

    hooked = m.prefill(ids, fwd_hooks=[(m.hook_name(0, "pattern"), record)])
    torch.testing.assert_close(hooked.last_logits, fast.last_logits, atol=ATOL, rtol=0)
    assert offsets == [0, 5, 10, 15, 20]
    assert shapes == [(1, 4, 5, 5), (1, 4, 5, 10), (1, 4, 5, 15), (1, 4, 5, 20), (1, 4, 3, 23)]
    # Both caches continue the same way.
    token = torch.tensor([FIRST_ID])
    torch.testing.assert_close(m.step(hooked, token), m.step(fast, token), atol=ATOL, rtol=0)


def test_step_hooks_see_one_query(any_model, random_ids):
    m = any_model
    state = m.prefill(random_ids(11, seed=8))
    seen = {}

    def grab(name):
        def fn(t, hook):
            seen[name] = (tuple(t.shape), m.position_offset)

        return fn

    hooks = [(m.hook_name(1, n), grab(n)) for n in ("pattern", "k", "z")]
    m.step(state, torch.tensor([FIRST_ID]), fwd_hooks=hooks)
    assert seen["pattern"] == ((1, m.n_heads, 1, 12), 11)
    assert seen["k"] == ((1, 1, m.n_kv_heads, m.d_head), 11)
    assert seen["z"] == ((1, 1, m.n_heads, m.d_head), 11)
    assert not m._has_active_hooks()


def test_prefill_with_attached_hooks_runs_the_bridge(llama_model, random_ids):
    """A hook attached with model.hooks() must fire in a plain prefill (no fast path)."""
    fired = []
    with llama_model.hooks([(llama_model.hook_name(0, "z"), lambda t, hook: fired.append(1))]):
        llama_model.prefill(random_ids(7))
    assert fired


def test_fast_path_switches_off_when_weights_are_replaced(tiny_llama_dir, random_ids):
    model = load_model(tiny_llama_dir, device="cpu")
    ids = random_ids(9, seed=9)
    linear = model.hf_model.model.layers[0].self_attn.original_component.q_proj.original_component
    linear.weight = torch.nn.Parameter(linear.weight.detach() * 2)
    with pytest.warns(RuntimeWarning, match="fast prefill switched off"):
        state = model.prefill(ids)
    assert not model.fast_prefill
    torch.testing.assert_close(state.last_logits, model.logits(ids)[:, -1], atol=ATOL, rtol=0)


# ---- per-position reads -----------------------------------------------------------------------


def test_attention_rows_equal_full_pattern(any_model, monkeypatch, random_ids):
    m = any_model
    monkeypatch.setattr(m, "chunk_size", 4)
    ids = random_ids(60, seed=10)
    chosen = [45, 3, 17, 18, 59, 20]
    rows = m.attention_rows(ids, chosen)
    order = sorted(chosen)
    assert rows.shape == (m.n_layers, m.n_heads, len(order), 60)
    cache = full_cache(m, ids, ("hook_pattern",))
    full = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0] for layer in range(2)])
    torch.testing.assert_close(rows, full[:, :, order], atol=1e-5, rtol=0)


def test_head_outputs_sum_to_the_attention_output(any_model, random_ids):
    m = any_model
    ids = random_ids(30, seed=11)
    positions = [0, 12, 29, 13]
    z, result = m.head_outputs(ids[0], positions)
    order = sorted(positions)
    assert z.shape == (m.n_layers, 4, m.n_heads, m.d_head)
    assert result.shape == (m.n_layers, 4, m.n_heads, m.d_model)
    cache = full_cache(m, ids, ("attn.hook_z", "attn.hook_out"))
    for layer in range(m.n_layers):
        torch.testing.assert_close(
            z[layer], cache[f"blocks.{layer}.attn.hook_z"][0, order], atol=1e-5, rtol=0
        )
        block_out = cache[f"blocks.{layer}.attn.hook_out"][0, order]
        total = result[layer].sum(1) + m.attn_output_bias()[layer]
        torch.testing.assert_close(total, block_out, atol=1e-5, rtol=0)


def test_gpt2_has_an_output_bias(gpt2_model):
    assert gpt2_model.attn_output_bias().abs().sum() > 0


def test_positions_are_checked(llama_model, random_ids):
    with pytest.raises(ValueError, match="positions"):
        llama_model.attention_rows(random_ids(5), [5])
    with pytest.raises(ValueError, match="batch of 1"):
        llama_model.head_outputs(random_ids(5, batch=2), [1])
