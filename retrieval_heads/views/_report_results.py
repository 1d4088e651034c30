"""The report's inputs: a result directory or score file as a :class:`ResultSet` (its model,
its kind: detection, ablation, KV-cache simulation), an activation-patching result as a
:class:`PatchingSet`, and what the report reads of a run's model (kv heads, layer windows).

It writes no HTML and draws nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval_heads.conditions import HeadAblation, KVWindow
from retrieval_heads.records import TrialRecord
from retrieval_heads.scores import HeadScores
from retrieval_heads.store import load_run
from retrieval_heads.views._layers import layer_windows_from_meta, layer_windows_from_model

if TYPE_CHECKING:  # pragma: no cover
    from retrieval_heads.model import HookedModel


# ---------------------------------------------------------------------------------------------
# reading results


@dataclass
class ResultSet:
    """One result directory (or score file) as the report sees it."""

    path: Path
    meta: dict[str, Any]
    head_scores: HeadScores | None  # None: records without head scores (chain of thought)
    records: list[TrialRecord]
    label: str = ""
    index: int = 0

    @property
    def scores(self) -> HeadScores:
        """The run's head scores (a run without them, chain of thought, never asks)."""
        if self.head_scores is None:
            raise ValueError(f"{self.path} holds no head scores ({self.kind} run)")
        return self.head_scores

    @property
    def model(self) -> str:
        if self.meta.get("model"):
            return str(self.meta["model"])
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def kind(self) -> str:
        kind = self.meta.get("kind")
        if kind:
            return str(kind)
        if any(isinstance(r.condition, HeadAblation) for r in self.records):
            return "ablate"
        if any(isinstance(r.condition, KVWindow) for r in self.records):
            return "kv-sim"
        return "detect" if self.records else str(self.meta.get("format", "scores"))

    @property
    def is_ablation(self) -> bool:
        if self.is_kv_sim:
            return False
        return self.kind == "ablate" or any(
            isinstance(r.condition, HeadAblation) for r in self.records
        )

    @property
    def is_kv_sim(self) -> bool:
        return self.kind == "kv-sim"


def load_result_set(path: str | Path, index: int = 0) -> ResultSet:
    path = Path(path)
    meta, scores, records = load_run(path)
    rs = ResultSet(path, dict(meta), scores, list(records), index=index)
    rs.label = f"{rs.model} ({rs.kind})"
    return rs


@dataclass
class PatchingSet:
    """An activation-patching result: ``patching.json`` (``{"model", "effect": [[...]], ...}``)
    or a directory holding one."""

    path: Path
    data: dict[str, Any]
    effect: np.ndarray
    index: int = 0

    @property
    def model(self) -> str:
        return str(self.data.get("model") or self.path.name)


def load_patching(path: str | Path) -> PatchingSet | None:
    """A :class:`PatchingSet` if ``path`` is a patching result, else ``None``."""
    path = Path(path)
    file = path / "patching.json" if path.is_dir() else path
    if not file.is_file() or file.suffix != ".json" or (file.parent / "meta.json").exists():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "effect" not in data or "schema" in data:
        return None
    try:
        effect = np.array(
            [[np.nan if v is None else float(v) for v in row] for row in data["effect"]]
        )
    except (TypeError, ValueError):
        return None
    if effect.ndim != 2 or not effect.size:
        return None
    return PatchingSet(path, data, effect)


def _find_key(obj: Any, keys: Sequence[str], depth: int = 0) -> Any:
    """The first value under any of ``keys`` in nested dicts (breadth first, shallow)."""
    if depth > 4 or not isinstance(obj, Mapping):
        return None
    for key in keys:
        if key in obj and obj[key] is not None:
            return obj[key]
    for value in obj.values():
        found = _find_key(value, keys, depth + 1)
        if found is not None:
            return found
    return None


def _n_kv_heads(rs: ResultSet, model: HookedModel | None) -> int | None:
    n_heads = rs.scores.n_heads
    if model is not None and model.n_heads == n_heads and model.n_layers == rs.scores.n_layers:
        value: Any = model.n_kv_heads
    else:
        value = _find_key(rs.meta, ("n_kv_heads", "num_key_value_heads", "n_key_value_heads"))
    try:
        n_kv = int(value)
    except (TypeError, ValueError):
        return None
    return n_kv if 0 < n_kv < n_heads and n_heads % n_kv == 0 else None


def _layer_windows(rs: ResultSet, model: HookedModel | None) -> list[int | None] | None:
    """Each layer's attention window (``None``: global) as the run recorded it, else as the
    model given reports it; ``None`` when neither knows."""
    n_layers = rs.scores.n_layers
    return layer_windows_from_meta(rs.meta, n_layers) or layer_windows_from_model(model, n_layers)
