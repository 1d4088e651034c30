"""The per-trial record: :class:`TrialRecord`, as ``scoring.py`` yields it and ``trials.jsonl``
stores it.

One decoded trial: its parameters, what was generated, the grade, the per-scorer
``[layer][head]`` scores and the copy events ``(step, layer, head, key_position)``; its JSON form
(one ``trials.jsonl`` line, one ``trials/<id>.json`` file) and its validation, whose errors name
the file and the field.

It never aggregates trials (:mod:`~retrieval_heads.scores` does) and never reads or writes a file
(:mod:`~retrieval_heads.store` does).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_heads.conditions import (
    ConditionError,
    RecordCondition,
    condition_from_dict,
    upgrade_legacy,
)
from retrieval_heads.files import ResultsError, _dumps, _fmt_source, _is_number, _jsonable
from retrieval_heads.heads import Head

__all__ = ["TrialRecord"]


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_legacy(params: Any, scores: Any) -> bool:
    """A record of a file written before conditions were typed (they lived in params)."""
    return (
        isinstance(params, dict)
        and isinstance(scores, dict)
        and ("base_trial_id" in params or params.get("task") == "cot")
    )


@dataclasses.dataclass
class TrialRecord:
    """One decoded trial, as ``scoring.py`` yields it and ``trials.jsonl`` stores it.

    ``scores`` maps a scorer name to a ``[layer][head]`` table; ``"retrieval"`` is always there,
    except in records of tasks that have no head scores (chain of thought, memorised facts,
    chains), whose ``scores`` are empty. ``condition`` is what the run changed
    (:mod:`~retrieval_heads.conditions`; ``None`` for a detection of the unchanged model).
    ``copy_events`` are ``(step, layer, head, key_position)``: at decode step ``step`` head
    ``(layer, head)`` put its argmax attention on ``key_position`` inside the answer span and
    the token there was the one generated.
    """

    trial_id: str
    params: dict[str, Any]
    expected: str
    generated_ids: list[int]
    generated_text: str
    passed: bool
    recall: float
    reason: str | None
    scores: dict[str, list[list[float]]]
    copy_events: list[tuple[int, int, int, int]]
    n_layers: int
    n_heads: int
    elapsed_s: float = 0.0
    condition: RecordCondition | None = None

    def __post_init__(self) -> None:
        # Accept what a scorer naturally hands over (numpy tables, tuples); store plain lists.
        if isinstance(self.scores, Mapping):
            self.scores = {
                k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in self.scores.items()
            }
        if isinstance(self.generated_ids, (np.ndarray, tuple)):
            self.generated_ids = [int(t) for t in self.generated_ids]
        if isinstance(self.copy_events, np.ndarray):
            self.copy_events = [tuple(int(v) for v in e) for e in self.copy_events]
        elif isinstance(self.copy_events, tuple):
            self.copy_events = list(self.copy_events)
        if isinstance(self.passed, np.bool_):
            self.passed = bool(self.passed)

    def score_array(self, scorer: str = "retrieval") -> np.ndarray:
        """The ``[layer, head]`` table of one scorer as a float64 array."""
        if scorer not in self.scores:
            raise KeyError(
                f"trial {self.trial_id!r} has no scorer {scorer!r}; it has {sorted(self.scores)}"
            )
        return np.asarray(self.scores[scorer], dtype=np.float64)

    def active_heads(self) -> set[Head]:
        """Heads with at least one copy event in this trial."""
        return {Head(int(e[1]), int(e[2])) for e in self.copy_events}

    def validate(self, source: str | Path | None = None) -> TrialRecord:
        """Raise :class:`ResultsError` naming ``source`` and the field if anything is malformed."""
        where = f"trial record {self.trial_id!r} in {_fmt_source(source)}"

        def fail(msg: str) -> None:
            raise ResultsError(f"{where}: {msg}")

        if not isinstance(self.trial_id, str) or not self.trial_id:
            raise ResultsError(
                f"trial record in {_fmt_source(source)}: trial_id must be a non-empty string, "
                f"got {self.trial_id!r}"
            )
        if not isinstance(self.params, dict):
            fail(f"params must be an object, got {type(self.params).__name__}")
        try:  # what to_json() will need: NaN or infinity would fail only when written
            _dumps(_jsonable(self.params))
        except ValueError:
            fail("params must hold finite numbers only (NaN and infinity are not JSON)")
        if not isinstance(self.expected, str):
            fail("expected must be a string")
        if not isinstance(self.generated_text, str):
            fail("generated_text must be a string")
        if not isinstance(self.generated_ids, list) or not all(
            _is_int(t) for t in self.generated_ids
        ):
            fail("generated_ids must be a list of integers")
        if not isinstance(self.passed, bool):
            fail(f"passed must be true or false, got {self.passed!r}")
        if not _is_number(self.recall) or not math.isfinite(self.recall):
            fail(f"recall must be a finite number, got {self.recall!r}")
        if self.reason is not None and not isinstance(self.reason, str):
            fail("reason must be a string or null")
        for name in ("n_layers", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(f"{name} must be a positive integer, got {value!r}")
        if not _is_number(self.elapsed_s) or not math.isfinite(self.elapsed_s):
            fail(f"elapsed_s must be a finite number, got {self.elapsed_s!r}")
        if not isinstance(self.scores, dict) or (self.scores and "retrieval" not in self.scores):
            fail("scores must be an object: empty, or with at least the 'retrieval' scorer")
        for scorer, table in self.scores.items():
            if not isinstance(table, list) or len(table) != self.n_layers:
                fail(f"scores[{scorer!r}] must be a list of {self.n_layers} layers")
            for layer, row in enumerate(table):
                if not isinstance(row, list) or len(row) != self.n_heads:
                    fail(f"scores[{scorer!r}][{layer}] must be a list of {self.n_heads} heads")
                for head, x in enumerate(row):
                    if not _is_number(x) or not math.isfinite(x):
                        fail(f"scores[{scorer!r}][{layer}][{head}] is not a finite number: {x!r}")
        if not isinstance(self.copy_events, list):
            fail("copy_events must be a list")
        for i, event in enumerate(self.copy_events):
            if (
                not isinstance(event, (list, tuple))
                or len(event) != 4
                or not all(_is_int(v) for v in event)
            ):
                fail(f"copy_events[{i}] must be [step, layer, head, key_position], got {event!r}")
            if not (0 <= event[1] < self.n_layers and 0 <= event[2] < self.n_heads):
                fail(f"copy_events[{i}] names head {event[1]}.{event[2]}, outside the model")
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (fixed key order), the form of one ``trials.jsonl`` line."""
        condition = {} if self.condition is None else {"condition": self.condition.to_dict()}
        return {
            "trial_id": self.trial_id,
            "params": _jsonable(self.params),
            **condition,
            "expected": self.expected,
            "generated_ids": [int(t) for t in self.generated_ids],
            "generated_text": self.generated_text,
            "passed": bool(self.passed),
            "recall": float(self.recall),
            "reason": self.reason,
            "n_layers": int(self.n_layers),
            "n_heads": int(self.n_heads),
            "elapsed_s": float(self.elapsed_s),
            "scores": {
                name: [[float(x) for x in row] for row in np.asarray(table).tolist()]
                for name, table in sorted(self.scores.items())
            },
            "copy_events": [[int(v) for v in e] for e in self.copy_events],
        }

    def to_json(self) -> str:
        return _dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None) -> TrialRecord:
        """Build and validate a record; errors name ``source`` and the offending field."""
        if not isinstance(data, Mapping):
            raise ResultsError(
                f"trial record in {_fmt_source(source)}: expected an object, "
                f"got {type(data).__name__}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        required = fields - {"elapsed_s", "reason", "condition"}
        missing = sorted(required - set(data))
        if missing:
            tid = data.get("trial_id", "?")
            raise ResultsError(
                f"trial record {tid!r} in {_fmt_source(source)}: missing field(s) {missing}"
            )
        kwargs = {k: data[k] for k in fields if k in data}
        scores = kwargs["scores"]
        if isinstance(scores, Mapping):
            kwargs["scores"] = dict(scores)
        events = kwargs["copy_events"]
        if isinstance(events, list):
            kwargs["copy_events"] = [tuple(e) if isinstance(e, list) else e for e in events]
        kwargs.setdefault("reason", None)
        kwargs.setdefault("elapsed_s", 0.0)
        if "condition" in kwargs:
            try:
                kwargs["condition"] = condition_from_dict(kwargs["condition"])
            except ConditionError as exc:
                tid = data.get("trial_id", "?")
                raise ResultsError(
                    f"trial record {tid!r} in {_fmt_source(source)}: {exc}"
                ) from None
        elif _is_legacy(kwargs.get("params"), kwargs.get("scores")):
            params, condition, scores = upgrade_legacy(kwargs["params"], kwargs["scores"])
            kwargs.update(params=params, condition=condition, scores=scores)
        return cls(**kwargs).validate(source)

    @classmethod
    def from_json(cls, line: str, source: str | Path | None = None) -> TrialRecord:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ResultsError(f"{_fmt_source(source)}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, source)
