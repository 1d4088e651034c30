"""Prompt templates: how the context and the question become the prompt's text.

Owns :class:`PromptTemplate` (base-model text, or the tokenizer's chat template) and the shipped
wordings (:data:`DEFAULT_TEMPLATE`, :data:`PAPER_TEMPLATE`). It splits a prompt around its
context slot and never tokenizes; the embedded model's template is
:func:`retrieval_heads.tiny.trials.tiny_template`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from retrieval_heads.trials.base import TrialError

__all__ = ["DEFAULT_TEMPLATE", "PAPER_TEMPLATE", "PromptTemplate"]

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
_CONTEXT_MARK = "\u27e6RH-CONTEXT-7f3a\u27e7"


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
