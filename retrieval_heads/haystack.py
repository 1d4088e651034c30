"""Needle-in-a-haystack trials: haystack sources, needles, insertion at sentence boundaries, grids.

Retrieval heads are found and tested on prompts that hide a *needle* (a sentence holding a fact)
inside a long *haystack* of unrelated text and then ask for the fact. The reference code of
Wu et al. (2024) finds sentence boundaries by looking for one tokenizer's period ids, drops trials
it cannot build and depends on one haystack. This module instead:

- finds sentence boundaries by **decoding** tokens, so it works for any Hugging Face tokenizer
  (word-level, byte-level BPE, SentencePiece-style), and falls back to a plain token boundary —
  recorded in ``Trial.boundary`` and warned about — when the haystack has no sentence boundary;
- records exactly where every needle and every answer span sits (token ``[start, end)``), so the
  retrieval score can check "did this head attend to the token it is copying";
- fails loudly (:class:`TrialError`) with the trial's parameters instead of skipping a trial.

How a prompt is assembled (pieces tokenized apart, then concatenated, so spans are exact)::

    [BOS] + template-before-context + haystack[:a] + needle + haystack[a:] + template-after-context

The part after the context holds the question. Each later piece is tokenized as a *continuation*
(behind an anchor whose ids are then dropped), so SentencePiece's dummy prefix or BPE's missing
leading space do not distort it; for ordinary text the result equals tokenizing the whole prompt.
The haystack is one long token stream per (haystack, tokenizer), tokenized once and cached; a
trial is a window of it that ends at a sentence end (the question follows a whole sentence) and
is cut at its start to reach the exact length. Depths are measured in haystack tokens; a placed
needle's actual depth is the share of the *other* context tokens that precede it, so 0 and 100
mean first and last.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
import re
import string
import unicodedata
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DATA_DIR",
    "DEFAULT_MAX_OFFSET",
    "DEFAULT_TEMPLATE",
    "FILLER_PATH",
    "NEEDLES_PATH",
    "PAPER_TEMPLATE",
    "BoundaryFallbackWarning",
    "Haystack",
    "Needle",
    "NeedleSet",
    "PlacedNeedle",
    "PromptTemplate",
    "Trial",
    "TrialError",
    "build_trial",
    "default_needles",
    "key_value_needles",
    "linspace_depths",
    "linspace_lengths",
    "load_needles",
    "make_grid",
    "tiny_needle_sets",
    "tiny_needles",
]

DATA_DIR = Path(__file__).parent / "data"
FILLER_PATH = DATA_DIR / "filler.txt"
NEEDLES_PATH = DATA_DIR / "needles.jsonl"

#: How far (in tokens) the seed may shift a trial's haystack window: it ends at a seeded sentence
#: end among this many tokens past the earliest possible end (at most one pass of a shorter
#: haystack); 0 always takes the earliest, like the reference code's "start of the haystack".
DEFAULT_MAX_OFFSET = 16384

#: Base-model prompt: the context in a delimited block, then the question and an answer cue.
DEFAULT_TEMPLATE = (
    "Below is a long text. Read it carefully.\n<text>{context}</text>\n"
    "Based on the text above, answer the question.\nQuestion: {question}\nAnswer:"
)
#: The wording of the reference implementation's base-model prompt (for reproducing the paper).
PAPER_TEMPLATE = (
    "This is a very long story book: <book>{context}</book>.\n"
    "Based on the content of the book, Question: {question}\nAnswer:"
)

# A sentence ends in a terminator, optionally followed by closing quotes or brackets.
_TERMINATORS = ".!?。！？…"
_CLOSERS = "\"'”’)]»"
_ENDS_SENTENCE = re.compile(rf"[{re.escape(_TERMINATORS)}][{re.escape(_CLOSERS)}]*$")
# Terminators that end a sentence without a following space (CJK full stops).
_WIDE_TERMINATORS = "。！？"
_SENTENCE = re.compile(
    rf"\S.*?(?:[{re.escape(_TERMINATORS)}]+[{re.escape(_CLOSERS)}]*(?=\s|$)|$)", re.S
)
_BLOCK_CHARS = 65536
_CONTEXT_MARK = "\u27e6RH-CONTEXT-7f3a\u27e7"


class TrialError(ValueError):
    """A trial cannot be built as asked. The message names the trial's parameters."""


class BoundaryFallbackWarning(UserWarning):
    """A needle went in at a plain token boundary: the haystack window has no sentence end."""


