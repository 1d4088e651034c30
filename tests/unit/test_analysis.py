"""Unit tests of retrieval_heads.analysis, with answers worked out by hand."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from retrieval_heads import analysis as A
from retrieval_heads.conditions import HeadAblation
from retrieval_heads.heads import Head
from retrieval_heads.published import import_published
from retrieval_heads.records import TrialRecord
from retrieval_heads.scores import HeadScores
from retrieval_heads.selection import top_heads

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "published"


def reference_dir() -> Path | None:
    env = os.environ.get("RETRIEVAL_HEADS_REFERENCE")
    base = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "reference"
    for candidate in (base / "retrieval_head_scores", base):
        if candidate.is_dir() and list(candidate.glob("*.json")):
            return candidate
    return None


REFERENCE = reference_dir()


def record(
    trial_id: str,
    events=(),
    *,
    passed: bool = True,
    params: dict | None = None,
    recall: float | None = None,
    n_layers: int = 2,
    n_heads: int = 2,
    condition: HeadAblation | None = None,
) -> TrialRecord:
    table = [[0.0] * n_heads for _ in range(n_layers)]
    for _, layer, head, _ in events:
        table[layer][head] += 0.5
    return TrialRecord(
        trial_id=trial_id,
        params=params or {},
        expected="x",
        generated_ids=[1],
        generated_text="x",
        passed=passed,
        recall=recall if recall is not None else float(passed),
        reason=None,
        scores={"retrieval": table},
        copy_events=list(events),
        n_layers=n_layers,
        n_heads=n_heads,
        condition=condition,
    )


# ---------------------------------------------------------------------------------------------
# sparsity and bins

TABLE = np.array([[0.0, 0.05, 0.1, 0.1000001], [0.5, 0.7, 0.0, np.nan]])


def test_sparsity_is_strictly_above_threshold_and_skips_nan():
    # scored heads: 7; above 0.1: 0.1000001, 0.5, 0.7
    assert A.sparsity(TABLE) == pytest.approx(3 / 7)
    assert A.sparsity(TABLE, threshold=0.5) == pytest.approx(1 / 7)
    assert math.isnan(A.sparsity(np.full((1, 2), np.nan)))


def test_histogram_counts_by_hand():
    hist = A.histogram(TABLE)
    assert hist.labels == A.PAPER_BINS
    # 0: two zeros; (0, 0.1]: 0.05 and 0.1; (0.1, 0.5]: 0.1000001 and 0.5; > 0.5: 0.7
    assert hist.counts == (2, 2, 2, 1)
    assert hist.total == 7
    assert hist.shares == pytest.approx((2 / 7, 2 / 7, 2 / 7, 1 / 7))
    assert hist.to_dict()["counts"] == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="negative"):
        A.histogram(np.array([[-0.1, 0.2]]))


def test_sparsity_accepts_head_scores():
    hs = HeadScores(TABLE[None])
    assert A.sparsity(hs) == A.sparsity(TABLE)
    assert A.histogram(hs).counts == (2, 2, 2, 1)


# ---------------------------------------------------------------------------------------------
# agreement


def test_rank_with_ties():
    np.testing.assert_array_equal(A.rank_with_ties([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    np.testing.assert_array_equal(A.rank_with_ties([3, 1, 2]), [3, 1, 2])
    np.testing.assert_array_equal(A.rank_with_ties([5, 5, 5]), [2, 2, 2])
    np.testing.assert_array_equal(
        A.rank_with_ties([0.0, 1.0, 0.0, 1.0, 0.5]), [1.5, 4.5, 1.5, 4.5, 3]
    )


def test_identical_tables_correlate_at_one():
    rng = np.random.default_rng(0)
    t = rng.random((4, 5))
    assert A.pearson(t, t) == pytest.approx(1.0)
    assert A.spearman(t, t) == pytest.approx(1.0)
    assert A.jaccard_top_k(t, t, k=5) == 1.0
    assert A.pearson(t, -t) == pytest.approx(-1.0)
    # Spearman only sees order: a monotone transform keeps it at 1, Pearson drops below
    assert A.spearman(t, np.exp(10 * t)) == pytest.approx(1.0)
    assert A.pearson(t, np.exp(10 * t)) < 0.99


def test_spearman_with_ties_by_hand():
    a = np.array([[1.0, 2.0, 2.0, 3.0]])
    b = np.array([[1.0, 3.0, 2.0, 4.0]])
    # ranks a: 1, 2.5, 2.5, 4; b: 1, 3, 2, 4; Pearson of those:
    ra, rb = np.array([1, 2.5, 2.5, 4]), np.array([1, 3, 2, 4])
    da, db = ra - ra.mean(), rb - rb.mean()
    expected = (da @ db) / math.sqrt((da @ da) * (db @ db))
    assert A.spearman(a, b) == pytest.approx(expected)
    assert expected == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_correlation_edge_cases():
    assert math.isnan(A.pearson(np.ones((2, 2)), np.arange(4.0).reshape(2, 2)))
    with pytest.raises(ValueError, match="shape"):
        A.pearson(np.ones((2, 2)), np.ones((2, 3)))
    a = np.array([[1.0, 2.0, np.nan, 4.0]])
    b = np.array([[2.0, 4.0, 100.0, 8.0]])
    assert A.pearson(a, b) == pytest.approx(1.0)  # the NaN pair is dropped


def test_jaccard_of_a_permutation_by_hand():
    a = np.arange(6.0).reshape(2, 3)  # top-2: 1.2 (5), 1.1 (4)
    b = a.copy()
    b[1, 1], b[0, 0] = b[0, 0], b[1, 1]  # swap heads 1.1 and 0.0: top-2 now 1.2, 0.0
    assert top_heads(a, 2) == [Head(1, 2), Head(1, 1)]
    assert top_heads(b, 2) == [Head(1, 2), Head(0, 0)]
    assert A.jaccard_top_k(a, b, k=2) == pytest.approx(1 / 3)  # {1.2} / {1.2, 1.1, 0.0}
    assert A.jaccard_top_k(a, b, k=3) == pytest.approx(2 / 4)  # {1.2, 1.0} / 4 heads
    assert A.jaccard_top_k(a, b, k=6) == 1.0
    ag = A.agreement(a, b, k=2)
    assert ag.jaccard == pytest.approx(1 / 3) and ag.shared_top == (Head(1, 2),)
    assert ag.n_heads == 6 and ag.to_dict()["shared_top"] == ["1.2"]


def test_top_k_ties_and_nan():
    t = np.array([[0.5, 0.5], [np.nan, 0.5]])
    assert top_heads(t, 2) == [Head(0, 0), Head(0, 1)]
    assert top_heads(t, 10) == [Head(0, 0), Head(0, 1), Head(1, 1)]


# ---------------------------------------------------------------------------------------------
# activation frequency


def activation_records() -> list[TrialRecord]:
    # head 0.0 copies in every passing trial; 1.1 only at length 200; 0.1 in one trial
    return [
        record("a", [(0, 0, 0, 3), (1, 0, 0, 4)], params={"context_length": 100, "needle": "n1"}),
        record("b", [(0, 0, 0, 3), (0, 1, 1, 9)], params={"context_length": 200, "needle": "n1"}),
        record("c", [(0, 0, 0, 3), (2, 1, 1, 5)], params={"context_length": 200, "needle": "n2"}),
        record("d", [(0, 0, 0, 3), (0, 0, 1, 5)], params={"context_length": 100, "needle": "n2"}),
        record("e", [(0, 1, 0, 3)], passed=False, params={"context_length": 100, "needle": "n1"}),
    ]


def test_activation_frequency_by_hand():
    freq = A.activation_frequency(activation_records())
    np.testing.assert_allclose(freq, [[1.0, 0.25], [0.0, 0.5]])
    freq_all = A.activation_frequency(activation_records(), passing_only=False)
    np.testing.assert_allclose(freq_all, [[0.8, 0.2], [0.2, 0.4]])
    assert A.always_on_heads(activation_records()) == [Head(0, 0)]
    # from the retrieval scores instead of the events: the same here
    np.testing.assert_allclose(A.activation_frequency(activation_records(), from_scores=True), freq)


def test_activating_contexts_table():
    rows = A.activating_contexts(activation_records())
    # heads neither silent nor always on, most frequent first: 1.1 (0.5), 0.1 (0.25)
    assert [r.head for r in rows] == [Head(1, 1)] * 4 + [Head(0, 1)] * 4
    by = {(r.head.dotted, r.context, r.value): (r.n_active, r.n_trials) for r in rows}
    assert by[("1.1", "length", 100)] == (0, 2)
    assert by[("1.1", "length", 200)] == (2, 2)
    assert by[("1.1", "needle", "n1")] == (1, 2)
    assert by[("0.1", "needle", "n2")] == (1, 2)
    assert rows[0].key == "context_length" and rows[0].share == 0.0 and rows[1].share == 1.0
    assert "depth" not in {r.context for r in rows}  # no record has it
    only = A.activating_contexts(activation_records(), ["0.0"], keys={"needle": "needle"})
    assert [(r.value, r.n_active) for r in only] == [("n1", 2), ("n2", 2)]


def test_activation_needs_trials():
    with pytest.raises(ValueError, match="none passed"):
        A.activation_frequency([record("x", passed=False)])


# ---------------------------------------------------------------------------------------------
# tables across models


def fixture_models() -> dict[str, HeadScores]:
    return {p.stem: import_published(p) for p in sorted(FIXTURES.glob("*.json"))}


def test_universal_and_summary_tables_on_fixtures():
    models = fixture_models()
    rows = A.universal_table(models, top=2)
    assert [r.model for r in rows] == list(models)
    llama = next(r for r in rows if r.model == "llama-2-7b-80k")
    hs = models["llama-2-7b-80k"]
    assert llama.n_scored == 6 and llama.n_trials == 40
    assert llama.n_retrieval == int((A.score_table(hs)[hs.present] > 0.1).sum())
    assert llama.top[0][0] == hs.top(1)[0] and llama.max_score == llama.top[0][1]
    text = A.summary_table(models)
    lines = text.splitlines()
    assert len(lines) == 2 + len(models)
    assert lines[0].startswith("model") and set(lines[1]) <= {"-", " "}
    for name in models:
        assert any(line.startswith(name) for line in lines)
    # columns line up: each header starts where its dashes start
    starts = [i for i, c in enumerate(lines[1]) if c == "-" and (i == 0 or lines[1][i - 1] == " ")]
    assert len(starts) == 11


def test_format_table_alignment():
    text = A.format_table([["a", 1, 0.5], ["bbb", 10, 0.25]], ["name", "n", "x"], precision=2)
    assert text == ("name   n     x\n----  --  ----\na      1  0.50\nbbb   10  0.25\n")


# ---------------------------------------------------------------------------------------------
# K sweeps


def _ablation(k: int, selection: str, draw: int) -> HeadAblation:
    return HeadAblation(k, selection, draw, (), "uniform", "decode", f"{selection}|k={k}|d={draw}")


def test_k_sweep_by_hand():
    recs = [record(f"base{i}", passed=i < 3, recall=[1, 1, 1, 0][i]) for i in range(4)]
    for draw, passes in ((0, (True, False)), (1, (False, False)), (2, (True, True))):
        for j, ok in enumerate(passes):
            recs.append(
                record(
                    f"r{draw}{j}",
                    passed=ok,
                    recall=0.8 if ok else 0.2,
                    condition=_ablation(5, "random", draw),
                )
            )
    recs += [
        record("t0", passed=False, recall=0.1, condition=_ablation(5, "top", 0)),
        record("t1", passed=True, recall=0.9, condition=_ablation(5, "top", 0)),
    ]
    rows = A.summarise_k_sweep(recs)
    assert [(r.k, r.selection) for r in rows] == [(0, "none"), (5, "random"), (5, "top")]
    base, rand, top = rows
    assert base.accuracy == 0.75 and base.recall == 0.75 and base.n_draws == 1
    assert base.accuracy_std == 0.0
    # per-draw accuracy 0.5, 0, 1 -> mean 0.5, sample std 0.5; recall 0.5, 0.2, 0.8
    assert rand.n_draws == 3 and rand.n_trials == 6
    assert rand.accuracy == pytest.approx(0.5) and rand.accuracy_std == pytest.approx(0.5)
    assert rand.recall == pytest.approx(0.5) and rand.recall_std == pytest.approx(0.3)
    assert [d[1] for d in rand.per_draw] == [0.5, 0.0, 1.0]
    assert top.accuracy == 0.5 and top.recall == pytest.approx(0.5)
    text = A.format_k_sweep(rows)
    assert "0.500 ± 0.500" in text and text.splitlines()[0].split() == [
        "K",
        "selection",
        "draws",
        "trials",
        "accuracy",
        "recall",
    ]


def test_k_sweep_cells_are_every_k_sweep_tables_row():
    from retrieval_heads import cot
    from retrieval_heads.tiny.controls import ControlSweep
    from retrieval_heads.views._report_ablate import _k_sweep_table

    row = A.KSweepRow(5, "random", 3, 6, 0.5, 0.5, 0.5, 0.3)
    cells = [5, "random", 3, 6, "0.500 ± 0.500", "0.500 ± 0.300"]
    assert A.k_sweep_cells(row) == cells
    line = "5  random         3       6  0.500 ± 0.500  0.500 ± 0.300"
    assert A.format_k_sweep([row]).splitlines()[2] == line
    assert ControlSweep([], {"niah": [row]}).table().splitlines()[2] == "niah  " + line
    summary = cot.format_summary({("fact", "direct"): [row]})
    # its header "answers" is one wider than "trials"
    assert summary.splitlines()[2] == "fact  direct     " + line.replace("3       6", "3        6")
    html = "".join(f"<td>{c}</td>" if c == "random" else f'<td class="num">{c}</td>' for c in cells)
    assert f"<tr>{html}</tr>" in _k_sweep_table([row])


# ---------------------------------------------------------------------------------------------
# the published reference files: figures that go into the docs

# model: (layers, heads, trials, heads with mean > 0.1, heads with mean > 0.5, bins)
REFERENCE_FIGURES = {
    "Mistral-7B-v0.2-hf": (32, 32, 362, 43, 5, (666, 315, 38, 5)),
    "Mixtral-8x7B-v0.1": (32, 32, 390, 63, 7, (590, 371, 56, 7)),
    "Qwen1.5-14B-Chat": (40, 40, 221, 68, 1, (1138, 394, 67, 1)),
    "Qwen1.5-14B": (40, 40, 390, 61, 10, (855, 684, 51, 10)),
    "Yi-6B-200K": (32, 32, 567, 53, 7, (506, 465, 46, 7)),
    "llama-2-13b-64k": (40, 40, 367, 33, 6, (1171, 396, 27, 6)),
    "llama-2-7b-80k": (32, 32, 586, 33, 6, (719, 272, 27, 6)),
}


@pytest.mark.skipif(REFERENCE is None, reason="published reference scores not found")
@pytest.mark.parametrize("name", sorted(REFERENCE_FIGURES))
def test_reference_sparsity_figures(name):
    layers, heads, trials, above, above_half, bins = REFERENCE_FIGURES[name]
    hs = import_published(REFERENCE / f"{name}.json")
    assert hs.shape == (layers, heads) and hs.n_total == trials
    assert len(hs.above(0.1)) == above and len(hs.above(0.5)) == above_half
    assert A.sparsity(hs) == pytest.approx(above / (layers * heads))
    assert A.histogram(hs).counts == bins
    assert hs.mean.max() < 1.01  # the authors' counting lets a few means pass 1 slightly
