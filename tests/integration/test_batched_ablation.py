"""Per-trial ablations in batches: resample and knockout, stacked row by row, give batch-1 records.

Each trial's ablation (a resample of its source's recorded ``z``, a knockout of its own needle)
is built as alone and the batch's are stacked into one whose row ``i`` acts as trial ``i``'s
(``stack_interventions``). Checked on a GQA model built from a config (rows that stop early,
recordings of other lengths), through ``ablate_grid`` and the CLI's ``ablate --batch-size 4``
(a spy on ``score_batch`` proves the batches ran), and across a kill (the resumed files are
the uninterrupted run's). The k-sweep of every mode is in ``test_batched.py``.
"""

from __future__ import annotations

import json

import pytest
from support import ABLATE

from retrieval_heads import causal, runner
from retrieval_heads.ablation_hooks import _Recordings
from retrieval_heads.batched import score_batch
from retrieval_heads.intervention import stack_interventions
from retrieval_heads.interventions import KnockoutAblation, ResampleAblation, kv_group
from retrieval_heads.scoring import DecodeConfig, score_trial
from tests.integration.test_batched import (
    _comparable,
    _detection,
    _no_timings,
    assert_same,
    spy_batches,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEADS = ["2.0", "2.1", "2.4"]  # the shipped model's layer-2 heads (its retrieval heads)


def run_stacked(model, trials, parts, config):
    """``trials`` as one batch under ``parts`` stacked: row ``i`` as ``parts[i]``."""
    stacked = stack_interventions(parts)
    assert stacked is not None and not stacked.trial_independent
    prefill, decode = stacked.prefill_hooks(model), stacked.decode_hooks(model)
    return score_batch(model, trials, config, prefill_hooks=prefill, decode_hooks=decode)


def differs(a, b) -> bool:
    try:
        assert_same(a, b)
    except AssertionError:
        return True
    return False


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("phase", ["decode", "all"])
@pytest.mark.parametrize("mode", ["resample", "knockout"])
def test_stacked_ablations_on_a_gqa_model_give_each_trial_its_record(
    gqa_model, word_tokenizer, mode, phase
):
    from tests.integration.test_lean_decode import gqa_trial

    model = gqa_model
    heads = kv_group(model, ["0.1", "1.0"])  # both query heads of a kv head, in each layer
    trials = [gqa_trial(word_tokenizer, depth=d) for d in (10, 40, 90)]
    config = DecodeConfig(max_new_tokens=8, stop_at_eos=False, stop_strings=())
    recordings = _Recordings(model, config)

    def parts_for(steps):
        if mode == "knockout":
            return [KnockoutAblation(heads, range(*t.target.span), phase=phase) for t in trials]
        return [  # trial i replays trial i+1, recorded for steps[i] steps
            ResampleAblation(heads, recordings.get(trials[(i + 1) % 3], phase, n), phase=phase)
            for i, n in enumerate(steps)
        ]

    parts = parts_for([8, 8, 8])
    alone = [
        score_trial(model, t, config, intervention=p) for t, p in zip(trials, parts, strict=True)
    ]
    for got, want in zip(run_stacked(model, trials, parts, config), alone, strict=True):
        assert_same(got, want)
    # the rows are the trials' own: stacked the other way round, some record changes
    swapped = run_stacked(model, trials, parts[::-1], config)
    assert any(differs(got, want) for got, want in zip(swapped, alone, strict=True))

    # trial 0 stops at its third token; its recording ends there, so the batch's later steps
    # on it replay padding, which no other row may feel
    stop_word = word_tokenizer.decode([alone[0].generated_ids[2]])
    stopping = DecodeConfig(max_new_tokens=8, stop_at_eos=False, stop_strings=(stop_word,))
    first = score_trial(model, trials[0], stopping, intervention=parts[0])
    steps = len(first.generated_ids) + 1  # the stopping step included
    parts = parts_for([steps, 8, 8])
    alone = [
        score_trial(model, t, stopping, intervention=p) for t, p in zip(trials, parts, strict=True)
    ]
    assert max(len(a.generated_ids) for a in alone) + 1 > steps  # a row outlives trial 0's
    for got, want in zip(run_stacked(model, trials, parts, stopping), alone, strict=True):
        assert_same(got, want)


@pytest.mark.parametrize("mode", ["resample", "knockout"])
def test_ablate_grid_batches_resample_and_knockout(
    tiny_model, tiny_trials, tmp_path, monkeypatch, mode
):
    """Two lengths of 6 trials: batches of 4 and 2 per length, the records of batch 1 (their
    ``resample_from`` and ``blocked`` params included)."""
    one = causal.ablate_grid(tiny_model, tiny_trials, HEADS, mode=mode, out=tmp_path / "one")
    batches = spy_batches(monkeypatch, causal)
    four = causal.ablate_grid(
        tiny_model, tiny_trials, HEADS, mode=mode, out=tmp_path / "four", batch_size=4
    )
    assert batches == [(4, True), (2, True), (4, True), (2, True)]
    assert _comparable(tmp_path / "four") == _comparable(tmp_path / "one")
    extra = "resample_from" if mode == "resample" else "blocked"
    assert [r.params[extra] for r in four] == [r.params[extra] for r in one]
    assert len({str(r.params[extra]) for r in four}) > 1  # trials of their own


@pytest.mark.parametrize("mode", ["resample", "knockout"])
def test_the_cli_ablates_in_batches(tiny_model, tiny_trials, tmp_path, monkeypatch, mode):
    """``ablate --mode resample|knockout --batch-size 4``: K=0, top-2, random-2 and matched-2,
    each its 4 trials in one batch, and the records of ``--batch-size 1``."""
    from tests.integration.test_distributed import in_process

    scores = _detection(tiny_model, tiny_trials, tmp_path)
    argv = [*ABLATE, "--mode", mode, "--scores", scores]
    in_process([*argv, "--batch-size", "1", "--out", tmp_path / "one"], tiny_model)
    batches = spy_batches(monkeypatch, causal)
    in_process([*argv, "--batch-size", "4", "--out", tmp_path / "four"], tiny_model)
    assert batches == [(4, False), (4, True), (4, True), (4, True)]
    assert _comparable(tmp_path / "four") == _comparable(tmp_path / "one")


def test_a_killed_batched_resample_run_resumes_to_the_same_files(
    tiny_model, tiny_trials, tmp_path, monkeypatch
):
    kwargs = dict(mode="resample", batch_size=4)
    causal.ablate_grid(tiny_model, tiny_trials, HEADS, out=tmp_path / "whole", **kwargs)
    original = runner.run_sweep
    batches = []

    def killed_after_one_batch(*args, **kw):
        run_batch = kw["run_batch"]

        def once(units):
            if batches:
                raise KeyboardInterrupt  # the second batch never lands
            batches.append(len(units))
            return run_batch(units)

        return original(*args, **{**kw, "run_batch": once})

    monkeypatch.setattr("retrieval_heads.causal.run_sweep", killed_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        causal.ablate_grid(tiny_model, tiny_trials, HEADS, out=tmp_path / "killed", **kwargs)
    assert batches == [4] and len(list((tmp_path / "killed" / "trials").glob("*.json"))) == 4
    meta = json.loads((tmp_path / "killed" / "meta.json").read_text())
    assert meta["status"] == "interrupted"
    monkeypatch.setattr("retrieval_heads.causal.run_sweep", original)
    batches_after = spy_batches(monkeypatch, causal)
    causal.ablate_grid(tiny_model, tiny_trials, HEADS, out=tmp_path / "killed", **kwargs)
    assert batches_after == [(2, True), (4, True), (2, True)]  # the first batch is not rerun
    killed, whole = (_no_timings(tmp_path / d / "trials.jsonl") for d in ("killed", "whole"))
    assert killed == whole  # to the last bit, timings aside


def test_recordings_shorter_than_a_budget_run_one_by_one(
    tiny_model, tiny_trials, tmp_path, monkeypatch
):
    """A resample row whose recording ends before its budget could run past it, where alone it
    raises: such a batch is not stacked but runs one by one, giving what batch 1 gives."""
    from retrieval_heads.ablation_hooks import TrialAblations, trial_ablations

    per_trial = trial_ablations(tiny_model, HEADS, "resample", trials=tiny_trials)
    assert per_trial.stacked(tiny_trials[:4]) is not None
    monkeypatch.setattr(TrialAblations, "_steps", lambda self, trial: 20)  # budgets are 50
    assert per_trial.stacked(tiny_trials[:4]) is None
    one = causal.ablate_grid(tiny_model, tiny_trials, HEADS, mode="resample", out=tmp_path / "1")
    assert max(len(r.generated_ids) for r in one) < 20  # alone, none ran past its recording
    batches = spy_batches(monkeypatch, causal)
    causal.ablate_grid(
        tiny_model, tiny_trials, HEADS, mode="resample", out=tmp_path / "4", batch_size=4
    )
    assert batches == []
    assert _comparable(tmp_path / "4") == _comparable(tmp_path / "1")
