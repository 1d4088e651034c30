"""Views: plotly figures, circuitsvis attention views and the HTML report (no browser here;
``test_report_browser.py`` loads the report in headless Chromium)."""

from __future__ import annotations

import dataclasses
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from retrieval_heads import analysis
from retrieval_heads.heads import Head
from retrieval_heads.scores import HeadScores
from retrieval_heads.store import load_results
from retrieval_heads.views import (
    CircuitsVisView,
    _sample,
    activation_frequency_heatmap,
    answer_class_figure,
    attention_view,
    build_report,
    circuitsvis_js,
    k_sweep_figure,
    model_scatter,
    niah_grid,
    niah_heatmap,
    render_report,
    score_heatmap,
    score_histogram,
    score_vs_effect,
)
from retrieval_heads.views._html import script_json

EVIL = "</script><script>alert(1)</script>"
EVIL_TAG = '<img/src="x"/onerror=alert(1)>'  # no spaces: circuitsvis turns them into &nbsp;
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "published"
MAX_REPORT_BYTES = 15_000_000


class _Scripts(HTMLParser):
    """Script elements and their text, as an HTML parser (and a browser) splits the page."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict] = []
        self.tags: list[str] = []
        self._in = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "script":
            self.scripts.append({"attrs": dict(attrs), "text": ""})
            self._in = True

    def handle_endtag(self, tag):
        if tag == "script":
            self._in = False

    def handle_data(self, data):
        if self._in:
            self.scripts[-1]["text"] += data


def parse(text: str) -> _Scripts:
    parser = _Scripts()
    parser.feed(text)
    parser.close()
    return parser


@pytest.fixture(scope="module")
def results_root(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(7)
    base = _sample.sample_scores(rng, 8, 8)
    tuned = np.clip(base + rng.normal(0, 0.05, base.shape) * (base > 0), 0, 1)
    tuned[2, 3] = 0.8  # a head the fine-tune gained
    return {
        "detect": _sample.write_detection(
            root / "detect",
            model=f"evil-model {EVIL}",
            needle_text=f"The secret is {EVIL} {EVIL_TAG}",
            answer=f"{EVIL} & more",
            table=base,
            extra_meta={"n_kv_heads": 4, "note": EVIL},
        ),
        "detect2": _sample.write_detection(
            root / "detect2", model="sample-instruct", table=tuned, seed=3, extra_scorer="patching"
        ),
        "ablate": _sample.write_ablation(root / "ablate", model="sample"),
    }


# ---- figures --------------------------------------------------------------------------------


def test_score_heatmap_hover_has_label_ci_and_counts(results_root):
    _, scores, _ = load_results(results_root["detect"])
    fig = score_heatmap(scores, title="t")
    assert isinstance(fig, go.Figure)
    (trace,) = fig.data
    assert np.asarray(trace.z, dtype=float).shape == (8, 8)
    cell = trace.customdata[2][3]
    assert cell[0] == "2.3"
    assert re.fullmatch(r"\[\d\.\d{3}, \d\.\d{3}\]", cell[1])
    assert int(cell[2]) == scores.n[2, 3]
    for word in ("head", "score", "95% CI", "passing trials", "copied in"):
        assert word in trace.hovertemplate
    assert fig.layout.yaxis.autorange == "reversed"


def test_score_heatmap_kv_heads(results_root):
    _, scores, _ = load_results(results_root["detect"])
    fig = score_heatmap(scores, kv_heads=4)
    z = np.asarray(fig.data[0].z, dtype=float)
    np.testing.assert_allclose(z, scores.kv_heads(4), equal_nan=True)
    assert fig.data[0].customdata[0][1][0] == "0.kv1"
    with pytest.raises(ValueError):
        score_heatmap(scores.mean, kv_heads=4)


def test_histogram_uses_paper_bins_on_a_log_axis(results_root):
    _, scores, _ = load_results(results_root["detect"])
    fig = score_histogram(scores)
    assert list(fig.data[0].x) == ["0", "(0, 0.1]", "(0.1, 0.5]", "&gt; 0.5"]
    assert list(fig.data[0].y) == list(analysis.histogram(scores).counts)
    assert fig.layout.yaxis.type == "log"
    two = score_histogram({"a": scores, "b": scores.mean})
    assert len(two.data) == 2


def test_niah_grid_and_side_by_side_panels(results_root):
    records = load_results(results_root["ablate"])[2]
    base = [r for r in records if r.condition.k == 0]
    xs, ys, values, counts = niah_grid(base)
    assert xs == [1000, 2000, 4000, 8000] and ys == [0.0, 33.0, 67.0, 100.0]
    r = base[0]
    i, j = ys.index(r.params["depth_percent"]), xs.index(r.params["context_length"])
    cell = [
        b
        for b in base
        if b.params["depth_percent"] == r.params["depth_percent"]
        and b.params["context_length"] == r.params["context_length"]
    ]
    assert counts[i, j] == len(cell)
    assert values[i, j] == pytest.approx(np.mean([b.passed for b in cell]))
    top = [r for r in records if (r.condition.k, r.condition.selection) == (20, "top")]
    fig = niah_heatmap({"baseline": base, "top-20": top}, metric="recall")
    assert len(fig.data) == 2
    assert [t.showscale for t in fig.data] == [False, True]
    scale = fig.data[0].colorscale
    assert scale[0][1].upper() == "#F0496E" and scale[-1][1].upper() == "#0CD79F"
    assert fig.data[0].zmin == 0 and fig.data[0].zmax == 1
    assert [a.text for a in fig.layout.annotations] == ["baseline", "top-20"]


def test_k_sweep_figure_has_lines_and_bands(results_root):
    records = load_results(results_root["ablate"])[2]
    rows = analysis.summarise_k_sweep(records)
    fig = k_sweep_figure(rows)
    names = [t.name for t in fig.data]
    assert "top-K" in names and "random-K" in names
    random_line = next(t for t in fig.data if t.name == "random-K")
    assert list(random_line.x) == [0, 1, 2, 5, 10, 20]
    band = [t for t in fig.data if t.fill == "toself"]
    assert len(band) == 1  # random draws only: top-K has one draw
    assert fig.layout.xaxis.title.text.startswith("K")


def test_scatters_label_the_heads_that_move(results_root):
    _, a, _ = load_results(results_root["detect"])
    _, b, _ = load_results(results_root["detect2"])
    fig = model_scatter(a, b, names=("base", "tuned"), n_labels=3)
    labels = {t for trace in fig.data if trace.text for t in trace.text if t}
    moved = np.abs(b.mean - a.mean)
    assert "2.3" in labels and len(labels) == 3
    assert Head(*np.unravel_index(np.nanargmax(moved), moved.shape)).dotted in labels
    assert "Pearson" in fig.layout.title.text
    effects = np.zeros((8, 8))
    effects[5, 5] = -0.9
    fig = score_vs_effect(a, effects, n_labels=2)
    labels = {t for trace in fig.data for t in trace.text if t}
    assert "5.5" in labels and a.top(1)[0].dotted in labels
    with pytest.raises(ValueError):
        score_vs_effect(a, np.zeros((2, 2)))


def test_activation_frequency_and_answer_classes(results_root):
    records = load_results(results_root["detect"])[2]
    fig = activation_frequency_heatmap(records)
    np.testing.assert_allclose(
        np.asarray(fig.data[0].z, dtype=float), analysis.activation_frequency(records)
    )
    ablate = load_results(results_root["ablate"])[2]
    groups = {
        "baseline": [r for r in ablate if r.condition.k == 0],
        "top 20": [r for r in ablate if (r.condition.k, r.condition.selection) == (20, "top")],
    }
    fig = answer_class_figure(groups)
    assert fig.layout.barmode == "stack"
    total = np.sum([np.asarray(t.y) for t in fig.data], axis=0)
    np.testing.assert_allclose(total, 1.0)


def test_published_scores_draw(tmp_path):
    scores = load_results(FIXTURES / "Mistral-7B-v0.2-hf.json")[1]
    fig = score_heatmap(scores)
    assert np.isnan(np.asarray(fig.data[0].z, dtype=float)).sum() == scores.present.size - 6
    score_histogram(scores)


# ---- attention views ------------------------------------------------------------------------


def fake_trial(n_tokens=32_000, n_steps=5, needle=(16_000, 16_012), seed=0):
    """Token strings and [head, step, key] rows of a long trial, without a model."""
    rng = np.random.default_rng(seed)
    tokens = [f" w{i}" for i in range(n_tokens)]
    tokens[needle[0] + 2] = EVIL
    tokens[needle[0] + 3] = EVIL_TAG
    prompt = n_tokens - n_steps
    queries = [prompt - 1 + s for s in range(n_steps)]
    rows = np.zeros((2, n_steps, n_tokens))
    for s, q in enumerate(queries):
        weights = rng.random((2, q + 1)) ** 8
        rows[:, s, : q + 1] = weights / weights.sum(axis=1, keepdims=True)
        rows[0, s] *= 0.5
        rows[0, s, needle[0] + 2 + s] += 0.5  # head 0 copies from the needle
    events = [(s, 3, 1, needle[0] + 2 + s) for s in range(3)]
    return tokens, rows, queries, events


def test_attention_view_crops_a_long_context_and_keeps_mass():
    tokens, rows, queries, events = fake_trial()
    view = attention_view(
        tokens,
        rows,
        ["3.1", "4.0"],
        queries,
        needle_span=(16_000, 16_012),
        answer_span=(16_002, 16_006),
        question_span=(31_980, 31_995),
        copy_events=events + [(0, 9, 9, 5)],  # another head's event is not shown
        window=16,
        title=f"trial {EVIL}",
    )
    n_context = queries[0] + 1
    assert f"of {n_context:,}" in view.crop and "15,984–16,027" in view.crop
    grid = view.grid
    # rows: the answer steps, labelled with the token each generated
    assert grid.row_labels == tuple(f"{s}: {tokens[q + 1]}" for s, q in enumerate(queries))
    # columns: a cropped context; hidden stretches and the generated tokens folded
    assert len(grid.col_labels) <= 80 and grid.weights.shape == (2, 5, len(grid.col_labels))
    assert all(p < n_context for p in grid.crop.shown)
    assert (
        grid.crop.items[-1] == (n_context, len(tokens))
        and grid.crop.answer_item == len(grid.crop.items) - 1
    )
    assert set(range(16_000, 16_012)) <= set(grid.crop.shown)
    assert any(t.startswith("[… ") for t in grid.col_labels)
    # folding keeps every answer step's total attention
    np.testing.assert_allclose(grid.weights.sum(axis=-1), 1.0, atol=1e-9)
    # copied tokens are marked in the grid's cells and labels, only for the shown heads
    copied_cols = {i for i, t in enumerate(grid.col_labels) if t.endswith("✓")}
    assert len(copied_cols) == 3
    assert grid.copies == {(0, s, col) for s, col in enumerate(sorted(copied_cols))}
    assert [r["head"] for r in view.copy_rows] == ["3.1"] * 3
    # circuitsvis views: ColoredTokens per head, markup neutralised for their innerHTML
    assert [v.element for v in view.views] == ["ColoredTokens", "ColoredTokens"]
    labels = view.views[0].props["tokens"]
    assert not any(c in t for t in labels for c in "<>&")
    assert any("‹/script›‹script›alert(1)‹/script›✓" in t for t in labels)
    html = view.to_html()
    parsed = parse(html)
    assert len(parsed.scripts) == 2 and "img" not in parsed.tags
    assert all("alert(1)" != s["text"].strip() for s in parsed.scripts)
    assert html.count('class="ag-copy"') == 3 and html.count('class="ag"') == 2
    assert "&lt;/script&gt;" in html  # the title, the grid and the copy table, escaped


def test_attention_view_narrows_the_window_and_validates():
    tokens, rows, queries, events = fake_trial(n_tokens=2_000, n_steps=3, needle=(900, 910))
    view = attention_view(tokens, rows, ["3.1", "4.0"], queries, window=200, max_tokens=60)
    assert any("narrowed" in n for n in view.notes)
    assert any("most attended" in n for n in view.notes)
    assert len(view.grid.col_labels) <= 60
    assert len(view.views[0].props["tokens"]) <= 60
    with pytest.raises(ValueError):
        attention_view(tokens, rows, ["3.1"], queries)
    with pytest.raises(ValueError):
        attention_view(tokens, rows[:, :2], ["3.1", "4.0"], queries)


def test_circuitsvis_view_is_script_safe_and_inlines_no_cdn():
    js = circuitsvis_js()
    assert "CircuitsVis" in js and len(js) > 500_000
    assert "</script" not in js.lower() and "<!--" not in js
    view = CircuitsVisView("ColoredTokens", {"tokens": [EVIL, "b"], "values": [0.1, 0.2]}, EVIL)
    html = view.to_html("v1")
    assert "unpkg" not in html and "cdn" not in html.lower()
    parsed = parse(html)
    assert len(parsed.scripts) == 1
    assert parsed.scripts[0]["text"].startswith(
        'CircuitsVis.render("v1", CircuitsVis.ColoredTokens'
    )
    assert "\\u003c/script\\u003e" in parsed.scripts[0]["text"]
    payload = parsed.scripts[0]["text"].split("ColoredTokens, ", 1)[1].rsplit(");", 1)[0]
    assert json.loads(payload)["tokens"][0] == EVIL
    with pytest.raises(ValueError):
        CircuitsVisView("x); alert(1", {})
    assert script_json({"a": float("nan")}) == '{"a":null}'


@pytest.fixture(scope="module")
def tiny_model():
    from retrieval_heads import load_model

    return load_model("tiny")


def test_trial_attention_with_the_tiny_model(tiny_model):
    import torch

    from retrieval_heads.records import TrialRecord
    from retrieval_heads.tiny.trials import tiny_haystack, tiny_needles, tiny_template
    from retrieval_heads.trials.builder import build_trial
    from retrieval_heads.views import trial_attention

    model = tiny_model
    trial = build_trial(
        model.tokenizer,
        tiny_haystack(),
        tiny_needles(1, seed=3)[0],
        length=300,
        depth_percent=50,
        template=tiny_template(),
    )
    state = model.prefill(torch.tensor([trial.input_ids]))
    generated = [int(state.last_logits.argmax(-1))]
    for _ in range(3):
        generated.append(int(model.step(state, torch.tensor(generated[-1:])).argmax(-1)))
    a0 = trial.answer_span[0]
    record = TrialRecord(
        trial_id=trial.trial_id,
        params={},
        expected=trial.answer,
        generated_ids=generated,
        generated_text=model.to_string(generated),
        passed=True,
        recall=1.0,
        reason=None,
        scores={"retrieval": np.zeros((model.n_layers, model.n_heads))},
        copy_events=[(0, 6, 2, a0)],
        n_layers=model.n_layers,
        n_heads=model.n_heads,
    )
    view = trial_attention(model, record, trial, ["6.2", "7.5"], window=8, max_steps=3)
    grid = view.grid
    prompt = len(trial.input_ids)
    rows = model.attention_rows(
        torch.tensor(list(trial.input_ids) + generated[:3]), [prompt - 1 + s for s in range(3)]
    )
    # rows: the 3 answer steps, each labelled with the token the model generated there
    words = model.to_str_tokens(torch.tensor(generated[:3]))
    assert grid.row_labels == tuple(f"{s}: {w}" for s, w in enumerate(words))
    # columns: the context around the needle, cropped; every step's mass is kept
    assert grid.crop.n_context == prompt and max(grid.crop.shown) < prompt
    assert len(grid.crop.shown) < prompt
    assert set(range(*trial.target.span)) <= set(grid.crop.shown)
    np.testing.assert_allclose(grid.weights.sum(-1), 1.0, atol=1e-3)
    # each cell is the model's weight; every key a shown head gives 2% or more is a column
    col = next(i for i, t in enumerate(grid.col_labels) if t.endswith("✓"))
    assert grid.crop.items[col] == (a0, a0 + 1) and (0, 0, col) in grid.copies
    assert grid.weights[0, 0, col] == pytest.approx(float(rows[6, 2, 0, a0]), abs=1e-4)
    picked = torch.stack([rows[6, 2], rows[7, 5]])[:, :, :prompt]
    attended = set(torch.nonzero(picked.amax(dim=(0, 1)) >= 0.02).flatten().tolist())
    assert attended and attended <= set(grid.crop.shown)
    assert grid.needle == tuple(trial.target.span) and grid.answer == trial.answer_span
    assert view.copy_rows[0]["head"] == "6.2"
    assert "Showing the first 3 of 4 answer steps." in view.notes
    assert f"{trial.target.span[0] - 8:,}" in view.crop


# ---- the report -----------------------------------------------------------------------------


def test_report_is_self_contained_escaped_and_small(results_root, tmp_path):
    out = build_report(
        [results_root["detect"], results_root["ablate"], results_root["detect2"]],
        tmp_path / "report.html",
    )
    text = out.read_text(encoding="utf-8")
    size = out.stat().st_size
    assert size < MAX_REPORT_BYTES
    parsed = parse(text)
    n_figures = int(re.search(r'data-figures="(\d+)"', text).group(1))
    assert n_figures == text.count('class="plotly-graph-div"') >= 14
    # plotly.js once, inline; one script per figure; no circuitsvis without views; no src=
    assert len(parsed.scripts) == 1 + n_figures
    assert sum(len(s["text"]) > 3_000_000 for s in parsed.scripts) == 1
    assert all("src" not in s["attrs"] for s in parsed.scripts)
    assert not re.search(r"""<(script|link|img|iframe)[^>]+(src|href)=["']?https?:""", text)
    page = text
    for script in parsed.scripts:
        if len(script["text"]) > 1_000_000:
            page = page.replace(script["text"], "")
    assert (
        "unpkg.com" not in page and "cdn.plot.ly" not in page
    )  # the libraries' own defaults aside
    assert "Content-Security-Policy" in text and "connect-src 'none'" in text
    # results text escaped everywhere: no script element is the injected one
    assert not any(s["text"].strip() == "alert(1)" for s in parsed.scripts)
    assert "img" not in parsed.tags
    assert "evil-model &lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert EVIL not in text
    for what in ("score heatmap", "kv-head heatmap", "NIAH grid", "K-sweep", "answer classes"):
        assert f'data-figure="{what}"' in text
    assert 'data-figure="model scatter"' in text and 'data-figure="scorer patching"' in text
    assert "Attention views need the model" in text
    assert 'class="error"' not in text
    # deterministic
    again = render_report([results_root["detect"], results_root["ablate"], results_root["detect2"]])
    assert again == text


