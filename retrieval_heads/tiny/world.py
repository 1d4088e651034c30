"""The embedded model's synthetic world: a small English-like language and the tasks taught in it.

Everything is lower-case words and punctuation separated by single spaces, so a word-level tokenizer
covers the language exactly and attention views show words a reader can follow.

Tasks (each a document: ``<s> context question : ... answer : ANSWER </s>``):

- **needle** — "the secret code of the red door is four nine two ." hidden in filler, with distractor
  needles of the same template for other keys. The value is random, so it can only come from context.
- **fact** — "where does the quiet baker live ?" answered from a fixed table the model memorises; the
  fact is never in the context (the parametric-knowledge control).
- **chain** — links "the key of the red box is in the blue cup ." scattered in the context; the answer
  writes each hop ("blue cup , green bag , old shoe"), re-reading the context at every step.
- **repeat** — a random segment repeated with gaps: dense copying that gets induction started early.

Keys are (adjective, noun) pairs; every fifth pair is held out of training (``split="test"``), so
evaluation asks about keys the model never saw as needle keys. Nothing here imports torch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
PUNCT = [".", ",", "?", ":"]

ADJECTIVES = (
    "red blue green yellow black white brown silver golden purple "
    "old young small big tall short quiet loud happy sad warm cold bright dark"
).split()
NOUNS = (
    "door box cup bag shoe lamp book ship boat house garden window road hill river tree "
    "farmer baker child king queen sailor doctor teacher dog cat bird horse fox owl "
    "bridge tower cart bell coat hat key jar drum clock"
).split()
VERBS_INTRANS = "walks sings sleeps waits sits runs rests smiles dances works".split()
VERBS_TRANS = "sees finds carries opens paints watches follows holds moves cleans".split()
PREPOSITIONS = "near under over behind beside past toward around".split()
ADVERBS = "slowly quietly often today again softly early late".split()
PLACES = "market field forest harbour valley meadow village castle island station".split()
NUMBERS = "zero one two three four five six seven eight nine".split()
TOWNS = (
    "ardon belmar corvin dunmore elgar falbrook gorran hollin istow jarrow kelby lorne "
    "marden norlow orrin pelham quarry rissing stanway tolby"
).split()
REGIONS = "north south east west".split()
FUNCTION_WORDS = (
    "the a and but then of is in to what where does live follow key from secret code "
    "question answer number lucky magic"
).split()

ATTRIBUTES = ("secret code", "lucky number", "magic number")
PROMPT_TEMPLATE = "{context} {question}"

ALL_WORDS = sorted(
    set(
        ADJECTIVES
        + NOUNS
        + VERBS_INTRANS
        + VERBS_TRANS
        + PREPOSITIONS
        + ADVERBS
        + PLACES
        + NUMBERS
        + TOWNS
        + REGIONS
        + FUNCTION_WORDS
    )
)
VOCAB = SPECIAL_TOKENS + PUNCT + ALL_WORDS

KEYS = [(adjective, noun) for adjective in ADJECTIVES for noun in NOUNS]
TEST_KEYS = KEYS[::5]
TRAIN_KEYS = [key for i, key in enumerate(KEYS) if i % 5]
N_FACTS = 300
FACT_SEED = 20240415


def key_phrase(key: tuple[str, str]) -> str:
    return f"the {key[0]} {key[1]}"


def keys_for(split: str) -> list[tuple[str, str]]:
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    return {"train": TRAIN_KEYS, "test": TEST_KEYS, "all": KEYS}[split]


# --- filler -------------------------------------------------------------------------------------


def sentence(rng: random.Random) -> str:
    """One filler sentence, ending in ' .' (no numbers: those belong to needles)."""
    a, n, n2 = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(NOUNS)
    form = rng.randrange(6)
    if form == 0:
        return f"the {a} {n} {rng.choice(VERBS_INTRANS)} {rng.choice(PREPOSITIONS)} the {n2} ."
    if form == 1:
        return f"a {n} {rng.choice(VERBS_TRANS)} the {a} {n2} {rng.choice(ADVERBS)} ."
    if form == 2:
        return f"the {n} and the {n2} {rng.choice(VERBS_INTRANS)} {rng.choice(ADVERBS)} ."
    if form == 3:
        return f"the {a} {n} {rng.choice(VERBS_TRANS)} a {n2} in the {rng.choice(PLACES)} ."
    if form == 4:
        return (
            f"{rng.choice(ADVERBS)} the {n} {rng.choice(VERBS_INTRANS)} "
            f"but the {n2} {rng.choice(VERBS_INTRANS)} ."
        )
    return f"a {a} {n} {rng.choice(VERBS_INTRANS)} {rng.choice(PREPOSITIONS)} the {rng.choice(PLACES)} ."


def haystack_sentences(seed: int = 0) -> Iterator[str]:
    """Endless filler sentences, reproducible from ``seed``."""
    rng = random.Random(seed)
    while True:
        yield sentence(rng)


# --- needles ------------------------------------------------------------------------------------


def needle_text(attribute: str, key: tuple[str, str], value: list[str]) -> str:
    return f"the {attribute} of {key_phrase(key)} is {' '.join(value)} ."


def make_needle(
    rng: random.Random,
    split: str = "test",
    n_values: int = 3,
    key: tuple[str, str] | None = None,
    attribute: str | None = None,
) -> dict:
    """A needle: ``{"key", "attribute", "text", "question", "answer"}``; the answer is the value."""
    key = key or rng.choice(keys_for(split))
    attribute = attribute or rng.choice(ATTRIBUTES)
    value = [rng.choice(NUMBERS) for _ in range(n_values)]
    return {
        "key": list(key),
        "attribute": attribute,
        "text": needle_text(attribute, key, value),
        "question": f"question : what is the {attribute} of {key_phrase(key)} ? answer :",
        "answer": " ".join(value),
    }


def make_distractors(rng: random.Random, target: dict, n: int, split: str = "test") -> list[dict]:
    """``n`` needles of the target's template with other keys and values (RULER-style)."""
    taken = {tuple(target["key"])}
    out: list[dict] = []
    candidates = keys_for(split) if split != "train" else TRAIN_KEYS
    while len(out) < n:
        key = rng.choice(candidates)
        if key in taken:
            continue
        taken.add(key)
        n_values = len(target["answer"].split())
        out.append(make_needle(rng, split, n_values, key=key, attribute=target["attribute"]))
    return out


