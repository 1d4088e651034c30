"""The built trial as a value: :class:`Trial` and its :class:`PlacedNeedle` s, and their JSON form.

A ``Trial`` is what crosses from trial building to scoring, the KV-cache what-if and the views:
the tokenized prompt with every needle's token span. This module never builds one (see
:mod:`retrieval_heads.trials.builder`) and never tokenizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from retrieval_heads.trials.needles import Needle, _needle_from_dict

__all__ = ["PlacedNeedle", "Trial"]


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
            context_span=tuple(data.get("context_span", (0, 0))),
            boundary=data.get("boundary", "sentence"),
        )
