"""The per-head score table: :class:`HeadScores`, one scorer's scores of every head over trials.

Per head: the mean over *passing* trials (the paper's retrieval score), std, n, a bootstrap 95%
CI, the mean over all trials, and the per-trial scores themselves; rankings, top-K, the
grouped-query kv-head aggregate; the ``head_scores.json`` form (``to_dict``/``from_dict``,
``save``/``load``), and ``MAX_RESAMPLES``, the most bootstrap draws a stored file may ask for.
The arithmetic of those statistics and of the kv-head aggregate (``group_kv_heads``, imported
from here as before) is :mod:`~retrieval_heads.score_stats`'s: plain arrays in, arrays out.

``head_scores.json`` is byte-deterministic: the same records give the same bytes (trials sorted by
id, heads in (layer, head) order, a seeded bootstrap, no timestamps: timing lives in ``meta.json``).

It never reads a results folder (:mod:`~retrieval_heads.store` does) nor the published
``{"layer-head": [...]}`` format (:mod:`~retrieval_heads.published` does), and never touches a
model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float

from retrieval_heads.files import (
    HEAD_SCORES_SCHEMA,
    SCHEMA_VERSION,
    ResultsError,
    _column,
    _dumps,
    _fmt_source,
    _parse_label,
    _read_json,
    _table,
    atomic_write_text,
    check_output_file,
)
from retrieval_heads.heads import Head
from retrieval_heads.records import TrialRecord
from retrieval_heads.score_stats import KVReduce as KVReduce
from retrieval_heads.score_stats import NaNPolicy as NaNPolicy
from retrieval_heads.score_stats import group_kv_heads, head_statistics

__all__ = ["HeadScores", "MAX_RESAMPLES", "group_kv_heads"]

#: The most bootstrap resamples a stored file may ask for (the default is 1,000).
MAX_RESAMPLES = 100_000


def _nan_to_none(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


class HeadScores:
    """One scorer's score of every head over a set of trials, with per-head statistics.

    ``values`` is ``[trial, layer, head]``; NaN marks "no score" (a head absent from an imported
    file, or the tail of a shorter list in a ragged one). ``passed`` says which trials count for
    the paper's score. Statistics, each a ``[layer, head]`` array, computed on first use:

    - ``mean``: mean over passing trials — the retrieval score of the paper;
    - ``std``: sample standard deviation (ddof=1) over passing trials (NaN when n < 2);
    - ``n``: number of passing trials with a score;
    - ``ci_low``/``ci_high``: percentile bootstrap CI (``confidence``, default 95%) of ``mean``,
      resampling *trials* (the same resample for every head), ``n_resamples`` draws from a
      ``numpy`` generator seeded with ``seed`` — reproducible;
    - ``mean_all``/``n_all``: over all trials, passing or not.

    A table imported from the published format holds only successful trials (that is all the
    files contain), so there ``mean_all == mean`` and ``n_passed == n_total``.
    """

    def __init__(
        self,
        values: Float[np.ndarray, "trial layer head"] | Sequence,
        passed: Sequence[bool] | np.ndarray | None = None,
        trial_ids: Sequence[str] | None = None,
        *,
        scorer: str = "retrieval",
        present: np.ndarray | None = None,
        int_mask: np.ndarray | None = None,
        n_resamples: int = 1000,
        seed: int = 0,
        confidence: float = 0.95,
        source: str | None = None,
    ) -> None:
        values = np.array(values, dtype=np.float64)
        if values.ndim != 3:
            raise ValueError(f"values must be [trial, layer, head], got shape {values.shape}")
        n_trials, n_layers, n_heads = values.shape
        if n_layers == 0 or n_heads == 0:
            raise ValueError(f"a score table needs at least one layer and head, got {values.shape}")
        if np.isinf(values).any():
            raise ValueError("values must be finite (NaN marks a missing score)")
        passed_arr = (
            np.ones(n_trials, dtype=bool) if passed is None else np.asarray(passed, dtype=bool)
        )
        if passed_arr.shape != (n_trials,):
            raise ValueError(f"passed must have one entry per trial ({n_trials})")
        ids = (
            [str(i) for i in range(n_trials)] if trial_ids is None else [str(t) for t in trial_ids]
        )
        if len(ids) != n_trials:
            raise ValueError(f"trial_ids must have one entry per trial ({n_trials})")
        if len(set(ids)) != len(ids):
            raise ValueError("trial_ids must be unique")
        if present is None:
            present = (
                ~np.isnan(values).all(axis=0) if n_trials else np.ones((n_layers, n_heads), bool)
            )
        present = np.asarray(present, dtype=bool)
        if present.shape != (n_layers, n_heads):
            raise ValueError(f"present must be [layer, head] = {(n_layers, n_heads)}")
        if int_mask is not None:
            int_mask = np.asarray(int_mask, dtype=bool)
            if int_mask.shape != values.shape:
                raise ValueError("int_mask must have the shape of values")
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        if n_resamples < 1:
            raise ValueError("n_resamples must be at least 1")
        self.values = values
        self.passed = passed_arr
        self.trial_ids = ids
        self.scorer = scorer
        self.present = present
        self.int_mask = int_mask
        self.n_resamples = int(n_resamples)
        self.seed = int(seed)
        self.confidence = float(confidence)
        self.source = source
        self._stats: dict[str, np.ndarray] = {}

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_records(
        cls,
        records: Iterable[TrialRecord],
        scorer: str = "retrieval",
        *,
        n_resamples: int = 1000,
        seed: int = 0,
        confidence: float = 0.95,
    ) -> HeadScores:
        """Stack one scorer's tables from records (sorted by trial id, so order never matters).

        Records without head scores (chain of thought, memorised facts, chains: their
        ``scores`` are empty) are left out; a record that has head scores but not ``scorer``
        is an error."""
        given = list(records)
        records = sorted((r for r in given if r.scores), key=lambda r: r.trial_id)
        if not records:
            raise ResultsError(
                "no trial records with head scores to build head scores from"
                if given
                else "no trial records to build head scores from"
            )
        shape = (records[0].n_layers, records[0].n_heads)
        tables = []
        for record in records:
            if (record.n_layers, record.n_heads) != shape:
                raise ResultsError(
                    f"trial {record.trial_id!r} has {record.n_layers}x{record.n_heads} heads, "
                    f"the others {shape[0]}x{shape[1]}"
                )
            tables.append(record.score_array(scorer))
        return cls(
            np.stack(tables),
            [r.passed for r in records],
            [r.trial_id for r in records],
            scorer=scorer,
            n_resamples=n_resamples,
            seed=seed,
            confidence=confidence,
        )

    # -- shape and per-trial access ------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return self.values.shape[1]

    @property
    def n_heads(self) -> int:
        return self.values.shape[2]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_layers, self.n_heads)

    @property
    def n_total(self) -> int:
        """Number of trials."""
        return self.values.shape[0]

    @property
    def n_passed(self) -> int:
        """Number of passing trials."""
        return int(self.passed.sum())

    @property
    def pass_rate(self) -> float:
        return self.n_passed / self.n_total if self.n_total else float("nan")

    def heads(self) -> list[Head]:
        """The heads that have scores, in (layer, head) order."""
        return [Head(int(layer), int(head)) for layer, head in np.argwhere(self.present)]

    def _index(self, head: Head | str | tuple[int, int]) -> Head:
        h = Head.parse(head)
        h.check(self.n_layers, self.n_heads)
        return h

    def per_trial(
        self, head: Head | str, *, passing_only: bool = True
    ) -> Float[np.ndarray, " trial"]:
        """Scores of one head, one per (passing) trial that has one, in trial order."""
        h = self._index(head)
        column = self.values[:, h.layer, h.head]
        if passing_only:
            column = column[self.passed]
        return column[~np.isnan(column)]

    # -- statistics ----------------------------------------------------------------------------

    def _compute(self) -> None:
        self._stats = head_statistics(
            self.values,
            self.passed,
            self.present,
            n_resamples=self.n_resamples,
            seed=self.seed,
            confidence=self.confidence,
        )

    def _stat(self, name: str) -> np.ndarray:
        if not self._stats:
            self._compute()
        try:
            return self._stats[name]
        except KeyError:
            raise ValueError(
                f"unknown statistic {name!r}; choose one of {sorted(self._stats)}"
            ) from None

    @property
    def mean(self) -> Float[np.ndarray, "layer head"]:
        """Mean over passing trials, ``[layer, head]`` (the paper's retrieval score)."""
        return self._stat("mean")

    @property
    def std(self) -> Float[np.ndarray, "layer head"]:
        return self._stat("std")

    @property
    def n(self) -> Float[np.ndarray, "layer head"]:
        return self._stat("n")

    @property
    def ci_low(self) -> Float[np.ndarray, "layer head"]:
        return self._stat("ci_low")

    @property
    def ci_high(self) -> Float[np.ndarray, "layer head"]:
        return self._stat("ci_high")

    @property
    def mean_all(self) -> Float[np.ndarray, "layer head"]:
        return self._stat("mean_all")

    @property
    def n_all(self) -> Float[np.ndarray, "layer head"]:
        return self._stat("n_all")

    def as_array(self, stat: str = "mean") -> Float[np.ndarray, "layer head"]:
        """A copy of one statistic as ``[layer, head]`` (NaN for heads without scores)."""
        return self._stat(stat).copy()

    def stats(self, head: Head | str) -> dict[str, Any]:
        """All statistics of one head."""
        h = self._index(head)
        out: dict[str, Any] = {"head": h.dotted}
        for name in ("mean", "std", "n", "ci_low", "ci_high", "mean_all", "n_all"):
            value = self._stat(name)[h.layer, h.head]
            out[name] = int(value) if name in ("n", "n_all") else float(value)
        return out

    def score(self, head: Head | str, stat: str = "mean") -> float:
        h = self._index(head)
        return float(self._stat(stat)[h.layer, h.head])

    def ranking(self, stat: str = "mean") -> list[tuple[Head, float]]:
        """Heads with a score, best first; ties in (layer, head) order (a stable sort)."""
        table = self._stat(stat)
        heads = self.heads()
        values = np.array([table[h.layer, h.head] for h in heads], dtype=np.float64)
        keyed = np.where(np.isnan(values), -np.inf, values)
        order = np.argsort(-keyed, kind="stable")
        return [(heads[i], float(values[i])) for i in order]

    def top(self, k: int, stat: str = "mean") -> list[Head]:
        """The ``k`` best heads by ``stat``, best first (ties broken by (layer, head))."""
        if k < 0:
            raise ValueError("k must be >= 0")
        return [h for h, _ in self.ranking(stat)[:k]]

    def above(self, threshold: float = 0.1, stat: str = "mean") -> list[Head]:
        """Heads whose ``stat`` is strictly above ``threshold``, best first."""
        return [h for h, v in self.ranking(stat) if v > threshold]

    def kv_heads(
        self, n_kv_heads: int, how: str = "max", stat: str = "mean"
    ) -> Float[np.ndarray, "layer kv_head"]:
        """Aggregate query heads to key/value heads for grouped-query attention.

        Query head ``h`` reads kv head ``h // (n_heads // n_kv_heads)`` (the Llama/Mistral
        ``repeat_kv`` layout). ``how="max"`` (the default) gives each kv head the best score of
        its query heads — a kv head is a retrieval head if any query head reading it is one;
        ``how="mean"`` averages them. Returns ``[layer, kv_head]``; heads without scores are
        ignored (NaN only when a whole group has none): :func:`group_kv_heads` with
        ``nan="ignore"`` (``kvcache.kv_head_scores`` uses ``nan="zero"``). Returns
        ``Float[np.ndarray, "layer kv_head"]``.
        """
        return group_kv_heads(self._stat(stat), n_kv_heads, how, nan="ignore")  # type: ignore

    # -- serialisation -------------------------------------------------------------------------

    def _trial_values(self, layer: int, head: int, rows: np.ndarray | None = None) -> list:
        """One head's per-trial values as JSON numbers; ints stay ints (lossless round trips)."""
        column = self.values[:, layer, head]
        if rows is not None:
            column = column[rows]
        out: list[Any] = column.tolist()
        if self.int_mask is not None:
            mask = self.int_mask[:, layer, head]
            if rows is not None:
                mask = mask[rows]
            for i in np.flatnonzero(mask):
                out[i] = int(out[i])
        for i in np.flatnonzero(np.isnan(column)):
            out[i] = None
        return out

    def to_dict(self) -> dict[str, Any]:
        """The ``head_scores.json`` form: schema-versioned, deterministic, no timestamps.

        Heads are keyed ``"L.H"`` in (layer, head) order; ``per_trial`` lists each head's score
        in every trial (``trials.ids`` order; ``null`` = no score). Statistics are included for
        readers and recomputed on load.
        """
        heads: dict[str, Any] = {}
        per_trial: dict[str, Any] = {}
        for h in self.heads():
            s = self.stats(h)
            heads[h.dotted] = {
                "mean": _nan_to_none(s["mean"]),
                "std": _nan_to_none(s["std"]),
                "n": s["n"],
                "ci95": [_nan_to_none(s["ci_low"]), _nan_to_none(s["ci_high"])],
                "mean_all": _nan_to_none(s["mean_all"]),
                "n_all": s["n_all"],
            }
            per_trial[h.dotted] = self._trial_values(h.layer, h.head)
        return {
            "schema": HEAD_SCORES_SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "scorer": self.scorer,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_trials": self.n_total,
            "n_passed": self.n_passed,
            "bootstrap": {
                "n_resamples": self.n_resamples,
                "seed": self.seed,
                "confidence": self.confidence,
            },
            "trials": {"ids": list(self.trial_ids), "passed": [bool(p) for p in self.passed]},
            "heads": heads,
            "per_trial": per_trial,
        }

    def to_json(self) -> str:
        return _dumps(self.to_dict(), indent=1) + "\n"

    def save(self, path: str | Path) -> None:
        """Write ``to_json()`` atomically; never over a results folder's files (E56): a run's
        own ``head_scores.json`` is written by its :class:`ResultsDir` only."""
        check_output_file(path, "head scores")
        atomic_write_text(path, self.to_json())

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None) -> HeadScores:
        where = f"head-scores file {_fmt_source(source)}"
        if not isinstance(data, Mapping):
            raise ResultsError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("schema") != HEAD_SCORES_SCHEMA:
            raise ResultsError(f"{where}: not a head-scores file (schema={data.get('schema')!r})")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ResultsError(
                f"{where}: schema version {version!r}; this version of retrieval-heads reads "
                f"version {SCHEMA_VERSION}"
            )
        try:
            n_layers, n_heads = int(data["n_layers"]), int(data["n_heads"])
            ids = list(data["trials"]["ids"])
            passed = list(data["trials"]["passed"])
            per_trial = data["per_trial"]
            boot = data.get("bootstrap", {})
            if not isinstance(boot, Mapping):
                raise TypeError(f"bootstrap must be an object, got {type(boot).__name__}")
            n_resamples = int(boot.get("n_resamples", 1000))
            boot_seed = int(boot.get("seed", 0))
            confidence = float(boot.get("confidence", 0.95))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ResultsError(f"{where}: missing or malformed field ({exc!r})") from exc
        if len(passed) != len(ids) or not all(isinstance(p, bool) for p in passed):
            raise ResultsError(f"{where}: trials.passed must be one true/false per trial id")
        if not 1 <= n_resamples <= MAX_RESAMPLES or not 0 < confidence < 1:
            # an untrusted file must not make the bootstrap allocate without bound
            raise ResultsError(
                f"{where}: bootstrap n_resamples must be 1..{MAX_RESAMPLES} and confidence "
                f"within (0, 1), got {n_resamples} and {confidence}"
            )
        if not isinstance(per_trial, Mapping):
            raise ResultsError(f"{where}: per_trial must be an object")
        values = _table((len(ids), n_layers, n_heads), where)
        int_mask = np.zeros(values.shape, dtype=bool)
        present = np.zeros((n_layers, n_heads), dtype=bool)
        for label, column in per_trial.items():
            head = _parse_label(label, where, n_layers, n_heads)
            if not isinstance(column, list) or len(column) != len(ids):
                raise ResultsError(
                    f"{where}: per_trial[{label!r}] must be a list with one entry per trial "
                    f"({len(ids)})"
                )
            col, is_int = _column(column, where, label, allow_none=True)
            values[:, head.layer, head.head] = col
            int_mask[:, head.layer, head.head] = is_int
            present[head.layer, head.head] = True
        try:
            scores = cls(
                values,
                passed,
                ids,
                scorer=str(data.get("scorer", "retrieval")),
                present=present,
                int_mask=int_mask if int_mask.any() else None,
                n_resamples=n_resamples,
                seed=boot_seed,
                confidence=confidence,
                source=str(source) if source is not None else None,
            )
        except ValueError as exc:
            raise ResultsError(f"{where}: {exc}") from exc
        # The stored statistics must agree with the per-trial scores they summarise.
        stored = data.get("heads", {})
        if isinstance(stored, Mapping):
            for label, entry in stored.items():
                h = _parse_label(label, where, n_layers, n_heads)
                if not isinstance(entry, Mapping) or entry.get("n") != int(
                    scores.n[h.layer, h.head]
                ):
                    raise ResultsError(f"{where}: heads[{label!r}] disagrees with per_trial")
        return scores

    @classmethod
    def load(cls, path: str | Path) -> HeadScores:
        path = Path(path)
        return cls.from_dict(_read_json(path, "head-scores file"), path)

    def __repr__(self) -> str:
        return (
            f"HeadScores(scorer={self.scorer!r}, {self.n_layers}x{self.n_heads} heads, "
            f"{self.n_passed}/{self.n_total} passing trials)"
        )
