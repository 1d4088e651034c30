"""Temporary demo: build a tiny random Llama, load it through ``load_model``, print its heads.

``python -m retrieval_heads.demo --out DIR`` writes the model to ``DIR/tiny-llama`` and exits 0.
(To be replaced by the real end-to-end demo.)
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build_tiny_llama(out: Path, seed: int = 0) -> Path:
    """Save a 2-layer random Llama (4 query heads, 2 kv heads) with a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<bos>", "<eos>", "<pad>"] + "the key is a number and it".split()
    words += [str(i) for i in range(100)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
    )
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    path = out / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrieval_heads.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory")
    args = parser.parse_args(argv)

    from transformers.utils import logging as hf_logging

    from retrieval_heads import load_model

    hf_logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    path = build_tiny_llama(args.out)
    model = load_model(path, device="cpu")
    print(f"model: {path}")
    print(
        f"layers={model.n_layers} heads={model.n_heads} kv_heads={model.n_kv_heads} "
        f"d_head={model.d_head} d_model={model.d_model} n_ctx={model.n_ctx}"
    )
    print("query head -> kv head:", {h: model.kv_head_of(h) for h in range(model.n_heads)})
    ids = model.to_tokens("the key is 42 and it is 42")
    state = model.prefill(ids)
    model.step(state, state.last_logits.argmax(-1))
    print(f"prefill + 1 decode step ok ({state.position} positions cached)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
