"""The views at real-model sizes: 270 heads (SmolLM2-135M: 30 layers x 9 heads), Gemma 3's mix
of sliding-window and global layers, 4K-token contexts, and the attention views of a report
built from a results folder alone (trials rebuilt from their records)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from retrieval_heads.store import ResultsDir, load_results
from retrieval_heads.views import (
    _sample,
    activation_frequency_heatmap,
    attention_view,
    render_report,
    score_heatmap,
)

GEMMA_WINDOWS = [None if layer in (5, 11, 17) else 512 for layer in range(18)]


def _ticks(fig) -> list[str]:
    return list(fig.layout.yaxis.ticktext or [])


def test_heatmaps_mark_global_layers_only_when_windows_differ():
    table = _sample.sample_scores(np.random.default_rng(0), 18, 4)
    fig = score_heatmap(table, layer_windows=GEMMA_WINDOWS)
    ticks = _ticks(fig)
    assert len(ticks) == 18
    assert [i for i, t in enumerate(ticks) if "(global)" in t] == [5, 11, 17]
    assert "window 512" in ticks[0]
    outlined = sorted(round((s.y0 + s.y1) / 2) for s in fig.layout.shapes)
    assert outlined == [5, 11, 17]
    assert "layer attention" in fig.data[0].hovertemplate
    assert fig.data[0].customdata[5][0][-1] == "global"
    assert fig.data[0].customdata[4][0][-1] == "sliding window 512"
    assert "global: layers 5, 11, 17" in fig.layout.title.text
    # no windows, or every layer alike: drawn as before
    for windows in (None, [None] * 18, [4096] * 18):
        plain = score_heatmap(table, layer_windows=windows)
        assert not _ticks(plain) and not plain.layout.shapes
        assert "layer attention" not in plain.data[0].hovertemplate
    freq = activation_frequency_heatmap(table > 0.1, layer_windows=GEMMA_WINDOWS)
    assert [i for i, t in enumerate(_ticks(freq)) if "(global)" in t] == [5, 11, 17]


def test_report_reads_layer_windows_from_the_run(tmp_path):
    table = _sample.sample_scores(np.random.default_rng(1), 18, 4)
    table[11, 2] = 0.97  # the best head sits in a global layer
    marked = _sample.write_detection(
        tmp_path / "gemma",
        n_layers=18,
        n_heads=4,
        table=table,
        lengths=(1000, 4000),
        extra_meta={"model_info": {"n_layers": 18, "layer_windows": GEMMA_WINDOWS}},
    )
    text = render_report([marked])
    assert "5 (global)" in text and "17 (global)" in text
    assert "<th>layer attention</th>" in text
    assert re.search(r"<td>11\.2</td><td>global</td>", text)
    assert "global: layers 5, 11, 17; sliding window 512: the other 15" in text
    # older runs (no model_info) and malformed windows: drawn as before
    for extra in ({}, {"model_info": {"layer_windows": GEMMA_WINDOWS[:-1]}}):
        plain = _sample.write_detection(
            tmp_path / f"plain{len(extra)}", n_layers=18, n_heads=4, table=table, extra_meta=extra
        )
        text = render_report([plain])
        assert "(global)" not in text and "layer attention" not in text


def test_270_heads_stay_readable_in_the_report(tmp_path):
    detect = _sample.write_detection(
        tmp_path / "smollm2", model="smollm2-like", n_layers=30, n_heads=9, lengths=(1000, 4000)
    )
    scores = load_results(detect)[1]
    fig = score_heatmap(scores)
    # every non-zero cell's value is written in it (zeros and missing cells stay blank)
    text = np.asarray(fig.data[0].text)
    assert text.shape == (30, 9) and fig.data[0].texttemplate == "%{text}"
    for (layer, head), value in np.ndenumerate(scores.mean):
        want = "" if not np.isfinite(value) or value == 0 else f"{value:.2f}"
        assert text[layer, head] == want, (layer, head, value)
    assert (text != "").any()
    assert fig.layout.yaxis.dtick == 1  # every layer labelled
    assert fig.layout.height >= 30 * 22
    ablate = _sample.write_ablation(tmp_path / "ablate", model="smollm2-like")
    text = render_report([detect, ablate])
    assert 'class="error"' not in text
    assert "Top 20 of 270 heads" in text
    assert len(text.encode()) < 8_000_000  # plotly.js is 4.8 MB of it


def _long_trial(n_tokens=4_096, n_steps=16, n_heads=4, seed=0):
    """A 4K-token trial whose heads copy from a needle and also look at scattered keys."""
    rng = np.random.default_rng(seed)
    tokens = [f" t{i}" for i in range(n_tokens)]
    needle = (n_tokens // 2, n_tokens // 2 + 24)
    queries = [n_tokens - n_steps - 1 + s for s in range(n_steps)]
    rows = np.zeros((n_heads, n_steps, n_tokens))
    for s, q in enumerate(queries):
        w = rng.random((n_heads, q + 1)) ** 12
        w[:, rng.choice(q, 6, replace=False)] += 0.3  # a few strongly attended keys
        rows[:, s, : q + 1] = 0.4 * w / w.sum(axis=1, keepdims=True)
        rows[:, s, needle[0] + 4 + s % 8] += 0.6
    events = [(s, 5, h, needle[0] + 4 + s % 8) for s in range(8) for h in range(2)]
    return tokens, rows, queries, needle, events


def test_attention_view_of_a_4k_context_is_a_small_steps_by_context_grid():
    tokens, rows, queries, needle, events = _long_trial()
    view = attention_view(
        tokens,
        rows,
        ["5.0", "5.1", "5.2", "5.3"],
        queries,
        needle_span=needle,
        answer_span=(needle[0] + 4, needle[0] + 12),
        copy_events=events,
    )
    grid = view.grid
    assert grid.weights.shape == (4, 16, len(grid.col_labels))
    assert len(grid.col_labels) <= 80 and len(grid.row_labels) == 16
    assert set(range(*needle)) <= set(grid.crop.shown)
    np.testing.assert_allclose(grid.weights.sum(-1), 1.0, atol=1e-9)
    assert len(grid.copies) == 16
    # the page stays small: the grid and the circuitsvis props are bounded by the crop
    html = view.to_html()
    assert len(html.encode()) < 300_000
    assert len(view.standalone_html().encode()) < 1_800_000  # with the 1.3 MB circuitsvis bundle


def test_report_rebuilds_the_trials_from_the_records(tmp_path):
    from retrieval_heads import load_model
    from retrieval_heads.scoring import detect
    from retrieval_heads.tiny.trials import tiny_grid

    model = load_model("tiny")
    trials = tiny_grid(model.tokenizer, lengths=[200, 400], depths=[50], n_needles=1)
    out = tmp_path / "detect"
    detect(model, trials, out=out, model_name="tiny")
    records = load_results(out)[2]
    assert all(r.passed for r in records)
    text = render_report([out], model=model, trial_views=1, heads_per_view=2)
    assert 'data-views="2"' in text and text.count('class="ag"') == 2
    longest = next(t for t in trials if t.context_length == 400)
    assert f"Trial {longest.trial_id}" in text  # the longest context comes first
    assert 'class="error"' not in text

    # a record whose trial does not rebuild to the same prompt is not shown
    tampered = tmp_path / "tampered"
    with ResultsDir(tampered, model="tiny", overwrite=True) as run:
        for r in records:
            params = {**r.params, "seed": int(r.params["seed"]) + 1}
            run.append(dataclasses.replace(r, params=params))
        run.finalize()
    text = render_report([tampered], model=model, trial_views=1)
    assert 'data-views="0"' in text and "the rebuilt prompt differs" in text


@pytest.mark.parametrize("n_steps", [1, 3])
def test_rows_are_the_answer_steps_even_for_short_answers(n_steps):
    tokens, rows, queries, needle, _ = _long_trial(n_tokens=1_200, n_steps=n_steps, n_heads=1)
    view = attention_view(tokens, rows, ["2.0"], queries, needle_span=needle)
    assert view.grid.row_labels == tuple(f"{s}: {tokens[q + 1]}" for s, q in enumerate(queries))
