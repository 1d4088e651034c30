"""Real tokenizers built offline, one of each family the trial builder must handle.

No hub downloads: each is trained or assembled here from the project's own filler text and
needles, in well under a second, and cached for the session.

- ``word``: word-level (``WordLevel`` + ``Whitespace``), no decoder (decode joins with spaces).
- ``bpe``: byte-level BPE (GPT-2 style), no BOS.
- ``sp``: SentencePiece-style Unigram with a ``Metaspace`` pre-tokenizer and a ``<s>`` BOS.
- ``llama``: Llama-2 style BPE: no pre-tokenizer, a normalizer that prepends and replaces ``▁``,
  byte fallback, and a ``<s>`` BOS — the tokenizer whose dummy prefix breaks naive piecewise
  tokenization.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

DATA = Path(__file__).resolve().parents[2] / "retrieval_heads" / "data"
EXTRA_TEXT = (
    "Below is a long text. Read it carefully. Based on the text above, answer the question. "
    "Question: Answer: This is a very long story book: <book> </book> <text> </text> "
    "The special magic number for amber lantern is 1234567. What is the password? "
    "The password for the cellar is juniper. What is the password for the cellar? "
    "The colour of the kite is red. What colour is the kite? 0123456789"
)


@functools.cache
def corpus() -> str:
    needles = [json.loads(line) for line in (DATA / "needles.jsonl").read_text().splitlines()]
    lines = [f"{n['needle']} {n['question']} {n['answer']}" for n in needles]
    return (DATA / "filler.txt").read_text() + "\n" + "\n".join(lines) + "\n" + EXTRA_TEXT


def chunks(size: int = 2000) -> list[str]:
    """The corpus in pieces that keep their newlines (so newline is in every trained alphabet)."""
    text = corpus()
    return [text[i : i + size] for i in range(0, len(text), size)]


@functools.cache
def build_word() -> PreTrainedTokenizerFast:
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for w, _ in pre.pre_tokenize_str(corpus())})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    tok.name_or_path = "test-word"
    return tok


@functools.cache
def build_bpe() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(chunks(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")
    tok.name_or_path = "test-bpe"
    return tok


@functools.cache
def build_sp() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.Unigram())
    # Punctuation split: like SentencePiece's split by Unicode script, no piece spans "e." etc.
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
            pre_tokenizers.Punctuation(),
        ]
    )
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", "</s>"],
        unk_token="<unk>",
        show_progress=False,
    )
    core.train_from_iterator(chunks(), trainer)
    bos = core.token_to_id("<s>")
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.name_or_path = "test-sp"
    return tok


@functools.cache
def build_llama() -> PreTrainedTokenizerFast:
    # Train with a Metaspace split so merges never cross a word start, then encode like Llama-2.
    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)],
        show_progress=False,
    )
    core.train_from_iterator(chunks(), trainer)
    core.pre_tokenizer = None
    core.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    core.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    bos = core.token_to_id("<s>")
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.name_or_path = "test-llama"
    return tok


BUILDERS = {
    "word": build_word,
    "bpe": build_bpe,
    "sp": build_sp,
    "llama": build_llama,
}


@pytest.fixture(scope="session", params=sorted(BUILDERS))
def any_tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    """Each offline tokenizer family in turn."""
    return BUILDERS[request.param]()


@pytest.fixture(scope="session")
def word_tok() -> PreTrainedTokenizerFast:
    return build_word()


@pytest.fixture(scope="session")
def bpe_tok() -> PreTrainedTokenizerFast:
    return build_bpe()


@pytest.fixture(scope="session")
def sp_tok() -> PreTrainedTokenizerFast:
    return build_sp()


@pytest.fixture(scope="session")
def llama_tok() -> PreTrainedTokenizerFast:
    return build_llama()


@pytest.fixture(scope="session")
def fresh_tokenizer():
    """Build a new, uncached tokenizer of a family (for tests that modify it)."""
    return lambda name: BUILDERS[name].__wrapped__()
