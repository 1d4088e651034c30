"""Training and evaluation sequences for the embedded model, built in token space for speed.

A sample is a whole document of exactly ``length`` tokens::

    <s> filler … [needles / links at sentence boundaries] … question : … answer : ANSWER </s>

with a per-token loss weight (filler 1, answers ``answer_weight``). Filler comes from a bank of
pre-tokenised sentences, so building a 1K-token sample is a few numpy concatenations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from retrieval_heads.tiny import world

TASKS = ("needle", "fact", "chain", "repeat", "filler")


@dataclass
class Sample:
    input_ids: np.ndarray  # [length] int64
    weights: np.ndarray  # [length] float32, loss weight of predicting this token
    answer_span: tuple[int, int]  # [start, end) of the answer (+ </s>) in input_ids
    task: str
    info: dict = field(default_factory=dict)


class Builder:
    """Builds samples of each task at an exact length. One per process; seeded."""

    def __init__(self, seed: int, n_bank: int = 20_000, answer_weight: float = 5.0):
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.vocab = {token: i for i, token in enumerate(world.VOCAB)}
        self.bos, self.eos = self.vocab["<s>"], self.vocab["</s>"]
        self.answer_weight = answer_weight
        sentences = [world.sentence(self.rng) for _ in range(n_bank)]
        self.bank = [self.encode(s) for s in sentences]
        self.bank_lengths = np.array([len(s) for s in self.bank])
        self.facts = world.fact_table()
        self.word_ids = np.array([self.vocab[w] for w in world.ALL_WORDS])

    def encode(self, text: str) -> np.ndarray:
        return np.array([self.vocab[w] for w in text.split()], dtype=np.int64)

    def filler(self, n_tokens: int) -> tuple[np.ndarray, list[int]]:
        """``n_tokens`` of filler and the offsets just after each sentence end (boundaries)."""
        if n_tokens <= 0:
            return np.zeros(0, dtype=np.int64), [0]
        mean = self.bank_lengths.mean()
        picks = self.np_rng.integers(0, len(self.bank), int(n_tokens / mean) + 8)
        while self.bank_lengths[picks].sum() < n_tokens:
            picks = np.concatenate([picks, self.np_rng.integers(0, len(self.bank), 8)])
        tokens = np.concatenate([self.bank[i] for i in picks])
        ends = np.cumsum(self.bank_lengths[picks])
        cut = len(tokens) - n_tokens  # drop from the front: the context may open mid-sentence
        boundaries = [0] + [int(e - cut) for e in ends if e - cut > 0]
        return tokens[cut:], sorted(set(boundaries))

    def assemble(
        self,
        length: int,
        inserts: list[np.ndarray],
        tail: np.ndarray,
        answer: np.ndarray,
        depths: list[float | None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, tuple[int, int], list[int]]:
        """``<s>`` + filler with ``inserts`` at sentence boundaries + ``tail`` + ``answer`` + ``</s>``."""
        answer = np.concatenate([answer, [self.eos]])
        n_filler = length - 1 - sum(len(x) for x in inserts) - len(tail) - len(answer)
        if n_filler < 0:
            raise ValueError(f"length {length} too short for this sample")
        filler, boundaries = self.filler(n_filler)
        depths = depths or [None] * len(inserts)
        cuts = []
        for depth in depths:
            if depth is None:
                cuts.append(self.rng.choice(boundaries))
            else:  # the boundary nearest before the requested depth
                target = depth / 100 * n_filler
                cuts.append(max(b for b in boundaries if b <= target + 1e-9))
        order = sorted(range(len(inserts)), key=lambda i: (cuts[i], i))
        pieces, offsets, prev, position = [], [0] * len(inserts), 0, 1
        for i in order:
            pieces.append(filler[prev : cuts[i]])
            position += cuts[i] - prev
            offsets[i] = position
            pieces.append(inserts[i])
            position += len(inserts[i])
            prev = cuts[i]
        pieces.append(filler[prev:])
        ids = np.concatenate([[self.bos], *pieces, tail, answer]).astype(np.int64)
        weights = np.ones(length, dtype=np.float32)
        start = length - len(answer)
        weights[start:] = self.answer_weight
        return ids, weights, (start, length), offsets

    # --- tasks ---------------------------------------------------------------------------------

    def needle(
        self,
        length: int,
        split: str = "train",
        n_distractors: int | None = None,
        depth: float | None = None,
        n_values: int | None = None,
    ) -> Sample:
        rng = self.rng
        n_values = n_values or rng.randint(2, 5)
        n_distractors = rng.choice([0, 1, 2, 2, 3, 4]) if n_distractors is None else n_distractors
        target = world.make_needle(rng, split, n_values)
        needles = [target, *world.make_distractors(rng, target, n_distractors, split)]
        inserts = [self.encode(n["text"]) for n in needles]
        depths = [depth] + [None] * n_distractors
        ids, weights, span, offsets = self.assemble(
            length,
            inserts,
            self.encode(target["question"]),
            self.encode(target["answer"]),
            depths,
        )
        info = {"answer": target["answer"], "needle_offset": offsets[0], "key": target["key"]}
        return Sample(ids, weights, span, "needle", info)

    def fact(self, length: int, index: int | None = None) -> Sample:
        fact = self.facts[self.rng.randrange(len(self.facts)) if index is None else index]
        ids, weights, span, _ = self.assemble(
            length, [], self.encode(fact.question), self.encode(fact.answer)
        )
        return Sample(ids, weights, span, "fact", {"answer": fact.answer})

    def chain(self, length: int, split: str = "train", hops: int | None = None) -> Sample:
        hops = hops or self.rng.randint(2, 4)
        chain = world.make_chain(self.rng, hops, split)
        inserts = [self.encode(link) for link in chain["links"]]
        ids, weights, span, _ = self.assemble(
            length, inserts, self.encode(chain["question"]), self.encode(chain["answer"])
        )
        return Sample(ids, weights, span, "chain", {"answer": chain["answer"]})

    def repeat(self, length: int) -> Sample:
        """A random word segment repeated with filler gaps: copying pays at many positions."""
        rng = self.rng
        segment = self.np_rng.choice(self.word_ids, rng.randint(4, 16))
        copies = rng.randint(3, 6)
        inserts = [segment.copy() for _ in range(copies)]
        space = length - 2 - copies * len(segment)
        if space < 0:
            return self.filler_only(length)
        ids, weights, _, offsets = self.assemble(
            length, inserts, np.zeros(0, np.int64), np.zeros(0, np.int64)
        )
        weights[:] = 1.0
        first = min(offsets)
        for offset in offsets:  # every copy after the first is predictable from context
            if offset != first:
                weights[offset + 1 : offset + len(segment)] = 2.0
        return Sample(ids, weights, (length - 1, length), "repeat")

    def filler_only(self, length: int) -> Sample:
        tokens, _ = self.filler(length - 2)
        ids = np.concatenate([[self.bos], tokens, [self.eos]]).astype(np.int64)
        return Sample(ids, np.ones(length, np.float32), (length - 1, length), "filler")

    def sample(self, length: int, mix: dict[str, float]) -> Sample:
        task = self.rng.choices(list(mix), weights=list(mix.values()))[0]
        if task == "needle":
            return self.needle(length)
        if task == "fact":
            return self.fact(length)
        if task == "chain":
            return self.chain(length)
        if task == "repeat":
            return self.repeat(length)
        return self.filler_only(length)
