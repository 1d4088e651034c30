"""The one greedy loop (``decoding.greedy``) and its callers' stop rules, on a scripted model.

The stand-in model returns, at its i-th decode step, logits whose argmax is ``script[i]`` and
records what it was fed, so every stop rule is checked token by token without weights:
``scoring.greedy_decode`` (EOS or a token holding a stop string, dropped: ``"stop"``),
``cot.generate`` (EOS dropped: ``"eos"``; a stop string in the text so far, token kept and text
cut: ``"stop:<repr>"``; ``"max_new_tokens"``; ``"n_ctx"``) and no rule at all (the resample
recorder's fixed number of steps).
"""

from __future__ import annotations

import pytest
import torch

from retrieval_heads import cot
from retrieval_heads.decoding import greedy
from retrieval_heads.scoring import DecodeConfig, greedy_decode

EOS, THE, A, KEY, IS, IN, AND, OF, TO, IT = 2, 4, 5, 6, 7, 8, 9, 10, 11, 12  # see tests/conftest.py


class Scripted:
    """Prefill/step/step_rows of a model whose decode step i answers ``script[i]``."""

    device = torch.device("cpu")

    def __init__(self, script, tokenizer, n_ctx: int = 64) -> None:
        self.script = list(script)
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.prefilled: tuple[list[int], list] | None = None
        self.fed: list[int] = []
        self.calls: list[tuple[str, object]] = []

    def prefill(self, input_ids, fwd_hooks=()):
        self.prefilled = (input_ids.tolist(), list(fwd_hooks))
        return object()

    def _answer(self, token):
        self.fed.append(int(token[0]))
        logits = torch.zeros(1, len(self.tokenizer))
        logits[0, self.script[len(self.fed) - 1]] = 1.0
        return logits

    def step(self, state, token, fwd_hooks=()):
        self.calls.append(("step", list(fwd_hooks)))
        return self._answer(token)

    def step_rows(self, state, token, sink):
        self.calls.append(("step_rows", sink))
        sink(0, torch.ones(1, 1, 1))
        return self._answer(token)


PROMPT = [THE, KEY, IS]


def run(model, budget, stop=None, **kwargs):
    return greedy(model, torch.tensor(PROMPT), budget, stop, **kwargs)


def test_prefill_all_but_the_last_token_then_feed_each_argmax(word_tokenizer):
    model = Scripted([OF, TO, IT, A], word_tokenizer)
    prefill_hooks, decode_hooks = [("p", None)], [("d", None)]
    out = run(model, 4, prefill_hooks=prefill_hooks, decode_hooks=decode_hooks)
    assert out == ([OF, TO, IT, A], None)  # no rule: the whole budget, no reason
    assert model.prefilled == ([[THE, KEY]], prefill_hooks)
    assert model.fed == [IS, OF, TO, IT]  # the last prompt token is step 0
    assert model.calls == [("step", decode_hooks)] * 4


def test_a_rule_sees_each_token_and_the_tokens_kept_and_may_keep_the_last(word_tokenizer):
    seen = []

    def rule(keep):
        def stop(token, kept):
            seen.append((token, list(kept)))
            return ("found it", keep) if token == IT else None

        return stop

    assert run(Scripted([OF, TO, IT, A], word_tokenizer), 9, rule(False)) == ([OF, TO], "found it")
    assert seen == [(OF, []), (TO, [OF]), (IT, [OF, TO])]
    assert run(Scripted([OF, TO, IT, A], word_tokenizer), 9, rule(True)) == (
        [OF, TO, IT],
        "found it",
    )
    model = Scripted([OF, TO, IT, A], word_tokenizer)
    assert run(model, 2, rule(True)) == ([OF, TO], None)  # the budget comes first
    assert model.fed == [IS, OF]


