"""Writing small GGUF files for tests, the way llama.cpp's converter does (tests/ is on sys.path).

``write_llama_gguf(model, tokenizer, path)`` turns a config-built ``LlamaForCausalLM`` and a
byte-level BPE tokenizer into a float32 ``.gguf`` that transformers' GGUF reader loads back
(``modeling_gguf_pytorch_utils.load_gguf_checkpoint`` for config and tensors,
``integrations/gguf/gguf_tokenizer_mapping.py`` for the tokenizer). ``build_bpe_tokenizer`` and
``build_tiny_llama`` make the inputs, in memory and without the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BOS, EOS = "<|bos|>", "<|eos|>"
SENTENCES = [
    "the key is in the drawer and the drawer is in the kitchen",
    "a retrieval head copies the needle from the haystack to the answer",
    "the quick brown fox jumps over the lazy dog again and again",
    "where is the key? it is under the mat, next to the door.",
    "numbers like 12, 345 and 6789 are split into pieces",
]
# llama.cpp's names for a Llama decoder layer's tensors (gguf-py's TENSOR_NAMES for MODEL_ARCH.LLAMA)
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def build_bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE (GPT-2 style) trained on ``SENTENCES``: ``<|bos|>``=0, ``<|eos|>``=1,
    then the 256 byte symbols, then merges up to ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    # The GGUF reader rebuilds a GPT2Tokenizer (byte-level, GPT-2 split regex, no prefix space)
    # when tokenizer.ggml.pre names no other split, so train with exactly that pre-tokenizer.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    backend.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS)


def build_tiny_llama(vocab_size: int, seed: int = 0, tie: bool = False):
    """A 2-layer Llama (d_model 64, 4 heads of 16, 2 KV heads) with seeded, non-trivial weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norms away from 1, so a norm read into the wrong slot shows
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.15 * noise)
    return model


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores q/k rows with each head's rotary halves interleaved (GGML's rope pairs
    # adjacent dims); transformers' LlamaTensorProcessor undoes exactly this on load.
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_llama_gguf(model, tokenizer, path, *, architecture: str = "llama") -> Path:
    """Write ``model`` (a ``LlamaForCausalLM``) and ``tokenizer`` (byte-level BPE) to ``path``.

    ``architecture`` is what ``general.architecture`` says (and prefixes the model keys with):
    anything but ``"llama"`` makes a file no reader knows, for the error tests.
    """
    import gguf

    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-test-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    # The reader rebuilds the whole config from these (GGUF_CONFIG_MAPPING["llama"]): anything
    # left out falls back to LlamaConfig's defaults, which are a 7B model's.
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    # The tokenizer is metadata: tokens in id order, in the byte-level spelling ("Ġthe"), and the
    # merges as "a b" strings, best first; specials marked CONTROL so they stay whole.
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "vocabulary ids have gaps"
    specials = set(tokenizer.all_special_tokens)
    # tokenizers exposes the merges only through the serialised model: [["Ġ", "t"], ...]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")  # byte-level BPE, whatever the architecture
    writer.add_tokenizer_pre("default")  # no named split: the reader keeps GPT-2's regex
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges([" ".join(pair) for pair in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            weights = state[f"model.layers.{i}.{hf_name}"]
            if gguf_name == "attn_q.weight":
                weights = _permute(weights, cfg.num_attention_heads)
            elif gguf_name == "attn_k.weight":
                weights = _permute(weights, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gguf_name}", np.ascontiguousarray(weights))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    # llama.cpp omits output.weight when it is the embedding; the reader infers tying from that.
    if not cfg.tie_word_embeddings:
        writer.add_tensor("output.weight", state["lm_head.weight"])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
