"""Haystack sources and their token streams.

Owns :class:`Haystack` (filler text from files, strings or generators, and the shipped filler),
the built-in haystacks' shared instances, and ``_TokenStream``: one haystack as an endlessly
repeating token stream per tokenizer, tokenized once, grown on demand, with its sentence starts.
It never places a needle and knows no synthetic world (the embedded model's haystack is
:func:`retrieval_heads.tiny.trials.tiny_haystack`).
"""

from __future__ import annotations

import hashlib
import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from retrieval_heads.trials.base import DATA_DIR, TrialError, _not_utf8
from retrieval_heads.trials.tokens import _SENTENCE, _Tok

__all__ = ["FILLER_PATH", "Haystack"]

FILLER_PATH = DATA_DIR / "filler.txt"
_BLOCK_CHARS = 65536


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
            factory = _Replay(iter(source))
        label = name or f"generator:{getattr(source, '__qualname__', type(source).__name__)}"
        return cls(factory, name=label, sep=sep)

    @classmethod
    def filler(cls) -> Haystack:
        """The plain filler text shipped with the package (essays written for this project)."""
        return _shared("filler", lambda: cls.from_path(FILLER_PATH, name="filler"))

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
