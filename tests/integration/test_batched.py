"""Batched scoring: trials of one length prefilled and decoded together give batch-1 records.

Same generated tokens, copy events and retrieval scores; attention-mass tables within float
rounding (a batched product may add in another order). Checked on the shipped model (lean
rows and the bridge's ``hook_pattern`` rows), on a GQA model and on Gemma 3 with
sliding-window layers, through ``detect`` with a results folder, and across a kill. Activation
patching's pairs in batches give the batch-1 map (``patching_map``, the ``patch`` command; it
runs in memory, so there is no resume to check; ``patched_logits_batch`` on GQA and Llama
models: test_interventions.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from retrieval_heads import runner
from retrieval_heads.batched import auto_batch_size, memory_batch_size, score_batch, trial_bytes
from retrieval_heads.interventions import RecordedZ
from retrieval_heads.scoring import DecodeConfig, detect, score_trial
from retrieval_heads.store import load_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_same(batched, single):
    assert batched.trial_id == single.trial_id
    assert batched.generated_ids == single.generated_ids
    assert batched.params == single.params  # stopped_by included
    assert batched.copy_events == single.copy_events
    assert batched.scores["retrieval"] == single.scores["retrieval"]
    for name in ("topk", "attention_mass"):
        torch.testing.assert_close(
            torch.tensor(batched.scores[name]),
            torch.tensor(single.scores[name]),
            atol=1e-5,
            rtol=0,
        )
    assert (batched.passed, batched.recall, batched.reason) == (
        single.passed,
        single.recall,
        single.reason,
    )


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "bridge"])
def test_a_batch_gives_each_trials_own_record(tiny_model, tiny_trials, lean):
    short = [t for t in tiny_trials if len(t.input_ids) == len(tiny_trials[0].input_ids)]
    assert len(short) == 6
    batched = score_batch(tiny_model, short, lean=lean)
    events = 0
    for trial, record in zip(short, batched, strict=True):
        assert_same(record, score_trial(tiny_model, trial, lean=lean))
        events += len(record.copy_events)
    assert events > 0 and any(r.passed for r in batched)


def test_trials_that_stop_early_stop_counting(tiny_model, tiny_trials):
    """Budgets differ per trial: one stops after 1 token, one runs to its budget of 6."""
    trials = [t for t in tiny_trials if len(t.input_ids) == len(tiny_trials[0].input_ids)][:3]
    config = DecodeConfig(max_new_tokens=6, stop_at_eos=False, stop_strings=())
    batched = score_batch(tiny_model, trials, config)
    for trial, record in zip(trials, batched, strict=True):
        assert_same(record, score_trial(tiny_model, trial, config))
        assert len(record.generated_ids) == 6
    # a trial whose first token is a stop: nothing generated, nothing scored
    first = score_trial(tiny_model, trials[0], config).generated_ids[0]
    word = tiny_model.tokenizer.decode([first])
    stop_first = DecodeConfig(stop_strings=(word,))
    batched = score_batch(tiny_model, trials, stop_first)
    for trial, record in zip(trials, batched, strict=True):
        assert_same(record, score_trial(tiny_model, trial, stop_first))
    assert batched[0].generated_ids == [] and batched[0].params["stopped_by"] == "stop"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fixture", ["gqa_model", "gemma3_gqa_model"])
def test_batches_on_gqa_and_sliding_window_models(fixture, request, word_tokenizer):
    from tests.integration.test_lean_decode import gqa_trial

    model = request.getfixturevalue(fixture)
    trials = [gqa_trial(word_tokenizer, depth=d) for d in (10, 40, 90)]
    config = DecodeConfig(max_new_tokens=8, stop_at_eos=False, stop_strings=())
    for lean in (True, False):
        for trial, record in zip(
            trials, score_batch(model, trials, config, lean=lean), strict=True
        ):
            assert_same(record, score_trial(model, trial, config, lean=lean))


def test_a_batch_holds_one_length(tiny_model, tiny_trials):
    with pytest.raises(ValueError, match="one length"):
        score_batch(tiny_model, [tiny_trials[0], tiny_trials[-1]])


def _comparable(path):
    """A folder's records without their timings, the attention-mass tables as arrays (compared
    within float rounding by ``_same``)."""
    out = []
    for record in load_records(path):
        d = record.to_dict()
        d.pop("elapsed_s")
        masses = {name: torch.tensor(d["scores"].pop(name)) for name in ("topk", "attention_mass")}
        out.append((d, masses))
    return _Comparable(out)


class _Comparable(list):
    def __eq__(self, other):
        if len(self) != len(other):
            return False
        for (a, masses_a), (b, masses_b) in zip(self, other, strict=True):
            if a != b:
                return False
            for name, table in masses_a.items():
                if not torch.allclose(table, masses_b[name], atol=1e-5, rtol=0):
                    return False
        return True

    __hash__ = None


def test_detect_in_batches_writes_what_batch_1_writes(tiny_model, tiny_trials, tmp_path):
    one = detect(tiny_model, tiny_trials, out=tmp_path / "one", batch_size=1)
    four = detect(tiny_model, tiny_trials, out=tmp_path / "four", batch_size=4)
    auto = detect(tiny_model, tiny_trials, out=tmp_path / "auto", batch_size=None)
    assert _comparable(tmp_path / "four") == _comparable(tmp_path / "one")
    assert _comparable(tmp_path / "auto") == _comparable(tmp_path / "one")
    for scores in (four, auto):
        assert (scores.values == one.values).all()
    assert (tmp_path / "four" / "head_scores.json").read_bytes() == (
        tmp_path / "one" / "head_scores.json"
    ).read_bytes()


def test_a_killed_batched_run_resumes_to_the_same_files(
    tiny_model, tiny_trials, tmp_path, monkeypatch
):
    detect(tiny_model, tiny_trials, out=tmp_path / "whole", batch_size=4)
    original = runner.run_sweep
    batches = []

    def killed_after_one_batch(*args, **kwargs):
        run_batch = kwargs["run_batch"]

        def once(units):
            if batches:
                raise KeyboardInterrupt  # the second batch never lands
            batches.append(len(units))
            return run_batch(units)

        return original(*args, **{**kwargs, "run_batch": once})

    monkeypatch.setattr("retrieval_heads.scoring.run_sweep", killed_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        detect(tiny_model, tiny_trials, out=tmp_path / "killed", batch_size=4)
    assert batches == [4] and len(list((tmp_path / "killed" / "trials").glob("*.json"))) == 4
    meta = json.loads((tmp_path / "killed" / "meta.json").read_text())
    assert meta["status"] == "interrupted"
    monkeypatch.setattr("retrieval_heads.scoring.run_sweep", original)
    detect(tiny_model, tiny_trials, out=tmp_path / "killed", batch_size=4)
    for name in ("head_scores.json", "trials.jsonl"):  # to the last bit, timings aside
        killed, whole = (_no_timings(tmp_path / d / name) for d in ("killed", "whole"))
        assert killed == whole, name


def _no_timings(path):
    import re

    return re.sub(r'"elapsed_s": [0-9.e-]+', "", path.read_text())


def test_auto_batch_size_follows_the_memory_a_trial_needs(tiny_model, monkeypatch):
    per_trial = trial_bytes(tiny_model, 1000)
    assert trial_bytes(tiny_model, 2000) > per_trial > 0
    monkeypatch.setattr("retrieval_heads.batched.device_bytes", lambda device: 4 * 3 * per_trial)
    assert memory_batch_size(tiny_model, 1000) == 3
    assert memory_batch_size(tiny_model, 1000, copies=2) == 1  # a pair patched: a copy per head
    assert auto_batch_size(tiny_model, 1000) == 1  # on a CPU: prefill-bound, no gain
    assert auto_batch_size(tiny_model, 1000, copies=8) == 1
    monkeypatch.setattr("retrieval_heads.batched.device_bytes", lambda device: 0)
    assert memory_batch_size(tiny_model, 1000) == 1
    monkeypatch.setattr("retrieval_heads.batched.device_bytes", lambda device: 10**15)
    assert memory_batch_size(tiny_model, 1000) == 16


def test_trial_independent_interventions_run_in_batches(
    tiny_model, tiny_trials, tmp_path, monkeypatch
):
    from retrieval_heads import batched
    from retrieval_heads.interventions import KnockoutAblation, ResampleAblation, UniformAblation
    from retrieval_heads.kvcache import KVPolicy

    sizes = []
    original = batched.score_batch

    def counted(model, trials, *args, **kwargs):
        sizes.append(len(trials))
        return original(model, trials, *args, **kwargs)

    monkeypatch.setattr(batched, "score_batch", counted)
    heads = ["2.0", "2.1", "2.4"]
    uniform = UniformAblation(heads)
    window = KVPolicy(frozenset({(2, 0)}), sink=4, window=16)
    # one recorded sequence replayed on every row; one set of positions blocked on every row
    recorded = _recorded(tiny_model, tiny_trials[1])
    resample = ResampleAblation(heads, resample=recorded, model=tiny_model)
    knockout = KnockoutAblation(heads, range(*tiny_trials[0].target.span))
    assert resample.trial_independent and knockout.trial_independent
    interventions = {"uniform": uniform, "window": window, "resample": resample, "knock": knockout}
    for name, intervention in interventions.items():
        one = detect(tiny_model, tiny_trials, out=tmp_path / f"{name}1", intervention=intervention)
        sizes.clear()
        four = detect(
            tiny_model,
            tiny_trials,
            out=tmp_path / f"{name}4",
            intervention=intervention,
            batch_size=4,
            require_pass=False,
        )
        assert sizes == [4, 2, 4, 2], name  # two lengths of 6 trials each
        assert _comparable(tmp_path / f"{name}4") == _comparable(tmp_path / f"{name}1"), name
        assert (four.values == one.values).all()
    assert _comparable(tmp_path / "resample1") != _comparable(tmp_path / "uniform1")  # it acts
    # a recording of two sequences replays one per row: its trials run one at a time
    sizes.clear()
    two = ResampleAblation(heads, resample=RecordedZ.stack([recorded, recorded]))
    assert not two.trial_independent
    with pytest.raises(ValueError, match="the resample recording has batch 2, the run 1"):
        detect(tiny_model, tiny_trials[:2], intervention=two, batch_size=4, require_pass=False)
    assert sizes == []


def _recorded(model, trial):
    from retrieval_heads.decoding import greedy
    from retrieval_heads.interventions import ZRecorder

    recorder = ZRecorder(model)
    ids = torch.tensor(trial.input_ids, dtype=torch.long)
    greedy(model, ids, 60, decode_hooks=recorder.decode_hooks())
    return recorder.result()


def test_kv_sim_in_batches_writes_what_batch_1_writes(tiny_model, tiny_trials, tmp_path):
    import numpy as np

    from retrieval_heads.kvcache import simulate

    scores = np.zeros((tiny_model.n_layers, tiny_model.n_heads))
    scores[2, :4] = 1.0
    kwargs = dict(ks=[0, 1], draws=1, window=16, uniform_windows=[32])
    simulate(tiny_model, tiny_trials, scores, out=tmp_path / "one", **kwargs)
    simulate(tiny_model, tiny_trials, scores, out=tmp_path / "four", batch_size=4, **kwargs)
    assert _comparable(tmp_path / "four") == _comparable(tmp_path / "one")


@pytest.mark.parametrize(
    "mode, phase",
    [
        ("uniform", "decode"),
        ("mean", "decode"),
        ("resample", "decode"),
        ("resample", "all"),
        ("knockout", "decode"),
        ("knockout", "all"),
    ],
)
def test_k_sweep_in_batches_writes_what_batch_1_writes(
    tiny_model, tiny_trials, tmp_path, monkeypatch, mode, phase
):
    """Every mode batches, resample and knockout too (their per-trial ablations stacked): the
    ablated conditions run in batches of 4 and 2 with hooks, and write batch 1's records."""
    from retrieval_heads import causal
    from retrieval_heads.scores import HeadScores

    scores = HeadScores.load(_detection(tiny_model, tiny_trials, tmp_path) / "head_scores.json")
    kwargs = dict(ks=[0, 3], draws=1, mode=mode, phase=phase, n_reference=2, include_matched=False)
    trials = tiny_trials[:6]  # one length
    causal.k_sweep(tiny_model, trials, scores, out=tmp_path / f"{mode}1", **kwargs)
    batches = spy_batches(monkeypatch, causal)
    causal.k_sweep(tiny_model, trials, scores, out=tmp_path / f"{mode}4", batch_size=4, **kwargs)
    # K=0 (no hooks), then top-3 and random-3, each 6 trials in batches of 4 and 2
    assert batches == [(4, False), (2, False), *[(4, True), (2, True)] * 2]
    assert _comparable(tmp_path / f"{mode}4") == _comparable(tmp_path / f"{mode}1")


