"""The shipped embedded model: loads offline and really retrieves."""

from __future__ import annotations

import itertools
import random

from retrieval_heads.scoring import iter_detect
from retrieval_heads.tiny import world
from retrieval_heads.tiny.trials import tiny_grid


def test_tokenizer_round_trips_the_language(tiny_model):
    tokenizer = tiny_model.tokenizer
    rng = random.Random(5)
    texts = list(itertools.islice(world.haystack_sentences(3), 50))
    needle = world.make_needle(rng)
    chain = world.make_chain(rng)
    texts += [needle["text"], needle["question"], *chain["links"], chain["question"]]
    texts += [fact.question + " " + fact.answer for fact in world.fact_table()[:20]]
    for text in texts:
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_shipped_model_answers_fresh_needle_questions(tiny_model):
    """Held-out keys, fresh values, 2 distractors, up to the trained context (1024 tokens)."""
    trials = tiny_grid(
        tiny_model.tokenizer,
        lengths=[173, 611, 1013],
        depths=[0, 33, 66, 100],
        n_needles=2,
        n_distractors=2,
        seed=2024,
    )
    records = list(iter_detect(tiny_model, trials))
    exact = sum(r.generated_text == r.expected for r in records)
    assert exact / len(records) >= 0.9, [(r.expected, r.generated_text) for r in records]


def test_both_checkpoints_are_registered(tiny_model):
    from retrieval_heads import load_model

    short = load_model("tiny-short")
    assert (short.n_layers, short.n_heads) == (tiny_model.n_layers, tiny_model.n_heads)
    assert tiny_model.n_ctx == 1024 and short.n_ctx == 256
