"""Typed conditions in records, and the reader of files written before them.

``tests/fixtures/results_v1/`` holds results folders of every kind written by the code before
records carried a typed condition (commit bc21b03; see the fixtures' README). Today's reader
must load them, give each record its condition, and give the same records today's code writes
when it runs the same commands: the upgrade is exact, not a best guess.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from retrieval_heads import analysis, cot
from retrieval_heads.cli import main as cli_main
from retrieval_heads.conditions import (
    CONDITION_VERSION,
    HeadAblation,
    KVWindow,
    condition_from_dict,
)
from retrieval_heads.files import ResultsError
from retrieval_heads.records import TrialRecord
from retrieval_heads.store import load_records, load_results, load_run
from retrieval_heads.views.report import build_report

V1 = Path(__file__).parent.parent / "fixtures" / "results_v1"
GRID = ["--model", "tiny", "--lengths", "200", "--depths", "0", "100", "--n-needles", "1"]


def _comparable(record: TrialRecord) -> dict:
    """A record without what differs between two runs of the same command: the time it took
    and the checkout's path to the tokenizer."""
    d = record.to_dict()
    d.pop("elapsed_s")
    d["params"].pop("tokenizer", None)
    return d


def test_every_v1_record_gets_its_condition():
    kinds = {
        "detect": type(None),
        "ablate": HeadAblation,
        "controls": HeadAblation,
        "cot": HeadAblation,
        "kv-sim": KVWindow,
    }
    for folder, expected in kinds.items():
        records = load_records(V1 / folder)
        assert records and all(isinstance(r.condition, expected) for r in records), folder
        for r in records:  # the condition's keys left params; per-trial facts stayed
            assert not {"k", "selection", "draw", "mode", "ablated", "n_full_kv_heads"} & set(
                r.params
            )
    ablate = {r.trial_id: r for r in load_records(V1 / "ablate")}
    top = next(r for tid, r in ablate.items() if "|top|k=2|" in tid)
    assert (top.condition.k, top.condition.selection, top.condition.mode) == (2, "top", "uniform")
    assert len(top.condition.heads) == 2 and top.condition.tag == "top|k=2|draw=0"
    matched = next(r for tid, r in ablate.items() if "|matched_layer|" in tid)
    assert matched.condition.note and "took 1 from layer 1" in matched.condition.note
    kv = {r.condition.tag: r for r in load_records(V1 / "kv-sim")}
    assert kv["kv:none"].condition.full_kv_heads == "all" and kv["kv:none"].condition.k == 32
    top1 = kv["kv:top|k=1|s=4|w=32|draw=0"]
    assert top1.condition.full_kv_heads == ("2.0",) and top1.condition.window == 32
    assert "kv_share" in kv["kv:none"].params


def test_v1_records_without_head_scores_lose_their_zero_tables():
    cot_records = load_records(V1 / "cot")
    assert all(r.scores == {} for r in cot_records)
    controls = load_records(V1 / "controls")
    by_task = {t: [r for r in controls if r.params["task"] == t] for t in ("niah", "fact", "chain")}
    assert all(r.scores == {} for t in ("fact", "chain") for r in by_task[t])
    assert all("retrieval" in r.scores for r in by_task["niah"])
    # the old zero table of a chain-of-thought folder is not head scores
    meta, scores, records = load_run(V1 / "cot")
    assert scores is None and len(records) == 6 and meta["kind"] == "cot"
    with pytest.raises(ResultsError, match="holds no head scores"):
        load_results(V1 / "cot")
    # a control sweep's head scores come from its NIAH records alone
    _, control_scores, _ = load_results(V1 / "controls")
    assert set(control_scores.trial_ids) == {r.trial_id for r in by_task["niah"]}


def test_v1_folders_summarise_and_report(tmp_path):
    rows = analysis.summarise_k_sweep(load_records(V1 / "ablate"))
    assert [(r.k, r.selection) for r in rows] == [
        (0, "none"),
        (2, "matched_layer"),
        (2, "random"),
        (2, "top"),
    ]
    curve = analysis.kv_curve(load_records(V1 / "kv-sim"))
    assert {p.selection for p in curve} == {"none", "top", "random", "uniform"}
    assert cot.summarize(load_records(V1 / "cot"))
    page = build_report([V1 / name for name in ("detect", "ablate", "kv-sim")], tmp_path / "r.html")
    text = Path(page).read_text()
    assert "K-sweep" in text and "KV" in text