def test_before_step_runs_before_every_step_the_stopping_one_included(word_tokenizer):
    model = Scripted([OF, TO, EOS], word_tokenizer)
    log: list[str] = []
    model.calls = log  # type: ignore[assignment]  # both append to one list
    stop = lambda token, kept: ("eos", False) if token == EOS else None  # noqa: E731
    generated, reason = run(model, 9, stop, before_step=lambda: log.append("before"))
    assert (generated, reason) == ([OF, TO], "eos")
    assert [c if c == "before" else c[0] for c in log] == ["before", "step"] * 3


def test_row_sink_runs_the_lean_step_and_excludes_decode_hooks(word_tokenizer):
    model = Scripted([OF, TO], word_tokenizer)
    rows = []
    sink = lambda layer, row: rows.append(layer)  # noqa: E731
    assert run(model, 2, row_sink=sink) == ([OF, TO], None)
    assert model.calls == [("step_rows", sink)] * 2 and rows == [0, 0]
    with pytest.raises(ValueError, match="pass row_sink or decode_hooks, not both"):
        run(model, 2, row_sink=sink, decode_hooks=[("d", None)])


# --------------------------------------------------------------------------------------------
# the callers' rules


@pytest.mark.parametrize(
    ("script", "config", "want"),
    [
        ([OF, TO, EOS, IT], DecodeConfig(), ([OF, TO], "stop")),  # EOS, dropped
        ([OF, TO, EOS, IT], DecodeConfig(stop_at_eos=False, stop_strings=()), ([OF, TO, EOS], "m")),
        ([OF, TO, IT, A], DecodeConfig(stop_strings=("t",)), ([OF], "stop")),  # "to" holds "t"
        ([OF, TO, IT, A], DecodeConfig(stop_strings=("o t",)), ([OF, TO, IT], "m")),  # one token
    ],
)
def test_scoring_stops_at_eos_or_a_token_holding_a_stop_string(
    word_tokenizer, script, config, want
):
    model = Scripted(script, word_tokenizer)
    generated, stopped_by = greedy_decode(model, torch.tensor(PROMPT), 3, config)  # type: ignore[arg-type]  # a stand-in model
    assert (generated, stopped_by) == (want[0], "max_new_tokens" if want[1] == "m" else "stop")


@pytest.mark.parametrize(
    ("script", "kwargs", "want"),
    [
        ([OF, TO, EOS, IT], {}, ((OF, TO), "of to", "eos")),
        ([EOS], {}, ((), "", "eos")),
        ([OF, TO, IT, A], {"max_new_tokens": 3}, ((OF, TO, IT), "of to it", "max_new_tokens")),
        # the text so far holds the stop string: that token is kept, the text cut before it
        ([OF, TO, IT, A], {"stop_strings": ("o i",)}, ((OF, TO, IT), "of t", "stop:'o i'")),
        ([OF, TO, IT, A], {"stop_strings": ("it", "f")}, ((OF,), "o", "stop:'f'")),
        ([OF, TO, IT, A], {"stop_strings": ("", "to it")}, ((OF, TO, IT), "of", "stop:'to it'")),
        ([OF, TO, EOS], {"stop_strings": ("zzz",)}, ((OF, TO), "of to", "eos")),
    ],
)
def test_cot_generate_stops_at_eos_a_stop_string_or_the_budget(
    word_tokenizer, script, kwargs, want
):
    model = Scripted(script, word_tokenizer)
    gen = cot.generate(model, PROMPT, **kwargs)
    assert (gen.ids, gen.text, gen.stopped_by) == want


def test_cot_generate_budget_is_the_context_left(word_tokenizer):
    model = Scripted([OF, TO, IT, A, IN, AND], word_tokenizer, n_ctx=len(PROMPT) + 2)
    gen = cot.generate(model, PROMPT, max_new_tokens=10)
    assert (gen.ids, gen.stopped_by) == ((OF, TO, IT), "n_ctx")  # n_ctx - prompt + 1 tokens
    model = Scripted([OF, TO, IT, A, IN, AND], word_tokenizer, n_ctx=len(PROMPT) + 2)
    assert cot.generate(model, PROMPT, max_new_tokens=3).stopped_by == "max_new_tokens"
