"""``retrieval_heads.detector_comparison`` and ``retrieval-heads compare-detectors`` on tiny.

- the detector tables are each scorer's mean over passing trials (NaN -> 0), plus the pattern
  tables; the agreement matrix is ``analysis.spearman`` / ``jaccard_top_k`` of every pair;
- the plan: the baseline once, each detector's top-K, and random controls that are the same
  for every detector and in no detector's top-K (a note when too few heads are left);
- ``fewest_heads`` on hand-made rows;
- the command end to end after ``detect --scorers write,query_focused``: agreement.json, a
  rerun that resumes (no unit runs again), and the report reading the folder as an ablation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval_heads import analysis, causal
from retrieval_heads import detector_comparison as dc
from retrieval_heads.cli import main as cli_main
from retrieval_heads.heads import Head
from retrieval_heads.scores import HeadScores
from retrieval_heads.store import load_records, read_meta
from retrieval_heads.summaries import KSweepRow

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]

GRID = ["--model", "tiny", "--lengths", "150", "--n-depths", "2", "--n-needles", "2"]


@pytest.fixture(scope="module")
def detection(tmp_path_factory):
    out = tmp_path_factory.mktemp("detect") / "detect"
    assert cli_main(["detect", *GRID, "--scorers", "write,query_focused", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tables(detection):
    return dc.detector_tables(load_records(detection))


def test_tables_are_each_scorers_mean_over_passing_trials(detection, tables):
    records = load_records(detection)
    assert {"retrieval", "write", "query_focused"} <= set(tables)
    for name, table in tables.items():
        expected = np.nan_to_num(HeadScores.from_records(records, name).mean, nan=0.0)
        np.testing.assert_array_equal(table, expected)
        assert table.shape == (8, 8) and np.isfinite(table).all()
    pattern = {"induction": np.full((8, 8), np.nan)}
    with_pattern = dc.detector_tables(records, pattern)
    assert list(with_pattern)[-1] == "induction" and not with_pattern["induction"].any()
    with pytest.raises(ValueError, match="shape"):
        dc.detector_tables(records, {"induction": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="no records"):
        dc.detector_tables([])


def test_agreement_is_spearman_and_jaccard_of_every_pair(tables):
    result = dc.agreement(tables, ks=(2, 5, 500))
    assert result["ks"] == [2, 5, 64]
    json.dumps(result, allow_nan=False)
    for a in tables:
        for b in tables:
            assert result["spearman"][a][b] == pytest.approx(
                analysis.spearman(tables[a], tables[b])
            )
            for k in (2, 5, 64):
                assert result["jaccard"][str(k)][a][b] == pytest.approx(
                    analysis.jaccard_top_k(tables[a], tables[b], k)
                )
    assert "Jaccard of top-5" in dc.format_agreement(result)


def test_controls_are_shared_and_outside_every_top_k(tables):
    conditions = dc.plan_detector_conditions(tables, [1, 2, 4, 8], draws=3, seed=5)
    assert conditions[0] == causal.Condition(0, "none", 0, ())
    assert sum(c.k == 0 for c in conditions) == 1
    for k in (1, 2, 4, 8):
        tops = {c.selection: c for c in conditions if c.k == k and c.selection != "random"}
        assert set(tops) == {f"top:{name}" for name in tables}
        for name, table in tables.items():
            assert tops[f"top:{name}"].heads == tuple(sorted(causal.top_heads(table, k)))
        union = {h for c in tops.values() for h in c.heads}
        controls = [c for c in conditions if c.k == k and c.selection == "random"]
        assert [c.draw for c in controls] == [0, 1, 2]
        for c in controls:
            assert len(c.heads) == k and not set(c.heads) & union and c.note is None
    again = dc.plan_detector_conditions(tables, [1, 2, 4, 8], draws=3, seed=5)
    assert again == conditions  # reproducible from (seed, K, draw)
    other = dc.plan_detector_conditions(tables, [8], draws=3, seed=6)
    assert [c.heads for c in other if c.selection == "random"] != [
        c.heads for c in conditions if c.k == 8 and c.selection == "random"
    ]


def test_too_few_heads_outside_the_union_fall_back_with_a_note():
    rng = np.random.default_rng(0)
    tables = {"a": rng.random((2, 4)), "b": rng.random((2, 4))}
    with pytest.warns(UserWarning, match="clipped"):
        conditions = dc.plan_detector_conditions(tables, [5, 99], draws=2, seed=0)
    controls = [c for c in conditions if c.selection == "random"]
    assert {c.k for c in controls} == {5, 8}
    for c in controls:
        assert len(set(c.heads)) == c.k and c.note and "top-" in c.note
    five = [c for c in conditions if c.k == 5]
    union = {h for c in five if c.selection != "random" for h in c.heads}
    outside = {Head(layer, head) for layer in range(2) for head in range(4)} - union
    assert all(outside <= set(c.heads) for c in five if c.selection == "random")


def _row(k: int, selection: str, accuracy: float) -> KSweepRow:
    return KSweepRow(k, selection, 1, 4, accuracy, 0.0, accuracy, 0.0)


def test_fewest_heads_is_the_smallest_k_at_or_under_the_fraction():
    rows = [
        _row(0, "none", 0.8),
        *(_row(k, "top:a", acc) for k, acc in ((1, 0.7), (2, 0.4), (4, 0.0))),
        *(_row(k, "top:b", acc) for k, acc in ((1, 0.8), (2, 0.6), (4, 0.5))),
        *(_row(k, "random", 0.8) for k in (1, 2, 4)),
    ]
    assert dc.fewest_heads(rows) == {"a": 2, "b": None, "random": None}
    assert list(dc.fewest_heads(rows))[-1] == "random"
    assert dc.fewest_heads(rows, fraction=0.7) == {"a": 2, "b": 4, "random": None}
    assert dc.fewest_heads([_row(0, "none", 0.0), _row(1, "top:a", 0.0)]) == {"a": None}


def test_the_command_end_to_end_resumes_and_reports(detection, tmp_path, monkeypatch, capsys):
    from retrieval_heads.views.report import build_report

    out = tmp_path / "cmp"
    argv = ["compare-detectors", *GRID, "--scores", str(detection), "--top-k", "2"]
    argv += ["--random", "1", "--out", str(out)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "Spearman" in printed and "top:write" in printed and "fewest heads" in printed
    saved = json.loads((out / "agreement.json").read_text())
    names = saved["agreement"]["detectors"]
    assert {"retrieval", "write", "query_focused", "induction", "previous_token"} <= set(names)
    assert set(saved["fewest_heads"]["k"]) == {*names, "random"}
    meta = read_meta(out)
    assert meta["kind"] == "compare-detectors" and meta["config"]["detectors"] == names
    assert set(meta["config"]["top_heads"]) == set(names)
    records = load_records(out)
    # 4 trials x (baseline + one top-2 per detector + one shared control)
    assert len(records) == 4 * (1 + len(names) + 1)
    selections = {r.condition.selection for r in records}
    assert selections == {"none", "random", *(f"top:{n}" for n in names)}

    def no_rerun(*args, **kwargs):
        raise AssertionError("a finished unit ran again")

    monkeypatch.setattr(causal, "_run_one", no_rerun)
    assert cli_main(argv) == 0
    assert len(load_records(out)) == len(records)
    assert json.loads((out / "agreement.json").read_text()) == saved
    path = build_report([out], tmp_path / "report.html")
    page = path.read_text()
    assert "compare-detectors" in page and "Agreement between detectors" in page
    assert "Fewest heads to ablate for accuracy ≤ 0.5 × baseline" in page
    assert "top:retrieval K=2 ablated" in page  # the copy score's top-K beside the baseline
    for name, k in saved["fewest_heads"]["k"].items():  # the table says what the file says
        assert f'<td>{name}</td><td class="num">{"—" if k is None else k}</td>' in page


def test_agreement_heatmap_puts_spearman_above_and_jaccard_below():
    from retrieval_heads.views.figures import agreement_heatmap

    agreement = {
        "detectors": ["a", "b", "c"],
        "ks": [2, 5],
        "spearman": {
            "a": {"a": 1.0, "b": 0.5, "c": None},
            "b": {"a": 0.5, "b": 1.0, "c": -0.25},
            "c": {"a": None, "b": -0.25, "c": 1.0},
        },
        "jaccard": {
            "5": {
                "a": {"a": 1.0, "b": 0.2, "c": 0.0},
                "b": {"a": 0.2, "b": 1.0, "c": 0.4},
                "c": {"a": 0.0, "b": 0.4, "c": 1.0},
            }
        },
    }
    z = agreement_heatmap(agreement).data[0].z
    assert z[0][1] == 0.5 and z[1][2] == -0.25 and z[0][0] == 1.0
    assert z[1][0] == 0.2 and z[2][1] == 0.4 and z[2][0] == 0.0
    assert z[0][2] != z[0][2]  # an undefined Spearman stays blank (NaN)


@pytest.mark.golden
def test_on_tiny_the_write_top_8_breaks_retrieval_and_the_controls_do_not(
    tables, tiny_model, tiny_trials
):
    from retrieval_heads.detectors import pattern_scores
    from retrieval_heads.summaries import summarise_k_sweep

    chosen = {
        "write": tables["write"],
        "duplicate_token": pattern_scores(tiny_model)["duplicate_token"],
    }
    trials = [t for t in tiny_trials if t.context_length <= 150]
    records = dc.compare_detectors(tiny_model, trials, chosen, [8], draws=1, seed=0)
    rows = {(r.k, r.selection): r.accuracy for r in summarise_k_sweep(records)}
    assert rows[(0, "none")] == 1.0
    assert rows[(8, "top:write")] <= 0.5
    assert rows[(8, "top:duplicate_token")] == 1.0 and rows[(8, "random")] == 1.0
    assert dc.fewest_heads(summarise_k_sweep(records)) == {
        "write": 8,
        "duplicate_token": None,
        "random": None,
    }
