"""The streaming retrieval scorer against hand-built cases and a brute-force reference."""

from __future__ import annotations

import json

import pytest
import torch

from retrieval_heads.scores import HeadScores
from retrieval_heads.scoring import (
    DecodeConfig,
    DetectionError,
    detect,
    iter_detect,
    score_trial,
)
from retrieval_heads.tiny.trials import tiny_grid


def force_attention(model, layer: int, head: int, target_of_step):
    """A hook on ``hook_attn_scores`` making one head attend only to ``target_of_step(position)``."""

    def hook(scores, hook):  # [batch, head, query, key]
        position = model.position_offset  # absolute position of the (single) decode query
        scores[:, head, -1, :] = -1e9
        scores[:, head, -1, target_of_step(position)] = 1e9
        return scores

    return (model.hook_name(layer, "attn_scores"), hook)


@pytest.mark.golden
def test_forced_copy_head_scores_exactly_one_and_forced_elsewhere_zero(tiny_model, tiny_trials):
    trial = tiny_trials[3]
    start, end = trial.answer_span
    first_query = trial.context_length - 1  # the last prompt token produces the first answer token

    def hooks(_trial):
        decode = [
            # 7.3 is no retrieval head: forced onto the answer token being written, step by step
            force_attention(tiny_model, 7, 3, lambda pos: start + (pos - first_query)),
            # 2.6 is the strongest retrieval head: forced onto the BOS token
            force_attention(tiny_model, 2, 6, lambda pos: 0),
        ]
        return [], decode

    record = score_trial(tiny_model, trial, hooks=hooks)
    assert record.generated_text == trial.answer, "forcing two heads must not break the answer"
    scores = torch.tensor(record.scores["retrieval"])
    assert scores[7, 3] == 1.0
    assert scores[2, 6] == 0.0
    events = {(layer, head) for _, layer, head, _ in record.copy_events}
    assert (7, 3) in events and (2, 6) not in events


def brute_force(model, trial, record):
    """Every scorer from full attention patterns of prompt + answer, one head at a time."""
    ids = list(trial.input_ids) + record.generated_ids
    tokens = torch.tensor(ids[:-1])[None]  # the last generated token is never fed back
    _, cache = model.bridge.run_with_cache(
        tokens, names_filter=lambda n: n.endswith("hook_pattern")
    )
    start, end = trial.answer_span
    k = end - start
    steps = len(record.generated_ids)
    retrieval = torch.zeros(model.n_layers, model.n_heads)
    topk = torch.zeros(model.n_layers, model.n_heads)
    mass = torch.zeros(model.n_layers, model.n_heads)
    for layer in range(model.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # [head, query, key]
        for head in range(model.n_heads):
            copied = set()
            for step in range(steps):
                row = pattern[head, trial.context_length - 1 + step]
                position = int(row.argmax())
                if start <= position < end and ids[position] == record.generated_ids[step]:
                    copied.add(position)
                mass[layer, head] += row[start:end].sum() / steps
                values, index = row.topk(k)
                inside = (index >= start) & (index < end)
                topk[layer, head] += (values * inside).sum() / steps
            retrieval[layer, head] = len(copied) / k
    return {"retrieval": retrieval, "topk": topk, "attention_mass": mass}


@pytest.mark.parametrize("index", [0, 5, 8])
def test_streaming_scores_equal_brute_force_from_full_patterns(tiny_model, tiny_trials, index):
    trial = tiny_trials[index]
    record = score_trial(tiny_model, trial)
    assert record.passed
    reference = brute_force(tiny_model, trial, record)
    for name, expected in reference.items():
        got = torch.tensor(record.scores[name])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=name)
    assert reference["retrieval"].max() > 0.5, "a real retrieval head must show up"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_streaming_equals_brute_force_on_random_gqa_model(gqa_model, word_tokenizer):
    """A random grouped-query model: copy events are rare, but every scorer must still agree."""
    from retrieval_heads.trials.builder import build_trial
    from retrieval_heads.trials.haystacks import Haystack
    from retrieval_heads.trials.needles import Needle
    from retrieval_heads.trials.template import PromptTemplate

    words = [f"w{i}" for i in range(100)]
    # This vocabulary has no punctuation: the builder falls back to token boundaries (and warns).
    haystack = Haystack.from_strings([" ".join(words[i : i + 9]) for i in range(0, 90, 9)])
    needle = Needle("n", "w1 w2 w3 w97 w98 w99", "w4 w5 w6", "w97 w98 w99")
    trial = build_trial(
        word_tokenizer,
        haystack,
        needle,
        length=96,
        depth_percent=40,
        template=PromptTemplate(text="{context} {question}"),
    )
    record = score_trial(gqa_model, trial, DecodeConfig(max_new_tokens=6, stop_at_eos=False))
    assert len(record.generated_ids) == 6
    reference = brute_force(gqa_model, trial, record)
    for name, expected in reference.items():
        got = torch.tensor(record.scores[name])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=name)


