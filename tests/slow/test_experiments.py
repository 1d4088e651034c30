"""Every experiment script end to end on the embedded model, with reduced grids.

Each script's ``main([...])`` runs in-process. One small detection (tiny, 6 trials) feeds the
scripts that need scores (``--scores``), and the tiny-short detection made by ``universal``
feeds ``intrinsic``, so the whole file stays within a few minutes on two CPU cores. The
assertions are the claims, with room: the numbers measured with the defaults are in
``docs/reproducing.md``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def reference_dir() -> Path | None:
    """The published score files: $RETRIEVAL_HEADS_REFERENCE, or <repo>/../shared/reference."""
    env = os.environ.get("RETRIEVAL_HEADS_REFERENCE")
    base = Path(env) if env else EXPERIMENTS.parents[1] / "shared" / "reference"
    for candidate in (base / "retrieval_head_scores", base):
        if candidate.is_dir() and list(candidate.glob("*.json")):
            return candidate
    return None


def script(name: str):
    """An experiment script as a module (its folder first on the path, as when run)."""
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experiments")


@pytest.fixture(scope="module")
def detection(runs) -> Path:
    """Claim 1's run; its detection directory is reused by the later scripts."""
    summary = script("sparse").main(
        ["--out", str(runs / "sparse"), "--lengths", "200,600", "--n-needles", "1"]
    )
    assert summary["trials"] == 6
    return runs / "sparse" / "detect"


def read(path: Path):
    return json.loads(path.read_text())


def test_sparse(detection, runs):
    out = runs / "sparse"
    summary = read(out / "summary.json")
    assert summary["n_heads"] == 64 and summary["passing_trials"] >= 5
    assert 0 < summary["share"] < 0.25  # a few heads, not many
    assert summary["top"][0][1] > 0.5  # and they really copy
    assert sum(summary["histogram"]["counts"]) == 64
    assert summary["histogram"]["counts"][0] > 32  # most heads never copy
    for name in ("table.txt", "histogram.html", "heatmap.html"):
        assert (out / name).stat().st_size > 0
    assert "plotly" in (out / "histogram.html").read_text()[:5_000_000]


@pytest.mark.golden
def test_universal_and_intrinsic(detection, runs):
    rows = script("universal").main(
        ["--models", f"tiny={detection}", "tiny-short", "--out", str(runs / "universal")]
        + ["--lengths", "100,250", "--depths", "0,100", "--n-needles", "1"]
    )
    by = {r.model: r for r in rows}
    assert set(by) == {"tiny", "tiny-short"}
    for row in rows:
        assert row.n_scored == 64 and 1 <= row.n_retrieval and row.share < 0.3
        assert row.max_score > 0.5
    table = (runs / "universal" / "table.txt").read_text()
    assert "tiny-short" in table and "(0.1, 0.5]" in table

    short = runs / "universal" / "detect-tiny-short"
    assert {
        t["params"]["context_length"] for t in map(json.loads, (short / "trials.jsonl").open())
    } <= set(range(251))
    result = script("intrinsic").main(
        [str(short), str(detection), "--k", "6,10", "--out", str(runs / "intrinsic")]
    )
    assert result["a"]["label"] == "tiny-short" and result["b"]["label"] == "tiny"
    assert result["spearman"] > 0.5 and result["pearson"] > 0.8
    assert result["jaccard"]["6"] >= 0.5
    assert set(result["retrieval_shared"]) >= {"2.6", "2.7"}
    assert (runs / "intrinsic" / "scatter.html").exists()


def test_dynamic(detection, runs):
    result = script("dynamic").main(["--scores", str(detection), "--out", str(runs / "dynamic")])
    assert result["note"] is None and result["passing_trials"] >= 5
    top = read(runs / "sparse" / "summary.json")["top"][0][0]
    assert top in result["always_on"]  # the strongest head copies in every context
    assert result["n_always_on"] + result["n_dynamic"] + result["n_silent"] == 64
    assert result["n_dynamic"] >= 1
    contexts = read(runs / "dynamic" / "contexts.json")
    assert {c["context"] for c in contexts} == {"length", "depth", "needle"}
    assert all(0 <= c["n_active"] <= c["n_trials"] for c in contexts)