def spy_batches(monkeypatch, module):
    """Replace ``module.score_batch`` by one that notes each batch: ``(size, hooked)``."""
    original = module.score_batch
    batches = []

    def spied(model, trials, *args, **kwargs):
        hooked = bool(kwargs.get("decode_hooks") or kwargs.get("prefill_hooks"))
        batches.append((len(trials), hooked))
        return original(model, trials, *args, **kwargs)

    monkeypatch.setattr(module, "score_batch", spied)
    return batches


def _detection(model, trials, tmp_path):
    out = tmp_path / "detect"
    if not (out / "head_scores.json").exists():
        detect(model, trials, out=out, batch_size=6)
    return out


# ---- activation patching: pairs in batches -----------------------------------------------------


def _patch_spy(monkeypatch):
    """The sizes of the batches of pairs patched together (interventions.patch_heads_batch)."""
    from retrieval_heads import interventions

    sizes = []
    original = interventions.patch_heads_batch

    def counted(model, clean_ids, *args, **kwargs):
        sizes.append(len(clean_ids))
        return original(model, clean_ids, *args, **kwargs)

    monkeypatch.setattr(interventions, "patch_heads_batch", counted)
    return sizes


def test_patching_map_in_batches_gives_batch_1s_map(tiny_model, monkeypatch):
    """Each pair's record is the one it gets alone: its recoveries within float rounding (see
    test_interventions' REL; on one CPU thread they agree to the bit), so the map too."""
    from retrieval_heads import patching

    sizes = _patch_spy(monkeypatch)
    one = patching.patching_map(tiny_model, n_pairs=5, seed=0, length=96, batch_size=1)
    assert sizes == []  # batch 1: pair by pair, as before
    four = patching.patching_map(tiny_model, n_pairs=5, seed=0, length=96, batch_size=4)
    assert sizes == [4]  # the fifth pair is a lone unit: the runner runs it pair by pair
    torch.testing.assert_close(four, one, atol=1e-5, rtol=1e-4)
    assert one.abs().max() > 0.05  # a map with something in it
    pairs = patching.patching_pairs(tiny_model, n_pairs=2, seed=0, length=96)
    for batched, pair in zip(patching.pair_records(tiny_model, pairs), pairs, strict=True):
        alone = patching.pair_record(tiny_model, pair)
        assert (batched.trial_id, batched.passed, batched.params) == (
            alone.trial_id,
            alone.passed,
            alone.params,
        )
        torch.testing.assert_close(
            torch.tensor(batched.scores["patching"]),
            torch.tensor(alone.scores["patching"]),
            atol=1e-5,
            rtol=1e-4,
        )
    # auto: 1 on a CPU (pair by pair); on a GPU from its memory, a pair counted as n_heads copies
    sizes.clear()
    patching.patching_map(tiny_model, n_pairs=2, seed=0, length=96, batch_size=None)
    assert sizes == []
    asked = []

    def on_a_gpu(model, length, copies=1):
        asked.append((length, copies))
        return 3

    monkeypatch.setattr("retrieval_heads.batched.auto_batch_size", on_a_gpu)
    patching.patching_map(tiny_model, n_pairs=3, seed=0, length=96, batch_size=None)
    assert sizes == [3] and asked == [(96, tiny_model.n_heads)]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        patching.patching_map(tiny_model, n_pairs=1, batch_size=0)


def test_the_patch_command_takes_a_batch_size(tiny_model, tmp_path, monkeypatch, capsys):
    from retrieval_heads import cli
    from retrieval_heads.cli import inputs

    monkeypatch.setattr(inputs, "load", lambda args: tiny_model)
    sizes = _patch_spy(monkeypatch)
    maps = {}
    for size in ("1", "4"):
        argv = ["patch", "--pairs", "4", "--length", "96", "--batch-size", size]
        assert cli.main([*argv, "--out", str(tmp_path / size)]) == 0
        maps[size] = json.loads((tmp_path / size / "patching.json").read_text())
    assert sizes == [4]
    torch.testing.assert_close(
        torch.tensor(maps["4"].pop("effect")),
        torch.tensor(maps["1"].pop("effect")),
        atol=1e-5,
        rtol=1e-4,
    )
    assert maps["4"] == maps["1"]  # the batch size is not part of what the map records
    for bad in ("0", "-2", "x", "1.5", "AUTO"):
        with pytest.raises(SystemExit) as info:
            cli.main(["patch", "--batch-size", bad, "--out", str(tmp_path / "bad")])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --batch-size: invalid batch size: '{bad}'" in err, err
        assert "expected 'auto' or an integer >= 1" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
