"""Shared fixtures: tiny random models built from configs, saved as HF-format directories.

Nothing here touches the network: the hub is forced offline for the whole test session
(``HF_HUB_OFFLINE=1``), every model is built from a config with seeded random weights, and
every tokenizer is a word-level tokenizer over the fixed vocabulary ``WORDS``.

Fixtures (all session-scoped, so build them once and never mutate them; tests that change
a model must load their own copy from the ``*_dir`` fixture):

``word_tokenizer``
    A ``PreTrainedTokenizerFast`` (WordLevel model, whitespace pre-tokenizer, ``<unk>``)
    over ``WORDS``: special tokens ``<unk>``=0, ``<bos>``=1, ``<eos>``=2, ``<pad>``=3, then
    a few English words, then ``w0`` ... ``w99`` (ids ``FIRST_PLAIN_ID`` and up; handy
    for random token ids that decode to distinct words).
``tiny_llama_dir``
    Llama, 2 layers, d_model 64, 4 heads of 16 (no GQA), rotary, RMSNorm, 1024 positions.
``tiny_gqa_dir``
    Qwen2, 2 layers, d_model 64, 4 query heads sharing 2 kv heads, q/k/v biases, 1024
    positions. (Qwen2 is also the model type for which ``AutoTokenizer`` swaps in its own
    tokenizer class; ``load_model`` must keep the saved one.)
``tiny_gpt2_dir``
    GPT-2, 2 layers, d_model 64, 4 heads, learned positions (256), fused QKV (``c_attn``),
    biases everywhere (attention output bias included).
``llama_model``, ``gqa_model``, ``gpt2_model``
    The directories above loaded with ``load_model(dir, device="cpu")`` (float32).
``any_model``
    Parametrised over the three loaded models (test ids ``llama``, ``gqa``, ``gpt2``).

Weights are re-drawn after construction with a seeded generator (weights N(0, 0.15),
biases N(0, 0.1), norm scales 1 + N(0, 0.1)), so biases are non-zero and attention
patterns are far from uniform.

``random_ids``
    The function ``random_ids(n, seed=0, batch=None)`` -> seeded token ids ``[batch or 1, n]``
    drawn from the plain words (so any of the models above accepts them).

Test modules should use fixtures rather than ``from conftest import ...``: with more than one
``conftest.py`` under ``tests/`` that import is ambiguous.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SEED = 1234
SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>"]
WORDS = SPECIALS + "the a key is in and of to it".split() + [f"w{i}" for i in range(100)]
FIRST_PLAIN_ID = WORDS.index("w0")


def make_random_ids(n: int, seed: int = 0, batch: int | None = None):
    """Seeded token ids ``[1, n]`` (or ``[batch, n]``) drawn from the plain words ``w0..w99``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_PLAIN_ID, len(WORDS), (batch or 1, n), generator=gen)