def test_count_repeats_adds_every_event(tiny_model, tiny_trials):
    trial = tiny_trials[1]
    distinct = score_trial(tiny_model, trial)
    repeats = score_trial(tiny_model, trial, DecodeConfig(count_repeats=True))
    k = trial.answer_span[1] - trial.answer_span[0]
    events = torch.zeros(tiny_model.n_layers, tiny_model.n_heads)
    for _, layer, head, _ in repeats.copy_events:
        events[layer, head] += 1 / k
    torch.testing.assert_close(torch.tensor(repeats.scores["retrieval"]), events)
    assert (
        torch.tensor(repeats.scores["retrieval"]) >= torch.tensor(distinct.scores["retrieval"])
    ).all()


def test_kv_head_aggregation_is_max_over_each_group(tiny_model, tiny_trials):
    scores = detect(tiny_model, tiny_trials[:4])
    per_query = scores.as_array()  # [layer, head]
    per_kv = scores.kv_heads(tiny_model.n_kv_heads)  # [layer, kv_head]
    for head in range(tiny_model.n_heads):
        kv = tiny_model.kv_head_of(head)
        assert (per_kv[:, kv] >= per_query[:, head] - 1e-12).all()
    group = tiny_model.n_heads // tiny_model.n_kv_heads
    expected = per_query.reshape(tiny_model.n_layers, tiny_model.n_kv_heads, group).max(-1)
    assert (abs(per_kv - expected) < 1e-12).all()


def test_interrupted_run_resumes_to_the_same_results(tiny_model, tiny_trials, tmp_path):
    trials = tiny_trials[:6]
    detect(tiny_model, trials, out=tmp_path / "whole", model_name="tiny")

    class Crash(Exception):
        pass

    def crash_on_fourth(trial):
        if trial.trial_id == trials[3].trial_id:
            raise Crash
        return [], []

    with pytest.raises(Crash):
        detect(
            tiny_model, trials, out=tmp_path / "resumed", model_name="tiny", hooks=crash_on_fourth
        )
    detect(tiny_model, trials, out=tmp_path / "resumed", model_name="tiny")

    whole = (tmp_path / "whole" / "head_scores.json").read_bytes()
    resumed = (tmp_path / "resumed" / "head_scores.json").read_bytes()
    assert whole == resumed
    lines = (tmp_path / "resumed" / "trials.jsonl").read_text().splitlines()
    ids = [json.loads(line)["trial_id"] for line in lines]
    assert sorted(ids) == sorted(t.trial_id for t in trials), "no trial lost or duplicated"


def test_no_passing_trial_raises_with_what_the_model_said(tiny_model, tiny_trials, tmp_path):
    impossible = DecodeConfig(max_new_tokens=1)  # one answer token of three: recall 1/3 < 0.5
    with pytest.raises(DetectionError, match="no trial passed") as caught:
        detect(tiny_model, tiny_trials[:2], out=tmp_path / "run", config=impossible, model_name="t")
    assert tiny_trials[0].answer in str(caught.value)
    assert not (tmp_path / "run" / "head_scores.json").exists(), "no empty score file"
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["status"] == "failed"


@pytest.mark.golden
def test_failed_trials_are_kept_and_counted(tiny_model, tiny_trials):
    from retrieval_heads.interventions import ablate

    retrieval_heads = ["2.0", "2.1", "2.4", "2.5", "2.6", "2.7"]
    ablation = ablate(tiny_model, retrieval_heads, mode="uniform")
    hooks = ablation.decode_hooks(tiny_model)
    records = list(iter_detect(tiny_model, tiny_trials, hooks=lambda t: ([], hooks)))
    assert len(records) == len(tiny_trials)
    failed = [r for r in records if not r.passed]
    assert failed, "masking every retrieval head must break some answers"
    assert all(r.reason for r in failed)
    scores = HeadScores.from_records(records)
    assert scores.n_total == len(tiny_trials) and scores.n_passed == len(records) - len(failed)


def test_budget_stays_inside_the_context_window(tiny_model):
    trials = tiny_grid(tiny_model.tokenizer, lengths=[tiny_model.n_ctx], depths=[50], n_needles=1)
    record = score_trial(tiny_model, trials[0], DecodeConfig(max_new_tokens=20))
    assert len(record.generated_ids) <= 1
