"""The tokenizer adapter: any Hugging Face tokenizer seen through the few operations trials need.

Owns ``_Tok`` (encode and decode without surprises, ids of a text as it tokenizes *after* other
text, the tokenizer's leading special tokens, sentence boundaries found by **decoding** tokens,
with per-tokenizer caches), what ends a sentence (in text and in tokens), and ``_canon`` (text
modulo what decoders differ in). It knows no needle, haystack or template.
"""

from __future__ import annotations

import re
import unicodedata
import weakref
from collections.abc import Sequence
from typing import Any

# A sentence ends in a terminator, optionally followed by closing quotes or brackets.
_TERMINATORS = ".!?。！？…"
_CLOSERS = "\"'”’)]»"
_ENDS_SENTENCE = re.compile(rf"[{re.escape(_TERMINATORS)}][{re.escape(_CLOSERS)}]*$")
# Terminators that end a sentence without a following space (CJK full stops).
_WIDE_TERMINATORS = "。！？"
_SENTENCE = re.compile(
    rf"\S.*?(?:[{re.escape(_TERMINATORS)}]+[{re.escape(_CLOSERS)}]*(?=\s|$)|$)", re.S
)

_TOK_CACHES: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


class _Tok:
    """A tokenizer with the per-tokenizer caches the trial modules need (kept while it lives)."""

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


def _canon(text: str) -> str:
    """Text modulo whitespace, SentencePiece's '▁', Unicode form and case (decoders differ
    in exactly these; a lost character or an unknown token still shows)."""
    return unicodedata.normalize("NFKC", re.sub(r"[\s\u2581]+", "", text)).casefold()
