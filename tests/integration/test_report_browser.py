"""The report in a real browser: headless Chromium with networking off, over the DevTools
protocol (``retrieval_heads.views.browser``: ``--remote-debugging-pipe``, standard library only).

The report is built from result directories written through ``ResultsDir`` with real
``TrialRecord``\\ s (random scores) of real trials of the shipped tiny model (so each attention
view shows its record's own prompt), one ablation run with K-sweep records, and a KV-cache
simulation. The results' model names carry ``</script><script>alert(1)</script>``; the attention
page a title with it and tokens ``<img src=x onerror=alert(1)>`` (the same
``TrialAttention.to_html`` the report's views use): no injected element may appear and no dialog
may open. Screenshots go to the test's ``tmp_path`` (paths printed; keep
them with ``pytest -s`` or ``--basetemp``).

Skipped only when no Chromium is installed here (``make setup-browser`` installs it); set
``RETRIEVAL_HEADS_REQUIRE_BROWSER=1`` to fail instead of skipping.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from retrieval_heads.store import load_results
from retrieval_heads.views import _sample, attention_view, build_report
from retrieval_heads.views.browser import check_page, find_chromium

EVIL = "</script><script>alert(1)</script>"
EVIL_TAG = '<img/src="x"/onerror=alert(1)>'  # no spaces: circuitsvis turns them into &nbsp;


def _require_chromium() -> str:
    binary = find_chromium()
    if binary is None:
        reason = (
            "Chromium is not installed on this machine (apt-get install chromium, or "
            "`make setup-browser`); the browser test needs a real browser"
        )
        if os.environ.get("RETRIEVAL_HEADS_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="module")
def chromium() -> str:
    return _require_chromium()


def _report_problems(check) -> str:
    return "\n".join(check.problems) + f"\n(screenshot: {check.screenshot})"


def test_report_renders_in_headless_chromium(chromium, tmp_path):
    from retrieval_heads import kvcache, load_model
    from retrieval_heads.tiny.trials import tiny_grid

    model = load_model("tiny")
    # Real trials, and records written for exactly them (ids, answers, copy events).
    grid = tiny_grid(model.tokenizer, lengths=[300, 600], depths=[0, 50, 100], n_needles=2)
    detect = _sample.write_trial_detection(
        tmp_path / "detect",
        grid,
        model=f"tiny {EVIL}",
        n_layers=model.n_layers,
        n_heads=model.n_heads,
        tokenizer=model.tokenizer,
        extra_meta={"n_kv_heads": model.n_kv_heads},
    )
    rng = np.random.default_rng(3)
    base = load_results(detect)[1].mean
    tuned = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
    detect2 = _sample.write_trial_detection(
        tmp_path / "detect-tuned",
        grid,
        model="tiny-tuned",
        n_layers=model.n_layers,
        n_heads=model.n_heads,
        table=tuned,
        seed=4,
        tokenizer=model.tokenizer,
    )
    trials = {t.trial_id: t for t in grid}
    for run in (detect, detect2):
        records = load_results(run)[2]
        assert sorted(r.trial_id for r in records) == sorted(trials)
        for r in records:
            assert r.expected == trials[r.trial_id].answer
        assert sum(r.passed for r in records) >= 2
    ablate = _sample.write_ablation(tmp_path / "ablate", model=f"tiny {EVIL}")
    # A real KV-cache simulation on the shipped model: its curve, table and NIAH grids.
    kv = tmp_path / "kv-sim"
    kv_trials = tiny_grid(model.tokenizer, lengths=[200], depths=[0, 100], n_needles=1)
    kvcache.simulate(
        model, kv_trials, tuned, ks=[0, 2], draws=2, window=16, uniform_windows=[16, 64], out=kv
    )
    out = build_report(
        [detect, ablate, detect2, kv],
        tmp_path / "report.html",
        model=model,
        trials=trials,
        trial_views=2,
        heads_per_view=3,
    )
    size = out.stat().st_size
    print(f"\nreport: {out} ({size / 1e6:.2f} MB)")
    assert size < 15_000_000

    shot = tmp_path / "report.png"
    check = check_page(out, screenshot=shot, chromium=chromium, timeout=180)
    print(f"screenshot: {shot}; loaded in {check.load_s:.1f} s")
    assert check.ok, _report_problems(check)
    assert check.expected_figures >= 17 and check.figures == check.expected_figures
    # 2 trials x 3 ColoredTokens (one per head) in each detection run (both have every trial)
    assert check.expected_views == 2 * 2 * 3
    assert check.views == check.expected_views
    assert check.scripts == 2 + check.expected_figures + check.expected_views
    assert not check.console_errors and not check.exceptions
    assert not check.requests and not check.dialogs and not check.bare_alert_scripts
    assert shot.stat().st_size > 50_000


def test_attention_page_with_markup_in_tokens(chromium, tmp_path):
    """circuitsvis renders token strings as HTML: tokens with markup must stay text."""
    n, steps = 3_000, 3
    rng = np.random.default_rng(0)
    tokens = [f" w{i}" for i in range(n)]
    tokens[1_502], tokens[1_503] = EVIL_TAG, EVIL
    queries = [n - steps - 1 + s for s in range(steps)]
    rows = np.zeros((2, steps, n))
    for s, q in enumerate(queries):
        w = rng.random((2, q + 1)) ** 6
        rows[:, s, : q + 1] = w / w.sum(axis=1, keepdims=True)
    view = attention_view(
        tokens,
        rows,
        ["1.2", "3.0"],
        queries,
        needle_span=(1_500, 1_510),
        copy_events=[(0, 1, 2, 1_502), (1, 1, 2, 1_503)],
        title=f"trial {EVIL}",
    )
    page = view.save(tmp_path / "attention.html")
    shot = tmp_path / "attention.png"
    check = check_page(page, screenshot=shot, chromium=chromium, timeout=120)
    print(f"\nattention page: {page}; screenshot: {shot}")
    assert check.ok, _report_problems(check)
    assert check.views == 2 == check.expected_views  # ColoredTokens per head
    assert check.scripts == 1 + 2