def test_report_on_published_files_and_mismatched_shapes(tmp_path):
    files = [FIXTURES / "Qwen1.5-14B.json", FIXTURES / "Qwen1.5-14B-Chat.json"]
    shapes = {load_results(f)[1].shape for f in files}
    text = render_report(files)
    assert "Qwen1.5-14B-Chat" in text and 'class="error"' not in text
    if len(shapes) == 1:
        assert 'data-figure="model scatter"' in text
    else:
        assert "not comparable head by head" in text


def test_report_with_the_tiny_model_renders_attention_views(tmp_path, tiny_model):
    from retrieval_heads.tiny.trials import tiny_grid

    model = tiny_model
    grid = tiny_grid(model.tokenizer, lengths=[300, 600], depths=[0, 50, 100], n_needles=2)
    detect = _sample.write_trial_detection(
        tmp_path / "detect",
        grid,
        n_layers=model.n_layers,
        n_heads=model.n_heads,
        tokenizer=model.tokenizer,
    )
    records = load_results(detect)[2]
    # Each record is the one of its trial: same id, answer, and copies of that trial's answer.
    by_id = {t.trial_id: t for t in grid}
    assert sorted(r.trial_id for r in records) == sorted(by_id)
    for r in records:
        trial = by_id[r.trial_id]
        assert r.expected == trial.answer and r.params["answer_span"] == list(trial.answer_span)
        a0, a1 = trial.answer_span
        if r.passed:
            assert r.generated_ids == list(trial.input_ids[a0:a1])
            assert r.generated_text == trial.answer
        assert all(a0 <= pos < a1 for _, _, _, pos in r.copy_events)
    passing = [r for r in records if r.passed]
    assert len(passing) >= 3
    trials = {r.trial_id: by_id[r.trial_id] for r in passing[:3]}
    text = render_report([detect], model=model, trials=trials, trial_views=2, heads_per_view=3)
    n_views = int(re.search(r'data-views="(\d+)"', text).group(1))
    assert n_views == 2 * 3  # per trial, one ColoredTokens per head
    assert text.count('class="ag"') == 2 * 3  # and one answer-steps x context grid per head
    assert text.count('class="cv-root"') == n_views
    # The views are of the records' own trials: titled by them, expecting their answers.
    titles = re.findall(r'<h4 class="trial-title">([^<]*)</h4>', text)
    assert len(titles) == 2
    for title in titles:
        tid = re.match(r"Trial (\w+):", title).group(1)
        assert tid in trials and f"expected &#x27;{trials[tid].answer}&#x27;" in title, title
    parsed = parse(text)
    n_figures = int(re.search(r'data-figures="(\d+)"', text).group(1))
    assert len(parsed.scripts) == 2 + n_figures + n_views  # plotly.js, circuitsvis, one each
    assert sum("var CircuitsVis" in s["text"] for s in parsed.scripts) == 1
    assert 'class="error"' not in text
    # plain input ids instead of Trials: the answer span comes from the record's params
    ids = {tid: list(t.input_ids) for tid, t in trials.items()}
    text = render_report([detect], model=model, trials=ids, trial_views=1, heads_per_view=2)
    assert 'data-views="2"' in text and "No needle span given" not in text
    # ... and a record without spans: the window centres on its copy events (its answer)
    from retrieval_heads.views import trial_attention

    record = next(r for r in passing if r.copy_events and r.trial_id in trials)
    bare = dataclasses.replace(
        record, params={k: v for k, v in record.params.items() if k != "answer_span"}
    )
    heads = sorted({(layer, head) for _, layer, head, _ in bare.copy_events})[:2]
    view = trial_attention(model, bare, ids[bare.trial_id], heads, window=4)
    assert "No needle span given: the window is centred on the tokens copied." in view.notes
    assert set(range(*trials[bare.trial_id].answer_span)) <= set(view.grid.crop.shown)
    # without the inputs: the records carry their trials' params, so the trials shown are
    # rebuilt from them (and match the ones built here: same ids)
    rebuilt = render_report([detect], model=model, trials=None, trial_views=2, heads_per_view=3)
    assert 'data-views="6"' in rebuilt and 'class="error"' not in rebuilt
    assert "not rebuilt" not in rebuilt
    # records without trial params, no inputs: a note, no failure
    plain = _sample.write_detection(
        tmp_path / "plain", n_layers=model.n_layers, n_heads=model.n_heads, lengths=(600,)
    )
    text = render_report([plain], model=model, trials=None)
    assert "input ids were not given" in text and 'data-views="0"' in text
    text = render_report([detect], model=model, trials={"nope": [1, 2, 3]})
    assert "none of the" in text