# --- memorised facts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    subject: tuple[str, str]
    answer: str

    @property
    def question(self) -> str:
        return f"question : where does {key_phrase(self.subject)} live ? answer :"


def fact_table() -> list[Fact]:
    """The fixed table of facts the model memorises (same for every seed: it is the world)."""
    rng = random.Random(FACT_SEED)
    subjects = rng.sample(KEYS, N_FACTS)
    return [Fact(s, f"{rng.choice(REGIONS)} {rng.choice(TOWNS)}") for s in subjects]


# --- chains -------------------------------------------------------------------------------------


def make_chain(rng: random.Random, hops: int = 3, split: str = "test") -> dict:
    """Links A→B→…; ``links`` are context sentences, ``answer`` lists every hop."""
    nodes = rng.sample(keys_for(split), hops + 1)
    links = [
        f"the key of {key_phrase(a)} is in {key_phrase(b)} ."
        for a, b in zip(nodes, nodes[1:], strict=False)
    ]
    return {
        "nodes": [list(node) for node in nodes],
        "links": links,
        "question": f"question : follow the key from {key_phrase(nodes[0])} ? answer :",
        "answer": " , ".join(f"{b[0]} {b[1]}" for b in nodes[1:]),
    }


# --- tokenizer ----------------------------------------------------------------------------------


def build_tokenizer(vocab_size: int | None = None):
    """The world's word-level tokenizer as a ``PreTrainedTokenizerFast`` (adds ``<s>`` in front).

    ``vocab_size`` pads the vocabulary with ``<xN>`` words, so that every id a bigger (random)
    model can emit decodes: the benchmark's models use this.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = VOCAB + [f"<x{i}>" for i in range(max(0, (vocab_size or 0) - len(VOCAB)))]
    vocab = {token: i for i, token in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