# --- needles -------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class PlacedNeedle:
    """A needle as placed in a trial's ``input_ids``."""

    needle: Needle
    role: str  # "target" | "distractor"
    span: tuple[int, int]  # token [start, end) of the needle sentence in input_ids
    answer_span: tuple[int, int]  # token [start, end) of its answer in input_ids
    depth_percent: float  # share of the other context tokens that precede this needle, in %

    def to_dict(self) -> dict[str, Any]:
        return {
            "needle": self.needle.to_dict(),
            "role": self.role,
            "span": list(self.span),
            "answer_span": list(self.answer_span),
            "depth_percent": self.depth_percent,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlacedNeedle:
        return cls(
            needle=_needle_from_dict(data["needle"]),
            role=data["role"],
            span=(int(data["span"][0]), int(data["span"][1])),
            answer_span=(int(data["answer_span"][0]), int(data["answer_span"][1])),
            depth_percent=float(data["depth_percent"]),
        )


@dataclass(frozen=True)
class Trial:
    """One tokenized prompt with every needle's position: the value scoring consumes.

    ``depth_percent`` and ``context_length`` are the requested values; each placed needle carries
    the depth it actually got. ``params`` (JSON-serialisable) holds everything that defines the
    trial; ``trial_id`` hashes it together with ``input_ids``. ``boundary`` is ``"sentence"`` or
    ``"token"`` (some needle went in at a plain token boundary: the haystack window had no sentence
    end). ``context_span`` is the token ``[start, end)`` of haystack plus needles.
    """

    trial_id: str
    input_ids: tuple[int, ...]
    needles: tuple[PlacedNeedle, ...]
    answer: str
    context_length: int
    depth_percent: float
    params: dict[str, Any]
    context_span: tuple[int, int] = (0, 0)
    boundary: str = "sentence"

    def __hash__(self) -> int:  # params is a dict, so hash by the id that digests everything
        return hash(self.trial_id)

    @property
    def targets(self) -> list[PlacedNeedle]:
        return [n for n in self.needles if n.role == "target"]

    @property
    def distractors(self) -> list[PlacedNeedle]:
        return [n for n in self.needles if n.role == "distractor"]

    @property
    def target(self) -> PlacedNeedle:
        """The first target needle (the only one in a single-needle trial)."""
        return self.targets[0]

    @property
    def answer_span(self) -> tuple[int, int]:
        return self.target.answer_span

    @property
    def answers(self) -> list[str]:
        """Every target's answer (graded with RULER's ``string_match_all``)."""
        return [n.needle.answer for n in self.targets]

    @property
    def question(self) -> str:
        return str(self.params["question"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial_id": self.trial_id,
            "input_ids": list(self.input_ids),
            "needles": [n.to_dict() for n in self.needles],
            "answer": self.answer,
            "context_length": self.context_length,
            "depth_percent": self.depth_percent,
            "params": self.params,
            "context_span": list(self.context_span),
            "boundary": self.boundary,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trial:
        return cls(
            trial_id=data["trial_id"],
            input_ids=tuple(int(i) for i in data["input_ids"]),
            needles=tuple(PlacedNeedle.from_dict(n) for n in data["needles"]),
            answer=data["answer"],
            context_length=int(data["context_length"]),
            depth_percent=float(data["depth_percent"]),
            params=dict(data["params"]),
            context_span=tuple(data.get("context_span", (0, 0))),  # type: ignore[arg-type]
            boundary=data.get("boundary", "sentence"),
        )


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


def _not_utf8(error: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (it holds byte {error.object[error.start]:#04x}; is it binary?)"


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
    rng = _rng("key_value_needles", seed, kind)
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


def tiny_needles(n: int, seed: int = 0, *, split: str = "test", n_values: int = 3) -> list[Needle]:
    """``n`` needles in the embedded model's synthetic language (``retrieval_heads.tiny.world``)."""
    return [s.targets[0] for s in tiny_needle_sets(n, seed, split=split, n_values=n_values)]


def tiny_needle_sets(
    n: int, seed: int = 0, *, split: str = "test", n_values: int = 3, n_distractors: int = 0
) -> list[NeedleSet]:
    """Like :func:`tiny_needles`, each with ``n_distractors`` of the world's own distractors."""
    from retrieval_heads.tiny import world  # lazy: only this adapter needs the tiny world

    def to_needle(d: dict[str, Any], needle_id: str) -> Needle:
        return Needle(needle_id, d["text"], d["question"], d["answer"])

    rng = random.Random(seed)  # targets: the same whatever n_distractors is
    sets = []
    for i in range(n):
        target = world.make_needle(rng, split=split, n_values=n_values)
        others = []
        if n_distractors:
            others = world.make_distractors(
                _rng("tiny-distractors", seed, i), target, n_distractors, split=split
            )
        base = f"tiny-{split}-s{seed}-{i}"
        sets.append(
            NeedleSet(
                targets=(to_needle(target, base),),
                distractors=tuple(to_needle(d, f"{base}-d{j}") for j, d in enumerate(others)),
                kind="multikey" if others else "single",
            )
        )
    return sets


# --- haystacks -----------------------------------------------------------------------------------


class _Replay:
    """Lets a one-shot iterator be read again (by a second tokenizer) by keeping what it gave."""

    def __init__(self, iterator: Iterator[str]):
        self._iterator = iterator
        self._seen: list[str] = []

    def __call__(self) -> Iterator[str]:
        i = 0
        while True:
            if i < len(self._seen):
                yield self._seen[i]
            else:
                try:
                    item = next(self._iterator)
                except StopIteration:
                    return
                self._seen.append(item)
                yield item
            i += 1


class Haystack:
    """A source of filler text: texts (documents, paragraphs or sentences) joined by ``sep``.

    A finite source is repeated when a context needs more text than it has; an endless one (a
    generator) is read as far as needed. Tokenized streams are cached per tokenizer on the
    instance, so reuse one ``Haystack`` for a whole grid.
    """

    def __init__(self, texts: Callable[[], Iterable[str]], *, name: str, sep: str = " "):
        self._texts = texts
        self.name = name
        self.sep = sep
        self._streams: weakref.WeakKeyDictionary[Any, _TokenStream] = weakref.WeakKeyDictionary()
        self._streams_by_id: dict[int, tuple[Any, _TokenStream]] = {}

    def __repr__(self) -> str:
        return f"Haystack({self.name!r})"

    # sources --------------------------------------------------------------------------------

    @classmethod
    def from_path(cls, path: str | Path, *, name: str | None = None) -> Haystack:
        """One ``.txt`` file, or every ``.txt`` file under a directory (sorted, recursive).

        Files are read as UTF-8; paragraphs (split at blank lines, stripped) are joined by one
        blank line, so the model sees the text's own layout, and files by a blank line too.
        """
        root = Path(path)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*.txt") if p.is_file())
            if not files:
                raise TrialError(f"haystack directory {str(root)!r} has no .txt files")
        elif root.is_file():
            files = [root]
        else:
            raise FileNotFoundError(f"haystack path {str(root)!r} does not exist")

        def texts() -> Iterator[str]:
            # Blocks of whole paragraphs (~64K characters): big enough that almost every junction
            # is tokenized in its natural context, small enough to read a huge file lazily.
            for file in files:
                block: list[str] = []
                size = 0
                try:
                    text = file.read_text(encoding="utf-8")
                except UnicodeDecodeError as error:
                    raise TrialError(
                        f"haystack file {str(file)!r}: {_not_utf8(error)}; a haystack is "
                        "UTF-8 .txt files"
                    ) from None
                for paragraph in re.split(r"\n\s*\n", text):
                    if paragraph.strip():
                        block.append(paragraph.strip())
                        size += len(block[-1])
                    if size >= _BLOCK_CHARS:
                        yield "\n\n".join(block)
                        block, size = [], 0
                if block:
                    yield "\n\n".join(block)

        # The name goes into trial ids: the base name, not the absolute path, so ids survive a move.
        return cls(texts, name=name or f"path:{root.resolve().name}", sep="\n\n")

    @classmethod
    def from_strings(
        cls, texts: Sequence[str], *, name: str | None = None, sep: str = " "
    ) -> Haystack:
        """A list of texts (sentences or documents), joined by ``sep``."""
        if isinstance(texts, str):
            texts = [texts]
        items = [t for t in texts if t.strip()]
        digest = hashlib.sha256("\x00".join(items).encode()).hexdigest()[:12]
        return cls(lambda: iter(items), name=name or f"strings:{digest}", sep=sep)

    @classmethod
    def from_generator(
        cls,
        source: Callable[[], Iterable[str]] | Iterator[str],
        *,
        name: str | None = None,
        sep: str = " ",
    ) -> Haystack:
        """Texts from a generator: a zero-argument callable returning a fresh iterator (best), or an
        iterator, whose items are remembered so that other tokenizers can read them again.
        May be endless."""
        if callable(source) and not isinstance(source, Iterator):
            factory = source
        else:
            factory = _Replay(iter(source))  # type: ignore[arg-type]
        label = name or f"generator:{getattr(source, '__qualname__', type(source).__name__)}"
        return cls(factory, name=label, sep=sep)  # type: ignore[arg-type]

    @classmethod
    def filler(cls) -> Haystack:
        """The plain filler text shipped with the package (essays written for this project)."""
        return _shared("filler", lambda: cls.from_path(FILLER_PATH, name="filler"))

    @classmethod
    def tiny(cls, seed: int = 0) -> Haystack:
        """The embedded model's synthetic language: endless sentences ending in ``" ."``."""

        def make() -> Haystack:
            from retrieval_heads.tiny import world  # lazy: only this source needs the tiny world

            return cls.from_generator(
                lambda: world.haystack_sentences(seed), name=f"tiny:seed={seed}", sep=" "
            )

        return _shared(f"tiny:{seed}", make)

    # reading --------------------------------------------------------------------------------

    def texts(self) -> Iterator[str]:
        """The source's texts in order (one pass; may be endless)."""
        for text in self._texts():
            if text and text.strip():
                yield text

    def sentences(self) -> Iterator[str]:
        """The texts split into sentences at terminators followed by space (one pass)."""
        for text in self.texts():
            for match in _SENTENCE.finditer(text):
                sentence = match.group().strip()
                if sentence:
                    yield sentence

    def _stream(self, tokenizer: Any) -> _TokenStream:
        try:
            stream = self._streams.get(tokenizer)
            if stream is None:
                stream = self._streams[tokenizer] = _TokenStream(self)
            return stream
        except TypeError:  # tokenizer not weak-referenceable or not hashable: keep it alive
            entry = self._streams_by_id.get(id(tokenizer))
            if entry is None or entry[0] is not tokenizer:
                entry = self._streams_by_id[id(tokenizer)] = (tokenizer, _TokenStream(self))
            return entry[1]


_SHARED: dict[str, Haystack] = {}


def _shared(key: str, make: Callable[[], Haystack]) -> Haystack:
    """Built-in haystacks are singletons so their token caches are shared across calls."""
    if key not in _SHARED:
        _SHARED[key] = make()
    return _SHARED[key]


class _EmptyHaystack(Exception):
    pass


class _TokenStream:
    """One haystack as an (endlessly repeating) token stream for one tokenizer, grown on demand.

    ``boundaries`` are the positions where a sentence starts (0 counts: a text starts there),
    found by decoding: position ``i`` is a boundary if token ``i-1`` decodes to text ending in a
    terminator and the text of tokens ``i-1, i`` has whitespace at the junction.
    """

    def __init__(self, haystack: Haystack):
        self.haystack = haystack
        self.ids: list[int] = []
        self.boundaries: list[int] = [0]
        self.cycle_len: int | None = None  # set once a finite source has been read to its end
        self._source: Iterator[str] | None = None

    def ensure(self, tok: _Tok, n: int) -> None:
        """Grow the stream to at least ``n`` tokens."""
        while len(self.ids) < n:
            if self.cycle_len is None:
                if self._source is None:
                    self._source = self.haystack.texts()
                text = next(self._source, None)
                if text is None:
                    if not self.ids:
                        raise _EmptyHaystack
                    self.cycle_len = len(self.ids)
                    continue
                sep = self.haystack.sep
                piece = text if text[:1].isspace() else sep + text
                new = tok.continuation(piece, cache=False)
            else:  # repeat the finite source
                new = self.ids[: self.cycle_len]
            self._append(tok, new)

    def _append(self, tok: _Tok, new: list[int]) -> None:
        start = len(self.ids)
        self.ids.extend(new)
        ids, is_boundary = self.ids, tok.is_boundary
        for i in range(max(start, 1), len(ids)):
            if is_boundary(ids[i - 1], ids[i]):
                self.boundaries.append(i)


# --- tokenizer helpers ---------------------------------------------------------------------------

_TOK_CACHES: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


class _Tok:
    """A tokenizer with the per-tokenizer caches this module needs (kept while it lives)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        try:
            caches = _TOK_CACHES.get(tokenizer)
            if caches is None:
                caches = _TOK_CACHES[tokenizer] = {}
        except TypeError:
            caches = {}
        self._piece: dict[str, list[int]] = caches.setdefault("piece", {})
        self._ends: dict[int, bool] = caches.setdefault("ends", {})
        self._pairs: dict[tuple[int, int], bool] = caches.setdefault("pairs", {})
        self._caches = caches

    @property
    def name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__)

    def encode(self, text: str) -> list[int]:
        """Token ids without special tokens (no "longer than the model" warning: a haystack
        chunk is not a model input)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False, verbose=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return list(self.tokenizer.convert_ids_to_tokens(list(ids)))

    @property
    def bos(self) -> list[int]:
        """Ids the tokenizer puts before a text (BOS, CLS, ...); ones after it (EOS) are dropped."""
        if "bos" not in self._caches:
            plain = self.encode("a")
            full = list(self.tokenizer.encode("a"))
            at = _find(full, plain)
            self._caches["bos"] = full[:at] if at >= 0 else []
        return self._caches["bos"]

    def continuation(self, text: str, cache: bool = True) -> list[int]:
        """Ids of ``text`` as it tokenizes *after* other text (not at the start of the input).

        Tokenizers treat the start of a string specially (SentencePiece's dummy prefix, BPE's
        missing leading space), so ``text`` is encoded behind an anchor and the anchor's ids are
        removed; an anchor whose ids do not survive as a prefix is skipped.
        """
        if cache and text in self._piece:
            return self._piece[text]
        ids = None
        for anchor in (".", "\n", "a", "0"):
            head = self.encode(anchor)
            full = self.encode(anchor + text)
            if head and full[: len(head)] == head:
                ids = full[len(head) :]
                break
        if ids is None:
            ids = self.encode(text)
        if cache:
            self._piece[text] = ids
        return ids

    def ends_sentence(self, token_id: int) -> bool:
        flag = self._ends.get(token_id)
        if flag is None:
            flag = self._ends[token_id] = bool(
                _ENDS_SENTENCE.search(self.decode([token_id]).rstrip())
            )
        return flag

    def is_boundary(self, a: int, b: int) -> bool:
        """Does a sentence start at token ``b`` when it follows token ``a``? Found by decoding."""
        if not self.ends_sentence(a):
            return False
        key = (a, b)
        flag = self._pairs.get(key)
        if flag is None:
            first, pair = self.decode([a]), self.decode([a, b])
            if first[-1:].isspace() or first.rstrip()[-1:] in _WIDE_TERMINATORS:
                flag = True
            elif pair.startswith(first):
                flag = pair[len(first) : len(first) + 1].isspace()
            else:  # decoders that rewrite the junction: look for terminator + space in the pair
                flag = bool(
                    re.search(rf"[{re.escape(_TERMINATORS)}][{re.escape(_CLOSERS)}]*\s", pair)
                )
            self._pairs[key] = flag
        return flag


def _find(haystack: Sequence[int], needle: Sequence[int]) -> int:
    """Index of the first occurrence of ``needle`` as a contiguous run in ``haystack``, or -1."""
    n = len(needle)
    if n == 0:
        return 0
    first = needle[0]
    for i in range(len(haystack) - n + 1):
        if haystack[i] == first and list(haystack[i : i + n]) == list(needle):
            return i
    return -1


def check_trial_tokens(trial: Trial, tokenizer: Any, vocab_rows: int, model_name: str) -> None:
    """Refuse a trial tokenized by another model's tokenizer: its ids would mean other words
    (or index past the embedding), and its answer span would not be the answer."""
    top = max(trial.input_ids)
    start, end = trial.answer_span
    seen = tokenizer.decode(list(trial.input_ids[start:end]))
    answer = trial.target.needle.answer
    seen_c, answer_c = _canon(seen), _canon(answer)
    if top >= vocab_rows or (answer_c not in seen_c and seen_c not in answer_c) or not seen_c:
        found = f"token id {top}" if top >= vocab_rows else f"its answer span reads {seen!r}"
        raise TrialError(
            f"trial {trial.trial_id!r} was not tokenized for {model_name}: {found} where "
            f"{answer!r} should be; build its trials with make_trials(model, ...) for this model"
        )


def _canon(text: str) -> str:
    """Text modulo whitespace, SentencePiece's '▁', Unicode form and case (decoders differ
    in exactly these; a lost character or an unknown token still shows)."""
    return unicodedata.normalize("NFKC", re.sub(r"[\s\u2581]+", "", text)).casefold()


# --- prompt templates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTemplate:
    """How context and question become the prompt.

    ``text`` is a format string with exactly one ``{context}`` and one ``{question}`` (``{{``/``}}``
    for literal braces). With ``chat=False`` (base models) the tokenizer's own leading special
    tokens (BOS) are put in front. With ``chat=True`` the formatted text becomes the user message of
    ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` (with ``system`` as a system
    message if given) and the rendered template decides the special tokens, BOS included, as
    ``apply_chat_template(tokenize=True)`` does. ``response_prefix`` is appended after the
    generation prompt in chat mode (e.g. ``"Answer:"``; base templates hold it in ``text``).
    """

    text: str = DEFAULT_TEMPLATE
    chat: bool = False
    system: str | None = None
    response_prefix: str = ""
    name: str = "default"

    def __post_init__(self) -> None:
        fields = [f for _, f, _, _ in string.Formatter().parse(self.text) if f is not None]
        if sorted(fields) != ["context", "question"]:
            raise TrialError(
                f"prompt template {self.name!r} must contain {{context}} and {{question}} exactly "
                f"once each and no other fields; found {fields}"
            )

    @classmethod
    def paper(cls) -> PromptTemplate:
        """The reference implementation's wording."""
        return cls(PAPER_TEMPLATE, name="paper")

    @classmethod
    def tiny(cls) -> PromptTemplate:
        """The embedded model's template (its training format: context, then question)."""
        from retrieval_heads.tiny import world  # lazy

        return cls(world.PROMPT_TEMPLATE, name="tiny")

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "chat": self.chat,
            "system": self.system,
            "response_prefix": self.response_prefix,
            "name": self.name,
        }

    def split(self, tokenizer: Any, question: str) -> tuple[str, str]:
        """The prompt text before and after the context, question filled in."""
        filled = self.text.format(context=_CONTEXT_MARK, question=question)
        if self.chat:
            if not getattr(tokenizer, "chat_template", None):
                raise TrialError(
                    f"prompt template {self.name!r} asks for the chat template, but "
                    "the tokenizer has none"
                )
            messages = [{"role": "user", "content": filled}]
            if self.system:
                messages.insert(0, {"role": "system", "content": self.system})
            filled = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            if not isinstance(filled, str):
                raise TrialError("apply_chat_template(tokenize=False) did not return a string")
            filled += self.response_prefix
        if filled.count(_CONTEXT_MARK) != 1:
            raise TrialError(f"the rendered prompt of template {self.name!r} lost its context slot")
        before, after = filled.split(_CONTEXT_MARK)
        # The context brings its own leading space (its first token is a continuation token).
        return before.rstrip(" "), after


# --- building trials -----------------------------------------------------------------------------


def _rng(*parts: Any) -> random.Random:
    """A generator seeded by a stable hash of ``parts`` (not Python's salted ``hash``)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _as_set(needle: Needle | NeedleSet | Sequence[Needle]) -> NeedleSet:
    if isinstance(needle, NeedleSet):
        return needle
    if isinstance(needle, Needle):
        return NeedleSet((needle,))
    needles = tuple(needle)
    if not needles or not all(isinstance(n, Needle) for n in needles):
        raise TrialError(f"expected a Needle, a NeedleSet or a list of Needles, got {needle!r}")
    return NeedleSet(needles, kind="multi" if len(needles) > 1 else "single")


def _default_question(targets: Sequence[Needle]) -> str:
    questions = list(dict.fromkeys(n.question for n in targets))
    return " ".join(questions)


def build_trial(
    tokenizer: Any,
    haystack: Haystack,
    needle: Needle | NeedleSet | Sequence[Needle],
    *,
    length: int,
    depth_percent: float,
    distractors: Sequence[Needle] = (),
    template: PromptTemplate | None = None,
    seed: int = 0,
    n_ctx: int | None = None,
    question: str | None = None,
    max_offset: int = DEFAULT_MAX_OFFSET,
) -> Trial:
    """Build one trial of exactly ``length`` tokens with the needle at ``depth_percent``.

    ``needle`` is one target, several targets (a list: multi-value / multi-query), or a
    :class:`NeedleSet` (its distractors are added to ``distractors``). The first target goes in at
    the sentence boundary nearest before ``depth_percent`` of the haystack tokens (the context's
    start counts as one); other targets and distractors at other seeded random sentence
    boundaries. The haystack window ends at a sentence end chosen from ``seed`` (within
    ``max_offset`` tokens of the earliest possible one; ``max_offset=0``: the earliest), so one
    seed gives the same haystack to every depth and needle of one length, and the question always
    follows a whole sentence; the window may open mid-sentence. ``length`` counts everything:
    BOS, template, question, haystack and needles. ``n_ctx`` (the model's context window) only
    bounds ``length``. Raises :class:`TrialError` when the trial cannot be built; warns
    :class:`BoundaryFallbackWarning` (and sets ``Trial.boundary = "token"``) when the window has
    no sentence boundary to use.
    """
    needle_set = _as_set(needle)
    template = template or PromptTemplate()
    targets = needle_set.targets
    others = tuple(needle_set.distractors) + tuple(distractors)
    question = question or needle_set.question or _default_question(targets)
    all_ids = [n.needle_id for n in (*targets, *others)]
    where = (
        f"(needle={all_ids[0] if len(all_ids) == 1 else all_ids}, length={length}, "
        f"depth_percent={depth_percent}, seed={seed}, haystack={haystack.name!r})"
    )

    def fail(message: str) -> TrialError:
        return TrialError(f"cannot build trial {where}: {message}")

    if len(set(all_ids)) != len(all_ids):
        raise fail(f"needle ids repeat: {all_ids}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise fail(f"length must be a positive integer, got {length!r}")
    if not isinstance(depth_percent, (int, float)) or not 0 <= depth_percent <= 100:
        raise fail(f"depth_percent must be within 0..100, got {depth_percent!r}")
    if n_ctx is not None and length > n_ctx:
        raise fail(f"target length {length} exceeds the model's context window n_ctx={n_ctx}")
    if max_offset < 0:
        raise fail(f"max_offset must be >= 0, got {max_offset}")
    depth = float(depth_percent)
    tok = _Tok(tokenizer)

    # Needles: tokenized as they appear after a sentence end, answer located inside.
    tokenized: list[tuple[Needle, str, list[int], tuple[int, int]]] = []
    for role, group in (("target", targets), ("distractor", others)):
        for n in group:
            ids = tok.continuation(" " + n.text)
            tokenized.append((n, role, ids, _locate_answer(tok, n, ids, fail)))

    # Template: before the context (start of input) and after it (question included).
    before, after = template.split(tokenizer, question)
    bos = [] if template.chat else tok.bos
    before_ids = tok.encode(before) if before else []
    after_ids = tok.continuation(after) if after else []
    fixed = len(bos) + len(before_ids) + len(after_ids)
    needle_tokens = sum(len(ids) for _, _, ids, _ in tokenized)
    n_hay = length - fixed - needle_tokens
    if n_hay < 1:
        raise fail(
            f"needles ({needle_tokens} tokens) plus template and question ({fixed} tokens) leave "
            f"{n_hay} haystack tokens; the target length must be at least "
            f"{fixed + needle_tokens + 1}"
        )

    # Haystack window: it ends at a sentence end (so the question follows a whole sentence),
    # chosen from the seed among the sentence ends within max_offset tokens of the earliest.
    stream = haystack._stream(tokenizer)
    offset_rng = _rng("offset", seed)
    try:
        stream.ensure(tok, max_offset + 1)
        limit = max_offset if stream.cycle_len is None else min(max_offset, stream.cycle_len - 1)
        stream.ensure(tok, n_hay + limit + 1)
        bounds = stream.boundaries  # grows in place as the stream grows
        ends = bounds[
            bisect.bisect_left(bounds, n_hay) : bisect.bisect_right(bounds, n_hay + limit)
        ]
        if not ends:  # no sentence end in range: take the next one, if any comes soon
            stream.ensure(tok, n_hay + limit + DEFAULT_MAX_OFFSET + 1)
            ends = bounds[bisect.bisect_right(bounds, n_hay + limit) :][:1]
            ends = [e for e in ends if e <= n_hay + limit + DEFAULT_MAX_OFFSET]
    except _EmptyHaystack:
        raise fail("the haystack is empty (no text)") from None
    end = offset_rng.choice(ends) if ends else n_hay + offset_rng.randrange(limit + 1)
    start = end - n_hay
    window = stream.ids[start:end]
    inner = bounds[bisect.bisect_right(bounds, start) : bisect.bisect_right(bounds, end)]
    # Insertion points: the context start, then every sentence start inside the window.
    sentence_starts = [0] + [x - start for x in inner]
    has_sentences = len(sentence_starts) > 1

    # Positions (in haystack tokens) for the first target, then the other needles.
    target_at = depth / 100 * n_hay
    boundary = "sentence"
    if has_sentences:
        first = sentence_starts[bisect.bisect_right(sentence_starts, target_at + 1e-9) - 1]
    else:
        first = min(n_hay, math.floor(target_at + 1e-9))
        if first != 0:
            boundary = "token"
    positions = [first]
    place_rng = _rng("place", seed, length, depth, all_ids)
    rest = len(tokenized) - 1
    if rest:
        if has_sentences:
            free = [b for b in sentence_starts if b != first]
            if len(free) >= rest:
                positions += place_rng.sample(free, rest)
            else:
                positions += [place_rng.choice(sentence_starts) for _ in range(rest)]
        else:
            positions += [place_rng.randrange(n_hay + 1) for _ in range(rest)]
            if any(p != 0 for p in positions):
                boundary = "token"
    if boundary == "token":
        warnings.warn(
            f"haystack {haystack.name!r} has no sentence boundary in a {n_hay}-token window for "
            f"tokenizer {tok.name!r}; needles placed at token boundaries (Trial.boundary='token')",
            BoundaryFallbackWarning,
            stacklevel=2,
        )

    # Assemble.
    out: list[int] = [*bos, *before_ids]
    context_start = len(out)
    spans: list[tuple[int, int]] = [(0, 0)] * len(tokenized)
    previous = 0
    for index in sorted(range(len(tokenized)), key=lambda i: (positions[i], i)):
        at = positions[index]
        out.extend(window[previous:at])
        spans[index] = (len(out), len(out) + len(tokenized[index][2]))
        out.extend(tokenized[index][2])
        previous = at
    out.extend(window[previous:])
    context_end = len(out)
    out.extend(after_ids)
    if len(out) != length:  # pragma: no cover - guarded by construction
        raise fail(f"internal error: built {len(out)} tokens instead of {length}")

    context_tokens = context_end - context_start
    placed = []
    for (n, role, ids, (a0, a1)), (s, e) in zip(tokenized, spans, strict=True):
        rest_tokens = context_tokens - len(ids)
        actual = 100.0 * (s - context_start) / rest_tokens if rest_tokens else 0.0
        placed.append(PlacedNeedle(n, role, (s, e), (s + a0, s + a1), actual))

    params: dict[str, Any] = {
        "length": length,
        "depth_percent": depth,
        "seed": seed,
        "max_offset": max_offset,
        "haystack": haystack.name,
        "haystack_offset": start,
        "tokenizer": tok.name,
        "tokenizer_class": type(tokenizer).__name__,
        "template": template.to_dict(),
        "question": question,
        "kind": needle_set.kind,
        "needles": [{"role": role, **n.to_dict()} for n, role, _, _ in tokenized],
    }
    if template.chat:
        params["chat_template_sha"] = hashlib.sha256(
            str(tokenizer.chat_template).encode()
        ).hexdigest()[:16]
    answer = ", ".join(n.answer for n in targets)
    return Trial(
        trial_id=_trial_id(params, out),
        input_ids=tuple(out),
        needles=tuple(placed),
        answer=answer,
        context_length=length,
        depth_percent=depth,
        params=params,
        context_span=(context_start, context_end),
        boundary=boundary,
    )


def _locate_answer(
    tok: _Tok, needle: Needle, needle_ids: list[int], fail: Callable[[str], TrialError]
) -> tuple[int, int]:
    """Token ``[start, end)`` of the answer inside the needle's ids.

    The answer is tokenized on its own as the model would write it (behind a space when the
    needle has one before it) and must appear as a contiguous run of the needle's ids; otherwise the
    copy the retrieval score looks for cannot happen token by token, and the error shows both.
    """
    at = needle.text.find(needle.answer)
    spaced = at == 0 or needle.text[at - 1].isspace()
    candidates = [tok.continuation(" " + needle.answer)] if spaced else []
    candidates += [tok.continuation(needle.answer), tok.encode(needle.answer)]
    candidates = [ids for ids in candidates if ids]
    alone = candidates[0]
    if _canon(tok.decode(alone)) != _canon(needle.answer):
        raise fail(
            f"answer {needle.answer!r} of needle {needle.needle_id!r} does not survive "
            f"tokenization: its tokens {tok.pieces(alone)} decode to {tok.decode(alone)!r}"
        )
    if _canon(tok.decode(needle_ids)) != _canon(needle.text):
        raise fail(
            f"needle {needle.needle_id!r} does not survive tokenization: "
            f"{needle.text!r} decodes to {tok.decode(needle_ids)!r}"
        )
    for ids in candidates:
        offset = _find(needle_ids, ids)
        if offset >= 0:
            return offset, offset + len(ids)
    raise fail(
        f"the answer {needle.answer!r} of needle {needle.needle_id!r} tokenizes differently in "
        f"context:\n  answer alone:      {alone} {tok.pieces(alone)}\n"
        f"  needle in context: {needle_ids} {tok.pieces(needle_ids)}"
    )


def _trial_id(params: dict[str, Any], input_ids: Sequence[int]) -> str:
    """Hash of the parameters and the ids. The tokenizer enters through the ids, not its name,
    which is often a local path: the same trial built on another machine keeps its id."""
    params = {k: v for k, v in params.items() if k not in ("tokenizer", "tokenizer_class")}
    ids_digest = hashlib.sha256(",".join(map(str, input_ids)).encode()).hexdigest()
    blob = json.dumps({"params": params, "input_ids": ids_digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- grids ---------------------------------------------------------------------------------------


def linspace_lengths(min_length: int, max_length: int, n: int) -> list[int]:
    """``n`` evenly spaced lengths from ``min_length`` to ``max_length``, rounded, duplicates
    dropped (so fewer than ``n`` when the range is narrow)."""
    if n < 1 or min_length < 1 or max_length < min_length:
        raise TrialError(
            f"linspace_lengths needs 1 <= min <= max and n >= 1, got "
            f"({min_length}, {max_length}, {n})"
        )
    if n == 1:
        return [int(min_length)]
    values = [round(min_length + (max_length - min_length) * i / (n - 1)) for i in range(n)]
    return list(dict.fromkeys(int(v) for v in values))


def linspace_depths(n: int) -> list[float]:
    """``n`` evenly spaced depths from 0 to 100 percent (``[0.0]`` for ``n == 1``)."""
    if n < 1:
        raise TrialError(f"linspace_depths needs n >= 1, got {n}")
    if n == 1:
        return [0.0]
    return [100.0 * i / (n - 1) for i in range(n)]


def make_grid(
    tokenizer: Any,
    haystack: Haystack,
    needles: Sequence[Needle | NeedleSet],
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    n_distractors: int = 0,
    distractor_pool: Sequence[Needle] | None = None,
    seed: int = 0,
    template: PromptTemplate | None = None,
    n_ctx: int | None = None,
    max_offset: int = DEFAULT_MAX_OFFSET,
) -> list[Trial]:
    """Trials for every length × depth × needle, in that nesting order (needle innermost).

    Items without their own distractors get ``n_distractors`` other needles as distractors, from
    ``distractor_pool`` (default: the needles of the grid), seeded per needle, so the same ones
    at every length and depth, skipping needles that share the target's question or answer. Repeated lengths, depths or needle ids are an
    error, since they would give repeated trial ids.
    """
    items = [_as_set(n) for n in needles]
    if not items:
        raise TrialError("make_grid needs at least one needle")
    for label, values in (("lengths", list(lengths)), ("depths", [float(d) for d in depths])):
        if not values:
            raise TrialError(f"make_grid needs at least one of {label}")
        if len(set(values)) != len(values):
            raise TrialError(f"make_grid: repeated {label} {values}")
    keys = [tuple(n.needle_id for n in s.targets) for s in items]
    if len(set(keys)) != len(keys):
        raise TrialError(f"make_grid: repeated needles {keys}")
    pool = [n for s in items for n in s.targets]
    if distractor_pool is not None:
        pool = list(distractor_pool) + pool

    resolved: list[NeedleSet] = []
    for key, item in zip(keys, items, strict=True):
        if item.distractors or n_distractors == 0:
            resolved.append(item)
            continue
        taken_q = {n.question for n in item.targets}
        taken_a = {n.answer for n in item.targets}
        candidates = [n for n in pool if n.question not in taken_q and n.answer not in taken_a]
        candidates = list({n.needle_id: n for n in candidates}.values())
        if len(candidates) < n_distractors:
            raise TrialError(
                f"make_grid: needle {item.targets[0].needle_id!r} needs {n_distractors} "
                f"distractors but only {len(candidates)} other needles can serve"
            )
        chosen = _rng("distractors", seed, key).sample(candidates, n_distractors)
        resolved.append(
            NeedleSet(
                item.targets,
                tuple(chosen),
                item.question,
                "multikey" if item.kind == "single" else item.kind,
            )
        )

    trials = []
    for length in lengths:
        for depth in depths:
            for item in resolved:
                trials.append(
                    build_trial(
                        tokenizer,
                        haystack,
                        item,
                        length=int(length),
                        depth_percent=float(depth),
                        template=template,
                        seed=seed,
                        n_ctx=n_ctx,
                        max_offset=max_offset,
                    )
                )
    return trials


def tiny_grid(
    tokenizer: Any,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    n_needles: int = 4,
    n_distractors: int = 2,
    seed: int = 0,
    split: str = "test",
) -> list[Trial]:
    """The embedded model's NIAH grid: its own haystack, needles with distractors and template."""
    needles = tiny_needle_sets(n_needles, seed, split=split, n_distractors=n_distractors)
    return make_grid(
        tokenizer,
        Haystack.tiny(seed),
        needles,
        lengths=lengths,
        depths=depths,
        seed=seed,
        template=PromptTemplate.tiny(),
    )
