"""The one greedy loop on the shipped model: scoring, the chain-of-thought harness and the
resample recorder continue a prompt with the same tokens, each stopping by its own rule.

``greedy`` with no rule gives the free run; each caller's answer is checked against a prefix of
it found by brute force (the shortest prefix the caller's rule stops on), so the rules are
checked on real tokens, apart from the loop they share.
"""

from __future__ import annotations

import pytest
import torch

from retrieval_heads import cot
from retrieval_heads.causal import _Recordings
from retrieval_heads.decoding import greedy
from retrieval_heads.scoring import DecodeConfig, greedy_decode

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 8


@pytest.fixture(scope="module")
def free_run(tiny_model, tiny_trials):
    """``(prompt ids, the first N greedy tokens)`` of a trial, through the bridge, no rule."""
    ids = torch.tensor(tiny_trials[4].input_ids)
    generated, reason = greedy(tiny_model, ids, N)
    assert reason is None and len(generated) == N
    assert tiny_model.tokenizer.eos_token_id in generated  # so the EOS rules are exercised
    return ids, generated


def fed_tokens(monkeypatch, model) -> list[int]:
    fed: list[int] = []
    step = model.step

    def counting(state, token, fwd_hooks=()):
        fed.append(int(token[0]))
        return step(state, token, fwd_hooks=fwd_hooks)

    monkeypatch.setattr(model, "step", counting)
    return fed


def test_the_lean_step_continues_as_the_bridge(tiny_model, free_run):
    ids, free = free_run
    assert tiny_model.lean_decode
    layers: list[int] = []
    generated, reason = greedy(tiny_model, ids, N, row_sink=lambda layer, row: layers.append(layer))
    assert (generated, reason) == (free, None)
    assert layers == list(range(tiny_model.n_layers)) * N


def test_scoring_stops_at_the_first_token_that_is_eos_or_holds_a_stop_string(tiny_model, free_run):
    ids, free = free_run
    tokenizer = tiny_model.tokenizer
    second = tokenizer.decode([free[1]])
    for config in (DecodeConfig(), DecodeConfig(stop_strings=(second[1:],))):
        first = next(
            i
            for i, t in enumerate(free)
            if t == tokenizer.eos_token_id
            or any(s in tokenizer.decode([t]) for s in config.stop_strings)
        )
        assert greedy_decode(tiny_model, ids, N, config) == (free[:first], "stop")
    plain = DecodeConfig(stop_at_eos=False, stop_strings=())
    assert greedy_decode(tiny_model, ids, N, plain) == (free, "max_new_tokens")


def test_cot_keeps_the_token_that_completes_a_stop_string_and_cuts_the_text(tiny_model, free_run):
    ids, free = free_run
    tokenizer = tiny_model.tokenizer
    eos = free.index(tokenizer.eos_token_id)
    answer = tokenizer.decode(free[:eos], skip_special_tokens=True)
    gen = cot.generate(tiny_model, ids.tolist(), max_new_tokens=N)
    assert (list(gen.ids), gen.text, gen.stopped_by) == (free[:eos], answer.strip(), "eos")
    stop = answer[len(answer) // 2 : len(answer) // 2 + 3]  # across a token boundary or not
    first = next(
        i for i in range(1, eos + 1) if stop in tokenizer.decode(free[:i], skip_special_tokens=True)
    )
    gen = cot.generate(tiny_model, ids.tolist(), max_new_tokens=N, stop_strings=("zzz", stop))
    assert list(gen.ids) == free[:first]
    assert (gen.text, gen.stopped_by) == (answer[: answer.index(stop)].strip(), f"stop:{stop!r}")


def test_resample_recordings_feed_the_free_run_and_never_stop(
    tiny_model, tiny_trials, free_run, monkeypatch
):
    ids, free = free_run
    fed = fed_tokens(monkeypatch, tiny_model)
    recorded = _Recordings(tiny_model, DecodeConfig()).get(tiny_trials[4], "decode", N)
    assert fed == [int(ids[-1]), *free[: N - 1]]  # past the EOS: the recorder has no stop rule
    assert recorded.z("0.0").shape[1] == N and not recorded.prefill