def test_causal_sweep(detection, runs):
    result = script("causal_sweep").main(
        ["--scores", str(detection), "--ks", "0,6", "--draws", "1", "--out", str(runs / "causal")]
        + ["--sweep-lengths", "300", "--sweep-needles", "2"]
    )
    assert result["trials"] == 6
    base = result["baseline"]["accuracy"]
    (k6,) = result["per_k"]
    assert k6["k"] == 6 and base >= 5 / 6
    assert k6["top"]["accuracy"] <= base - 2 / 6  # the top-6 are needed
    assert k6["random"]["accuracy"] >= base - 1 / 6  # 6 random heads are not
    assert not set(k6["random"]["heads_per_draw"][0]) & set(k6["top"]["heads_per_draw"][0])
    assert (runs / "causal" / "k_sweep.html").exists()


@pytest.mark.golden
def test_kv_cache_what_if(detection, runs):
    result = script("kv_cache").main(
        ["--scores", str(detection), "--ks", "0,2", "--draws", "2", "--out", str(runs / "kv")]
        + ["--sweep-lengths", "300,700", "--sweep-needles", "1"]
    )
    assert result["trials"] == 10 and result["baseline"] >= 0.9
    top = result["chosen"]
    # two KV heads of the retrieval layer keep the whole context: ~13% of the cache suffices
    assert top["k"] <= 2 and top["accuracy"] >= result["baseline"] - 0.05
    assert result["chosen_within_tolerance"] is True
    assert top["kv_share"] < 0.2
    # ... while as many random KV heads, or windowing every head with as much memory, fail
    assert result["random_same_k"]["accuracy"] <= top["accuracy"] - 0.3
    assert result["uniform_at_least_that_share"]["accuracy"] <= top["accuracy"] - 0.3
    listing = read(runs / "kv" / "full_attention_heads.json")
    assert {layer for layer, _ in listing["full_attention_heads"]} == {2}  # the copy layer
    assert (runs / "kv" / "duo_attention" / "full_attention_heads.tsv").exists()


@pytest.mark.golden
def test_cot_on_the_embedded_model(detection, runs):
    result = script("cot").main(
        ["--scores", str(detection), "--ks", "0,6", "--draws", "1", "--n", "4"]
        + ["--length", "160", "--out", str(runs / "cot")]
    )
    s = result["summary"]
    assert set(s) == {"chain", "fact"}
    assert s["chain"]["none K=0"]["accuracy"] >= 0.75
    assert s["fact"]["none K=0"]["accuracy"] >= 0.75
    # chain following needs the retrieval heads in particular: top-6 breaks it, random-6 not
    assert s["chain"]["drop_top"] >= 0.75
    assert s["chain"]["drop_random"] <= 0.25
    # facts come from the weights: the top-6 hurt them less than they hurt chains (masking 6 of
    # 64 heads can cost a few facts, whichever heads; measured: top 3/4, random 1/4 right)
    assert s["fact"]["top K=6"]["accuracy"] >= 0.5
    assert s["fact"]["drop_top"] < s["chain"]["drop_top"]


