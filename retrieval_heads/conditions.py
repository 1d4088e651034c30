"""The condition a record was run under, as a typed, versioned value.

A detection record runs the model as it is and carries no condition. Every other record says
what was changed, in its ``condition`` field (``trials.jsonl``):

- :class:`HeadAblation` — ``k`` heads chosen by ``selection`` (draw ``draw``) ablated by
  ``mode`` in ``phase`` (the K-sweep, ``ablate_grid``, the embedded model's controls, the
  chain-of-thought run);
- :class:`KVWindow` — every KV head but ``full_kv_heads`` keeps only ``sink`` + ``window``
  positions (the KV-cache what-if; ``selection="none"`` is the full cache).

On disk a condition is its fields plus ``"type"`` and ``"version"``
(:data:`CONDITION_VERSION`); :func:`condition_from_dict` reads that back and refuses a type or
version it does not know, naming both. Files written before conditions were typed kept them in
``params`` (``k``, ``selection``, ``draw``, ``mode``, ...): :func:`upgrade_legacy` turns such a
record's params into its condition, so the analyses and the report read one field and never
guess. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

__all__ = [
    "CONDITION_VERSION",
    "HeadAblation",
    "KVWindow",
    "RecordCondition",
    "condition_from_dict",
    "upgrade_legacy",
]

CONDITION_VERSION = 1

Selection = Literal["top", "random", "matched_layer", "none", "custom", "uniform"]


class ConditionError(ValueError):
    """A stored condition that this version cannot read."""


@dataclass(frozen=True)
class HeadAblation:
    """``k`` heads (dotted ``"L.H"``, sorted) chosen by ``selection``, draw ``draw``, ablated
    by ``mode`` during ``phase``; ``tag`` is the suffix of the record ids (``"<selection>|k=<K>|
    draw=<d>"`` unless a caller named it); ``note`` says when a control draw needed a fallback.
    """

    TYPE: ClassVar[str] = "head-ablation"

    k: int
    selection: str
    draw: int
    heads: tuple[str, ...]
    mode: str
    phase: str
    tag: str
    note: str | None = None

    @classmethod
    def of(cls, condition: Any, mode: str, phase: str, tag: str | None = None) -> HeadAblation:
        """From a :class:`~retrieval_heads.selection.Condition` and how its heads are ablated."""
        return cls(
            k=int(condition.k),
            selection=str(condition.selection),
            draw=int(condition.draw),
            heads=tuple(h.dotted for h in condition.heads),
            mode=str(mode),
            phase=str(phase),
            tag=tag or condition.tag,
            note=condition.note,
        )

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["heads"] = list(self.heads)
        return {"type": self.TYPE, "version": CONDITION_VERSION, **body}


@dataclass(frozen=True)
class KVWindow:
    """Every KV head but ``full_kv_heads`` (``"L.kv"``, sorted; ``"all"`` for the full cache)
    keeps only the first ``sink`` and the last ``window`` positions, during ``phase``;
    ``selection`` (``"top"``, ``"random"``, ``"uniform"``, ``"none"``) chose the ``k`` full
    heads, draw ``draw``; ``tag`` is the suffix of the record ids."""

    TYPE: ClassVar[str] = "kv-window"

    selection: str
    k: int
    draw: int
    sink: int | None
    window: int | None
    phase: str | None
    full_kv_heads: tuple[str, ...] | Literal["all"]
    tag: str

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        if self.full_kv_heads != "all":
            body["full_kv_heads"] = list(self.full_kv_heads)
        return {"type": self.TYPE, "version": CONDITION_VERSION, **body}


RecordCondition = HeadAblation | KVWindow
_TYPES: dict[str, type[HeadAblation] | type[KVWindow]] = {
    HeadAblation.TYPE: HeadAblation,
    KVWindow.TYPE: KVWindow,
}


def condition_from_dict(data: Any) -> RecordCondition:
    """The condition stored as ``data``; :class:`ConditionError` (say what to do) otherwise."""
    if not isinstance(data, Mapping):
        raise ConditionError(f"condition must be an object, got {type(data).__name__}")
    kind, version = data.get("type"), data.get("version")
    if kind not in _TYPES:
        raise ConditionError(
            f"unknown condition type {kind!r} (this version reads {', '.join(_TYPES)}): was the "
            "file written by a newer retrieval-heads? Upgrade it to read this file"
        )
    if version != CONDITION_VERSION:
        raise ConditionError(
            f"condition {kind!r} has version {version!r}; this version reads version "
            f"{CONDITION_VERSION}: read the file with the retrieval-heads that wrote it"
        )
    cls = _TYPES[kind]
    body = {k: v for k, v in data.items() if k not in ("type", "version")}
    try:
        if cls is HeadAblation:
            body["heads"] = tuple(body.get("heads", ()))
            return HeadAblation(**body)
        if body.get("full_kv_heads") != "all":
            body["full_kv_heads"] = tuple(body.get("full_kv_heads", ()))
        return KVWindow(**body)
    except TypeError as exc:  # a missing or an unknown field
        raise ConditionError(f"condition {kind!r} is malformed: {exc}") from None


# What records written before conditions were typed kept in params (removed by the upgrade).
_LEGACY_ABLATION = ("k", "selection", "draw", "mode", "phase", "ablated", "condition")
_LEGACY_KV = ("condition", "n_full_kv_heads", "selection", "draw", "sink", "window", "phase")
# Tasks whose legacy records carried all-zero head-score tables (they have no head scores).
_NO_HEAD_SCORES = ("cot", "fact", "chain")


def upgrade_legacy(
    params: dict[str, Any], scores: dict[str, Any]
) -> tuple[dict[str, Any], RecordCondition | None, dict[str, Any]]:
    """A record of a file written before typed conditions, as today's code writes it:
    ``(params without the condition's keys, the condition, scores)``. Records that ran no
    condition (detection) come back unchanged with ``None``; chain-of-thought, fact and chain
    records lose the all-zero head-score tables they used to carry."""
    if str(params.get("task")) in _NO_HEAD_SCORES and all(
        not any(any(row) for row in table) for table in scores.values()
    ):
        scores = {}
    tag = params.get("condition")
    if isinstance(tag, str) and tag.startswith("kv:") and "n_full_kv_heads" in params:
        full = params.get("full_kv_heads", "all")
        condition: RecordCondition = KVWindow(
            selection=params["selection"],
            k=int(params["n_full_kv_heads"]),
            draw=int(params["draw"]),
            sink=params.get("sink"),
            window=params.get("window"),
            phase=params.get("phase"),
            full_kv_heads="all" if full == "all" else tuple(full),
            tag=tag,
        )
        dropped = _LEGACY_KV + ("full_kv_heads",)
    elif all(key in params for key in ("k", "selection", "draw", "mode", "phase")):
        condition = HeadAblation(
            k=int(params["k"]),
            selection=params["selection"],
            draw=int(params["draw"]),
            heads=tuple(params.get("ablated", ())),
            mode=params["mode"],
            phase=params["phase"],
            tag=tag
            if isinstance(tag, str)
            else f"{params['selection']}|k={params['k']}|draw={params['draw']}",
            note=params.get("selection_note"),
        )
        dropped = _LEGACY_ABLATION + ("selection_note",)
    else:
        return params, None, scores
    return {k: v for k, v in params.items() if k not in dropped}, condition, scores
