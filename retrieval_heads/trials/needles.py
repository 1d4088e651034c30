"""Needles: the facts hidden in a haystack, and the sets of them one trial holds.

Owns :class:`Needle` (kept in Unicode NFC form), :class:`NeedleSet` (targets and distractors,
RULER's variants), reading needles from JSONL (:func:`load_needles`, :func:`default_needles`)
and RULER-style key/value needles (:func:`key_value_needles`). It never tokenizes, and knows no
haystack, template or synthetic world (the embedded model's needles are in
:mod:`retrieval_heads.tiny.trials`).
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval_heads.seeding import seeded_rng
from retrieval_heads.trials.base import DATA_DIR, TrialError, _not_utf8

__all__ = [
    "NEEDLES_PATH",
    "Needle",
    "NeedleSet",
    "default_needles",
    "key_value_needles",
    "load_needles",
]

NEEDLES_PATH = DATA_DIR / "needles.jsonl"


@dataclass(frozen=True)
class Needle:
    """A fact to hide: the sentence, the question that asks for it, and the answer span.

    ``answer`` must be a substring of ``text``: it is the part whose copying is scored (the
    reference code's ``real_needle``). All four strings are kept in Unicode NFC form.
    """

    needle_id: str
    text: str
    question: str
    answer: str

    def __post_init__(self) -> None:
        for name in ("needle_id", "text", "question", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise TrialError(f"needle {self.needle_id!r}: {name} must be a non-empty string")
            # One Unicode form (NFC) for all three: "Zoë" typed as e + combining diaeresis is
            # the same word as "Zoë", and the answer must be found in the needle either way.
            object.__setattr__(self, name, unicodedata.normalize("NFC", value))
        if "\n" in self.answer or "\r" in self.answer:
            raise TrialError(
                f"needle {self.needle_id!r}: the answer {self.answer!r} holds a line break, but "
                "decoding stops at the first newline: put the answer on one line"
            )
        if self.answer not in self.text:
            raise TrialError(
                f"needle {self.needle_id!r}: answer {self.answer!r} is not a substring of its "
                f"text {self.text!r}"
            )

    def to_dict(self) -> dict[str, str]:
        """The JSONL form read by :func:`load_needles`."""
        return {
            "id": self.needle_id,
            "needle": self.text,
            "question": self.question,
            "answer": self.answer,
        }


@dataclass(frozen=True)
class NeedleSet:
    """Several needles in one context: targets (all asked for) and distractors (not asked for).

    RULER's variants map onto it: multi-key = one target plus distractors with other keys;
    multi-value = several targets with one key; multi-query = several targets with different keys.
    ``question`` overrides the targets' own questions (needed when there are several targets).
    """

    targets: tuple[Needle, ...]
    distractors: tuple[Needle, ...] = ()
    question: str | None = None
    kind: str = "single"

    def __post_init__(self) -> None:
        if not self.targets:
            raise TrialError("a NeedleSet needs at least one target needle")
        ids = [n.needle_id for n in (*self.targets, *self.distractors)]
        if len(set(ids)) != len(ids):
            raise TrialError(f"needle ids repeat inside a NeedleSet: {ids}")


def _needle_from_dict(data: dict[str, Any], where: str = "") -> Needle:
    missing = [k for k in ("id", "needle", "question", "answer") if k not in data]
    if missing:
        raise TrialError(
            f"{where}needle is missing field(s) {missing}; expected id, needle, question, answer"
        )
    for key in ("id", "needle", "question", "answer"):
        if not isinstance(data[key], str):
            raise TrialError(f"{where}field {key!r} must be a string, got {data[key]!r}")
    try:
        return Needle(data["id"], data["needle"], data["question"], data["answer"])
    except TrialError as error:
        raise TrialError(f"{where}{error}") from None


def load_needles(path: str | Path) -> list[Needle]:
    """Needles from JSONL, one ``{"id", "needle", "question", "answer"}`` object per line.

    Blank lines are skipped and extra keys ignored; anything else malformed raises
    :class:`TrialError` naming the file and line, because a silently skipped needle would bias
    a sweep without anyone noticing.
    """
    path = Path(path)
    needles: list[Needle] = []
    seen: dict[str, int] = {}
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}: "
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as error:
                    raise TrialError(f"{where}not valid JSON ({error.msg})") from None
                if not isinstance(data, dict):
                    raise TrialError(f"{where}expected a JSON object, got {type(data).__name__}")
                needle = _needle_from_dict(data, where)
                if needle.needle_id in seen:
                    raise TrialError(
                        f"{where}needle id {needle.needle_id!r} already used on line "
                        f"{seen[needle.needle_id]}"
                    )
                seen[needle.needle_id] = number
                needles.append(needle)
    except UnicodeDecodeError as error:
        raise TrialError(f"{path}: {_not_utf8(error)}; needles are a UTF-8 JSONL file") from None
    return needles


def default_needles() -> list[Needle]:
    """The example needles shipped with the package (``data/needles.jsonl``)."""
    return load_needles(NEEDLES_PATH)


# RULER-style key/value needles. Keys are (adjective, noun) phrases, values 7-digit numbers.
_KV_ADJECTIVES = (
    "amber quiet rusty hollow northern gentle crooked silver wooden distant velvet narrow "
    "patient frozen golden muddy bright sleepy hidden broken"
).split()
_KV_NOUNS = (
    "lantern harbour orchard meadow bridge kettle compass violin garden island tower "
    "teapot window ladder market river candle anchor mirror valley"
).split()


def key_value_needles(
    n: int,
    seed: int = 0,
    *,
    kind: str = "single",
    n_values: int = 4,
    n_queries: int = 2,
    n_distractors: int | None = None,
) -> list[NeedleSet]:
    """``n`` RULER-style needle sets ("the special magic number for K is V").

    ``kind``: ``"single"`` (one key, one value), ``"multikey"`` (plus distractors with other keys;
    ``n_distractors`` defaults to 3), ``"multivalue"`` (``n_values`` targets sharing one key, all
    asked for), ``"multiquery"`` (``n_queries`` targets with different keys, all asked for).
    Distractors use the same template with other keys and values, so only the key tells them apart.
    """
    kinds = ("single", "multikey", "multivalue", "multiquery")
    if kind not in kinds:
        raise TrialError(f"kind must be one of {kinds}, got {kind!r}")
    if n_distractors is None:
        n_distractors = 3 if kind == "multikey" else 0
    rng = seeded_rng("key_value_needles", seed, kind)
    keys = [f"{a} {b}" for a in _KV_ADJECTIVES for b in _KV_NOUNS]
    sets: list[NeedleSet] = []
    for i in range(n):
        n_keys = n_queries if kind == "multiquery" else 1
        chosen = rng.sample(keys, n_keys + n_distractors)
        target_keys, other_keys = chosen[:n_keys], chosen[n_keys:]
        if kind == "multivalue":
            template = "One of the special magic numbers for {key} is {value}."
            target_keys = target_keys * n_values
            question = f"What are all the special magic numbers for {target_keys[0]}?"
        else:
            template = "The special magic number for {key} is {value}."
            if len(target_keys) == 1:
                question = f"What is the special magic number for {target_keys[0]}?"
            else:
                listed = ", ".join(target_keys[:-1]) + f" and {target_keys[-1]}"
                question = f"What are the special magic numbers for {listed}?"
        values: list[str] = []
        while len(values) < len(target_keys) + len(other_keys):
            candidate = str(rng.randrange(1_000_000, 10_000_000))
            if candidate not in values:
                values.append(candidate)
        base = f"kv-{kind}-s{seed}-{i}"
        ids = [f"{base}-t{j}" for j in range(len(target_keys))]
        ids += [f"{base}-d{j}" for j in range(len(other_keys))]
        made = [
            Needle(
                needle_id,
                template.format(key=key, value=value),
                f"What is the special magic number for {key}?",
                value,
            )
            for needle_id, key, value in zip(ids, target_keys + other_keys, values, strict=True)
        ]
        targets, distractors = tuple(made[: len(target_keys)]), tuple(made[len(target_keys) :])
        sets.append(NeedleSet(targets, distractors, question, kind))
    return sets