def test_cot_harness_on_a_random_model(runs, tiny_llama_dir, word_tokenizer):
    """The real-model harness runs end to end (answers are nonsense: the tokenizer cannot
    spell English), records every answer with its ablation, and grades deterministically."""
    from retrieval_heads import cot
    from retrieval_heads.store import load_records

    # heads 0.0 and 0.1 are the "retrieval heads"; the other six score below the threshold
    scores = {f"{layer}-{head}": [0.05] for layer in range(2) for head in range(4)}
    scores.update({"0-0": [0.9], "0-1": [0.8]})
    score_file = runs / "llama-scores.json"
    score_file.write_text(json.dumps(scores))
    questions = EXPERIMENTS / "questions.jsonl"
    out = runs / "harness"
    argv = ["--model", str(tiny_llama_dir), "--scores", str(score_file), "--questions"]
    argv += [str(questions), "--ks", "0,2", "--draws", "1", "--max-direct", "3"]
    argv += ["--max-cot", "6", "--out", str(out)]
    result = script("cot").main(argv)
    assert result["setting"] == "harness"

    records = load_records(out / "answers")
    n_questions = len(cot.load_questions(questions))
    assert len(records) == 3 * n_questions * 2  # (none, top-2, random-2) x questions x 2
    by_condition = {}
    for r in records:
        p, c = r.params, r.condition
        assert p["prompting"] in ("direct", "cot") and p["kind"] in cot.KINDS
        assert len(c.heads) == c.k and (c.mode, c.phase) == ("uniform", "decode")
        assert r.scores == {}  # no head scores: nothing is copied from a context
        assert len(r.generated_ids) <= (3 if p["prompting"] == "direct" else 6)
        by_condition.setdefault(c.selection, set()).add(tuple(c.heads))
        question = next(q for q in cot.load_questions(questions) if q.id == p["question_id"])
        again = cot.grade_question(question, r.generated_text, cot=p["prompting"] == "cot")
        assert (again.passed, again.score) == (r.passed, r.recall)
    assert by_condition["none"] == {()}
    assert by_condition["top"] == {("0.0", "0.1")}
    (random_heads,) = by_condition["random"]
    assert not {"0.0", "0.1"} & set(random_heads)
    summary = read(out / "cot.json")["summary"]
    assert {"numeric/direct", "choice/cot", "extractive/cot", "all/direct"} <= set(summary)

    # a rerun resumes: nothing new, the same answers
    before = [(r.trial_id, r.generated_ids) for r in records]
    script("cot").main(argv)
    assert [(r.trial_id, r.generated_ids) for r in load_records(out / "answers")] == before


REFERENCE = reference_dir()


@pytest.mark.skipif(REFERENCE is None, reason="published reference scores not found")
def test_published_scores(runs):
    result = script("published_scores").main([str(REFERENCE), "--out", str(runs / "published")])
    sparsity = result["sparsity"]
    assert 0.03 <= sparsity["Mistral-7B-v0.2-hf"]["share"] <= 0.06
    assert all(s["share"] < 0.07 for s in sparsity.values())  # under ~5% everywhere
    pairs = result["agreement"]
    assert pairs["Qwen1.5-14B vs Qwen1.5-14B-Chat"]["pearson"] > 0.8
    assert pairs["Mistral-7B-v0.2-hf vs Mixtral-8x7B-v0.1"]["spearman"] > 0.8
    assert "copy events" in result["dynamic_note"]
    assert "Mistral-7B-v0.2-hf" in (runs / "published" / "table.txt").read_text()


def test_real_models_driver_runs_every_stage_and_resumes(runs):
    """``experiments/real_models.py`` (the real-model findings) end to end on tiny's small grid:
    every stage writes its file, the summary gathers them, and a rerun redoes nothing."""
    out = runs / "real"
    argv = ["--model", "tiny", "--out", str(out), "--lengths", "150,300", "--n-depths", "2",
            "--n-needles", "1", "--ks", "2", "--draws", "1", "--sweep-lengths", "300",
            "--sweep-depths", "50", "--sweep-needles", "1", "--kv-ks", "2", "--kv-draws", "1"]  # fmt: skip
    driver = script("real_models")
    summary = driver.main(argv)
    for stage in ("sparse", "dynamic", "scorers", "layers", "causal", "kv"):
        assert stage in summary, stage
    assert "cot" not in summary  # tiny is no instruct model: the stage says so and skips
    assert summary["layers"]["windows"] == [None] * 8
    events = summary["layers"]["copy_events_by_needle_distance"]
    assert events["near"]["global"] > 0 and events["far"] == {"global": 0, "sliding": 0}
    assert set(summary["scorers"]["pairs"]) == {
        "retrieval vs topk", "retrieval vs attention_mass", "topk vs attention_mass"
    }  # fmt: skip
    assert (out / "report.html").stat().st_size > 100_000
    done = (out / "causal" / "ablate" / "trials.jsonl").read_bytes()
    driver.main([*argv, "--stages", "causal"])
    # resumed: every record (its elapsed_s included) is the first run's, none redone
    assert (out / "causal" / "ablate" / "trials.jsonl").read_bytes() == done