@pytest.mark.golden
def test_v1_upgrade_equals_what_todays_code_writes(tmp_path, capsys):
    """Rerun the fixture's commands with today's code: each upgraded v1 record equals the new
    record of the same id (condition, params, tokens, scores, copy events)."""
    new = tmp_path
    assert cli_main(["detect", *GRID, "--seed", "3", "--out", str(new / "detect")]) == 0
    scores = str(V1 / "detect")
    assert (
        cli_main(
            ["ablate", *GRID, "--seed", "3", "--scores", scores, "--top-k", "0", "2"]
            + ["--random", "1", "--mode", "uniform", "--out", str(new / "ablate")]
        )
        == 0
    )
    assert (
        cli_main(
            ["kv-sim", *GRID, "--seed", "3", "--scores", scores, "--top-k", "0", "1"]
            + ["--random", "1", "--window", "32", "--uniform-windows", "64"]
            + ["--out", str(new / "kv-sim")]
        )
        == 0
    )
    from retrieval_heads.model import load_model
    from retrieval_heads.tiny.controls import control_sweep

    model = load_model("tiny")
    _, head_scores, _ = load_results(V1 / "detect")
    control_sweep(
        model,
        head_scores,
        ks=(0, 2),
        draws=1,
        n=1,
        length=200,
        tasks=("fact", "chain", "niah"),
        out=new / "controls",
    )
    questions = cot.load_questions(Path(__file__).parents[2] / "experiments" / "questions.jsonl")
    cot.run(
        model,
        questions[:1],
        head_scores,
        ks=(0, 2),
        draws=1,
        max_new_tokens={"direct": 8, "cot": 16},
        out=new / "cot",
    )
    capsys.readouterr()
    for folder in ("detect", "ablate", "kv-sim", "controls", "cot"):
        old = [_comparable(r) for r in load_records(V1 / folder)]
        now = [_comparable(r) for r in load_records(new / folder)]
        assert old == now, folder
        written = [json.loads(line) for line in (new / folder / "trials.jsonl").open()]
        with_condition = [d for d in written if "condition" in d]
        assert len(with_condition) == (0 if folder == "detect" else len(written)), folder
        assert all(d["condition"]["version"] == CONDITION_VERSION for d in with_condition)
    assert not (new / "cot" / "head_scores.json").exists()  # no table of zeros any more


def test_condition_round_trip_and_clear_errors():
    ablation = HeadAblation(2, "top", 0, ("2.0", "2.1"), "mean", "all", "top|k=2|draw=0")
    window = KVWindow("top", 1, 0, 4, 32, "decode", ("3.0",), "kv:top|k=1|s=4|w=32|draw=0")
    full = KVWindow("none", 8, 0, None, None, None, "all", "kv:none")
    for condition in (ablation, window, full):
        assert condition_from_dict(json.loads(json.dumps(condition.to_dict()))) == condition
    record = load_records(V1 / "ablate")[0]
    again = TrialRecord.from_json(record.to_json())
    assert again == record and again.condition == record.condition
    bad = record.to_dict()
    bad["condition"] = {**bad["condition"], "version": CONDITION_VERSION + 1}
    with pytest.raises(ResultsError, match="read the file with the retrieval-heads that wrote"):
        TrialRecord.from_dict(bad, "x.jsonl")
    bad["condition"] = {**bad["condition"], "type": "telepathy"}
    with pytest.raises(ResultsError, match="unknown condition type 'telepathy'"):
        TrialRecord.from_dict(bad, "x.jsonl")
    bad["condition"] = {"type": "head-ablation", "version": CONDITION_VERSION, "k": 1}
    with pytest.raises(ResultsError, match="malformed"):
        TrialRecord.from_dict(bad, "x.jsonl")
    # a detection record carries no condition, and none is written
    detection = load_records(V1 / "detect")[0]
    assert detection.condition is None and "condition" not in detection.to_dict()
    assert dataclasses.replace(detection, condition=ablation).to_dict()["condition"]["k"] == 2