def test_report_patching_tasks_and_skipped_inputs(results_root, tmp_path):
    _, scores, _ = load_results(results_root["detect2"])
    effect = (0.9 * scores.mean).tolist()
    effect[0][0] = None
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "patching.json").write_text(
        json.dumps({"model": "sample-instruct", "pairs": 8, "seed": 0, "effect": effect})
    )
    tasks = _sample.write_ablation(
        tmp_path / "tasks", ks=(0, 2, 8), draws=2, tasks=("niah", "facts"), lengths=(1000, 2000)
    )
    stale = tmp_path / "report.html"
    stale.write_text("<html></html>")
    text = render_report([results_root["detect2"], tasks, patch, stale, tmp_path / "missing"])
    for what in ("patching heatmap", "score vs patching"):
        assert f'data-figure="{what}"' in text
    assert "Task: facts" in text and "Task: niah" in text
    assert text.count('data-figure="K-sweep"') == 2
    assert text.count('data-figure="NIAH accuracy baseline vs ablated"') == 1  # niah only
    assert "Inputs skipped" in text and "report.html" in text and "missing" in text
    assert 'class="error"' not in text
    with pytest.raises(ValueError, match="no results"):
        render_report([stale])


def test_report_refuses_no_results(tmp_path):
    with pytest.raises(ValueError):
        render_report([])
    scores = HeadScores(np.zeros((2, 2, 2)))
    scores.save(tmp_path / "head_scores.json")
    text = render_report([tmp_path / "head_scores.json"])
    assert 'data-figures="2"' in text  # heatmap and histogram; no records, nothing else