def build_word_tokenizer():
    """The word-level tokenizer over ``WORDS`` (see the module docstring)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
    )


def _redraw_weights(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            is_norm = any(k in name for k in ("norm", "ln_"))
            if is_norm and name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(0.15 * noise)


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


_SPECIAL_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)


@pytest.fixture(scope="session", autouse=True)
def _quiet_and_seeded():
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    yield


@pytest.fixture(scope="session")
def random_ids():
    """The function ``random_ids(n, seed=0, batch=None)``: seeded ids ``[batch or 1, n]``."""
    return make_random_ids


@pytest.fixture(scope="session")
def word_tokenizer():
    return build_word_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, word_tokenizer) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        **_SPECIAL_IDS,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    _redraw_weights(model, SEED)
    return _save(model, word_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gqa_dir(tmp_path_factory, word_tokenizer) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(WORDS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        **_SPECIAL_IDS,
    )
    torch.manual_seed(SEED + 1)
    model = Qwen2ForCausalLM(config)
    _redraw_weights(model, SEED + 1)
    return _save(model, word_tokenizer, tmp_path_factory.mktemp("tiny-gqa"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, word_tokenizer) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(WORDS),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        **_SPECIAL_IDS,
    )
    torch.manual_seed(SEED + 2)
    model = GPT2LMHeadModel(config)
    _redraw_weights(model, SEED + 2)
    return _save(model, word_tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


def _gemma3_dir(tmp_path_factory, tokenizer, *, layer_types, kv_heads: int, seed: int) -> Path:
    """A small Gemma 3 with a sliding window of 8 where ``layer_types`` says so: what
    Gemma-3-270M does with 512 (a sliding layer's cache then holds only its window)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(WORDS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(layer_types),
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=list(layer_types),
        max_position_embeddings=512,
        **_SPECIAL_IDS,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    _redraw_weights(model, seed)
    return _save(model, tokenizer, tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def tiny_bloom_dir(tmp_path_factory, word_tokenizer) -> Path:
    """A small Bloom: ALiBi position biases on every attention score (no rotary, no learned
    positions), so a zeroed query does not give uniform attention."""
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(vocab_size=len(WORDS), hidden_size=64, n_layer=2, n_head=4, **_SPECIAL_IDS)
    torch.manual_seed(SEED + 5)
    model = BloomForCausalLM(config)
    _redraw_weights(model, SEED + 5)
    return _save(model, word_tokenizer, tmp_path_factory.mktemp("tiny-bloom"))


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory, word_tokenizer) -> Path:
    """Sliding layers 0 and 2 around global layer 1; one KV head (as Gemma-3-270M)."""
    layers = ["sliding_attention", "full_attention", "sliding_attention"]
    return _gemma3_dir(
        tmp_path_factory, word_tokenizer, layer_types=layers, kv_heads=1, seed=SEED + 3
    )


@pytest.fixture(scope="session")
def gemma3_gqa_model(tmp_path_factory, word_tokenizer):
    """Sliding and global layers alternating, 4 query heads on 2 KV heads."""
    from retrieval_heads import load_model

    layers = ["sliding_attention", "full_attention"] * 2
    path = _gemma3_dir(tmp_path_factory, word_tokenizer, layer_types=layers, kv_heads=2, seed=7)
    return load_model(path, device="cpu")


@pytest.fixture(scope="session")
def gemma3_model(tiny_gemma3_dir):
    from retrieval_heads import load_model

    return load_model(tiny_gemma3_dir, device="cpu")


@pytest.fixture(scope="session")
def llama_model(tiny_llama_dir):
    from retrieval_heads import load_model

    return load_model(tiny_llama_dir, device="cpu")


@pytest.fixture(scope="session")
def gqa_model(tiny_gqa_dir):
    from retrieval_heads import load_model

    return load_model(tiny_gqa_dir, device="cpu")


@pytest.fixture(scope="session")
def gpt2_model(tiny_gpt2_dir):
    from retrieval_heads import load_model

    return load_model(tiny_gpt2_dir, device="cpu")


MODEL_FIXTURES = {"llama": "llama_model", "gqa": "gqa_model", "gpt2": "gpt2_model"}
DIR_FIXTURES = {"llama": "tiny_llama_dir", "gqa": "tiny_gqa_dir", "gpt2": "tiny_gpt2_dir"}


@pytest.fixture(params=list(MODEL_FIXTURES))
def any_model(request):
    """Each loaded tiny model in turn (llama, gqa, gpt2)."""
    return request.getfixturevalue(MODEL_FIXTURES[request.param])


@pytest.fixture(scope="session")
def tiny_model():
    """The shipped embedded model (``load_model("tiny")``): real retrieval heads, loads offline."""
    from retrieval_heads import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_trials(tiny_model):
    """A small NIAH grid in the embedded model's language: 2 lengths x 3 depths x 2 needles."""
    from retrieval_heads.tiny.trials import tiny_grid

    return tiny_grid(tiny_model.tokenizer, lengths=[150, 400], depths=[0, 50, 100], n_needles=2)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests (use with ``pytest.mark.usefixtures``): the tiny
    model gains nothing from more, and two threads fighting other processes for 2 cores make it
    many times slower. The results are the same bytes either way."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
