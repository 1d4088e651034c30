"""The trials behind a detection run, rebuilt from its records, for the attention views.

A record keeps everything that defines its trial (``params``: length, depth, seed, haystack
window, needles, template) but not the input ids. ``retrieval-heads report --model M`` has only
the results folder, so it rebuilds the few trials it shows with the model's tokenizer through
:func:`retrieval_heads.trials.builder.build_trial` and keeps a rebuilt trial only when its id
(a hash of the params and the ids) equals the record's: a trial is shown exactly as it was
scored, or not at all. Haystacks other than the built-in ones (``--haystack DIR``) cannot be
rebuilt; the embedded world's comes through :func:`retrieval_heads.trials.world_trials`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from retrieval_heads.records import TrialRecord
    from retrieval_heads.trials.haystacks import Haystack
    from retrieval_heads.trials.trial import Trial

__all__ = ["pick_trials", "rebuild_trials"]

_TINY = re.compile(r"tiny:seed=(-?\d+)")


def _length(record: TrialRecord) -> int:
    for key in ("context_length", "length"):
        value = record.params.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
    return 0


def pick_trials(records: Sequence[TrialRecord], n: int) -> list[TrialRecord]:
    """``n`` passing records to show, longest context first and one per length before a
    second of any length: at real sizes the long contexts are the ones worth seeing."""
    passing = [r for r in records if r.passed]
    by_length: dict[int, list[TrialRecord]] = {}
    for r in passing:
        by_length.setdefault(_length(r), []).append(r)
    lengths = sorted(by_length, reverse=True)
    chosen: list[TrialRecord] = []
    depth = 0
    while len(chosen) < n and any(depth < len(by_length[x]) for x in lengths):
        chosen += [by_length[x][depth] for x in lengths if depth < len(by_length[x])]
        depth += 1
    return chosen[:n]


def _haystack(name: Any) -> Haystack | None:
    from retrieval_heads.trials import world_trials
    from retrieval_heads.trials.haystacks import Haystack

    if name == "filler":
        return Haystack.filler()
    match = _TINY.fullmatch(str(name))
    return world_trials("tiny").tiny_haystack(int(match.group(1))) if match else None


def _rebuild(record: TrialRecord, tokenizer: Any) -> Trial | str:
    """The record's trial, or why it cannot be rebuilt."""
    from retrieval_heads.trials.builder import build_trial
    from retrieval_heads.trials.needles import Needle, NeedleSet
    from retrieval_heads.trials.template import PromptTemplate

    p = record.params
    haystack = _haystack(p.get("haystack"))
    if haystack is None:
        return f"haystack {p.get('haystack')!r} is not a built-in one"
    try:
        needles = {
            role: tuple(
                Needle(n["id"], n["needle"], n["question"], n["answer"])
                for n in p["needles"]
                if (n["role"] == "target") == (role == "target")
            )
            for role in ("target", "distractor")
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the scoring run already warned about this trial
            trial = build_trial(
                tokenizer,
                haystack,
                NeedleSet(needles["target"], needles["distractor"], kind=p.get("kind", "single")),
                length=int(p["length"]),
                depth_percent=float(p["depth_percent"]),
                template=PromptTemplate(**p["template"]),
                seed=int(p["seed"]),
                question=p.get("question"),
                max_offset=int(p["max_offset"]),
            )
    except (KeyError, TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if trial.trial_id != record.trial_id:
        return "the rebuilt prompt differs (another tokenizer or template?)"
    return trial


def rebuild_trials(
    records: Sequence[TrialRecord], tokenizer: Any
) -> tuple[dict[str, Trial], list[str]]:
    """``({trial_id: Trial}, notes)``: the records' trials that rebuild exactly, and a note per
    record that does not."""
    trials: dict[str, Trial] = {}
    notes: list[str] = []
    for record in records:
        got = _rebuild(record, tokenizer)
        if isinstance(got, str):
            notes.append(f"trial {record.trial_id} not rebuilt: {got}")
        else:
            trials[record.trial_id] = got
    return trials, notes
