"""The per-head detectors of ``retrieval_heads.detectors`` against brute force and hand-made heads.

- ``query_focused_scores`` equals QRHead's score computed from the bridge's full attention
  patterns (``run_with_cache`` over the whole prompt; the null prompt built here by hand), on
  Llama, Qwen2 (GQA) and Gemma 3 (GQA, sliding and global layers), for every option; it asks
  ``attention_rows`` for the query rows only and runs the bridge on no token before them;
  a head forced to read the needle from the query scores exactly 1 (0 once calibrated, when it
  does so for the null question too).
- ``pattern_scores`` equals TransformerLens' own ``head_detector.detect_head`` run on the bridge,
  and ``compute_head_attention_similarity_score`` on the full patterns for every option; its
  detection patterns are TransformerLens'; forced previous-token, duplicate and induction heads
  score the documented exact values.
- On the shipped tiny model: ranges, and (golden) which heads score highest.
"""

from __future__ import annotations

import dataclasses
import statistics

import numpy as np
import pytest
import torch
from transformer_lens import head_detector

from retrieval_heads.detectors import (
    PATTERNS,
    detection_patterns,
    pattern_probe,
    pattern_scores,
    query_focused_scores,
    query_positions,
)
from retrieval_heads.trials.builder import build_trial
from retrieval_heads.trials.haystacks import Haystack
from retrieval_heads.trials.needles import Needle
from retrieval_heads.trials.template import PromptTemplate

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # The word haystack has no sentence ends: the needle goes in at a token boundary.
    pytest.mark.filterwarnings("ignore::retrieval_heads.trials.builder.BoundaryFallbackWarning"),
]

MODELS = ["llama_model", "gqa_model", "gemma3_gqa_model"]
# "the key is" + question + "it": words of the test tokenizer around the question.
FRAMED = "{context} the key is {question} it"


def word_trial(tokenizer, *, template="{context} {question}", length=96, depth=40):
    words = [f"w{i}" for i in range(100)]
    haystack = Haystack.from_strings([" ".join(words[i : i + 9]) for i in range(0, 90, 9)])
    # 24 tokens: long enough for a key to fall 2 standard deviations below the span's mean.
    text = " ".join(f"w{i}" for i in range(1, 22)) + " w97 w98 w99"
    needle = Needle("n", text, "w4 w5 w6", "w97 w98 w99")
    return build_trial(
        tokenizer,
        haystack,
        needle,
        length=length,
        depth_percent=depth,
        template=PromptTemplate(text=template),
    )


def full_patterns(model, ids) -> torch.Tensor:
    """Every head's whole ``[query, key]`` pattern from one bridge pass: ``[layer, head, q, k]``."""
    ids = torch.as_tensor(list(ids))[None]
    _, cache = model.bridge.run_with_cache(ids, remove_batch_dim=True)
    return torch.stack([cache["pattern", layer, "attn"] for layer in range(model.n_layers)])


def by_hand(trial, tokenizer, template):
    """Query positions of the real and the null prompt, and the null prompt, built here: the
    context's ids, then the template's text after the context with "N/A" as the question."""
    ids = list(trial.input_ids)
    end = trial.context_span[1]
    after = template.format(context="", question="N/A")
    null_ids = ids[:end] + tokenizer.encode(after, add_special_tokens=False)
    return list(range(end, len(ids))), null_ids, list(range(end, len(null_ids)))


def brute_qr(model, trial, real, null_ids, null_q, *, calibrate, drop_outliers):
    """QRHead's score from full patterns, head by head in plain Python."""
    pattern = full_patterns(model, trial.input_ids).double()
    s = pattern[:, :, real, :].mean(dim=2)[..., : real[0]]
    if calibrate:
        s = s - full_patterns(model, null_ids).double()[:, :, null_q, :].mean(dim=2)[..., : real[0]]
    out, dropped = np.zeros((model.n_layers, model.n_heads)), 0
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            for needle in trial.targets:
                values = s[layer, head, needle.span[0] : needle.span[1]].tolist()
                if drop_outliers and len(values) > 1:
                    floor = statistics.mean(values) - 2 * statistics.stdev(values)
                    dropped += sum(v < floor for v in values)
                    values = [v for v in values if v >= floor]
                out[layer, head] += sum(values)
    brute_qr.dropped = dropped  # type: ignore[attr-defined]
    return out


# ---- the query-focused score ------------------------------------------------------------------


@pytest.mark.parametrize("fixture", MODELS)
@pytest.mark.parametrize("calibrate", [False, True])
@pytest.mark.parametrize("drop_outliers", [False, True])
def test_query_focused_equals_brute_force(
    fixture, calibrate, drop_outliers, request, word_tokenizer
):
    model = request.getfixturevalue(fixture)
    trial = word_trial(word_tokenizer)
    real, null_ids, null_q = by_hand(trial, word_tokenizer, "{context} {question}")
    got = query_focused_scores(model, trial, calibrate=calibrate, drop_outliers=drop_outliers)
    want = brute_qr(
        model, trial, real, null_ids, null_q, calibrate=calibrate, drop_outliers=drop_outliers
    )
    assert got.shape == (model.n_layers, model.n_heads) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    low = -1 if calibrate else 0
    assert (got >= low - 1e-6).all() and (got <= 1 + 1e-6).all()
    if not calibrate:
        assert got.max() > 0.05  # random heads read the needle a little: not all zeros
    if drop_outliers and calibrate:
        assert brute_qr.dropped > 0  # the filter is exercised (a low outlier: calibrated only)


def test_query_focused_sums_over_targets_and_skips_distractors(gqa_model, word_tokenizer):
    words = [f"w{i}" for i in range(100)]
    haystack = Haystack.from_strings([" ".join(words[i : i + 9]) for i in range(0, 90, 9)])
    first = Needle("a", " ".join(f"w{i}" for i in range(1, 12)) + " w97", "w4 w5", "w97")
    second = Needle("b", " ".join(f"w{i}" for i in range(30, 41)) + " w98", "w4 w5", "w98")
    other = Needle("c", " ".join(f"w{i}" for i in range(60, 71)) + " w99", "w4 w5", "w99")
    trial = build_trial(
        word_tokenizer,
        haystack,
        [first, second],
        distractors=[other],
        length=120,
        depth_percent=30,
        template=PromptTemplate(text="{context} {question}"),
    )
    assert [n.role for n in trial.needles] == ["target", "target", "distractor"]
    real, null_ids, null_q = by_hand(trial, word_tokenizer, "{context} {question}")
    for calibrate in (False, True):
        got = query_focused_scores(gqa_model, trial, calibrate=calibrate)
        want = brute_qr(
            gqa_model, trial, real, null_ids, null_q, calibrate=calibrate, drop_outliers=True
        )
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        one = dataclasses.replace(trial, needles=trial.needles[:1])
        assert not np.allclose(got, query_focused_scores(gqa_model, one, calibrate=calibrate))


@pytest.mark.parametrize("query", ["tail", "question"])
def test_query_positions_around_a_framed_question(query, llama_model, word_tokenizer):
    trial = word_trial(word_tokenizer, template=FRAMED)
    end = trial.context_span[1]
    tail = word_tokenizer.convert_ids_to_tokens(list(trial.input_ids[end:]))
    assert tail == ["the", "key", "is", "w4", "w5", "w6", "it"]
    real, null_ids, null_q = query_positions(
        word_tokenizer, trial, query=query, null_question="N/A"
    )
    unk = word_tokenizer.unk_token_id
    assert null_ids == list(trial.input_ids[: end + 3]) + [unk, unk, unk] + [trial.input_ids[-1]]
    if query == "tail":
        assert real == list(range(end, end + 7)) and null_q == real
    else:  # the question's three tokens, and the null question's three
        assert real == null_q == [end + 3, end + 4, end + 5]
    assert query_positions(word_tokenizer, trial, query=query)[1:] == ([], [])
    # The scores follow the positions: brute force over exactly these rows.
    for calibrate in (False, True):
        got = query_focused_scores(llama_model, trial, calibrate=calibrate, query=query)
        want = brute_qr(
            llama_model, trial, real, null_ids, null_q, calibrate=calibrate, drop_outliers=True
        )
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("calibrate", [False, True])
def test_query_focused_reads_only_the_query_rows(calibrate, gqa_model, word_tokenizer, monkeypatch):
    trial = word_trial(word_tokenizer, template=FRAMED, length=200)
    end = trial.context_span[1]
    asked, bridge_runs = [], []
    rows, bridge_forward = gqa_model.attention_rows, gqa_model._bridge_forward

    def spy_rows(ids, positions):
        asked.append((torch.as_tensor(ids).tolist(), list(positions)))
        return rows(ids, positions)

    def spy_bridge(ids, cache, start, hooks=()):
        bridge_runs.append((start, ids.shape[1]))
        return bridge_forward(ids, cache, start, hooks)

    def no_full_pattern(*args, **kwargs):
        raise AssertionError("a full pattern was asked for")

    monkeypatch.setattr(gqa_model, "attention_rows", spy_rows)
    monkeypatch.setattr(gqa_model, "_bridge_forward", spy_bridge)
    monkeypatch.setattr(gqa_model.bridge, "run_with_cache", no_full_pattern)
    query_focused_scores(gqa_model, trial, calibrate=calibrate, query="question")
    real, null_ids, null_q = query_positions(
        word_tokenizer, trial, query="question", null_question="N/A"
    )
    want = [(list(trial.input_ids), real)] + ([(null_ids, null_q)] if calibrate else [])
    assert asked == want
    assert real == [end + 3, end + 4, end + 5]
    # The bridge (the only path that fires hook_pattern) ran on the query tokens alone; the
    # 188 context tokens before them went through the fast path.
    assert bridge_runs == [(end + 3, 3)] * len(want)


def force_rows(model, layer, head, first_query, keys):
    """A hook on ``layer``'s pattern: ``head``'s rows at absolute query positions from
    ``first_query`` on put all their attention, evenly, on the absolute ``keys``."""

    def hook(pattern, hook):  # [batch, head, query, key]
        start, n_query, n_key = model.position_offset, pattern.shape[2], pattern.shape[3]
        first_key = start + n_query - n_key
        for r in range(n_query):
            if start + r >= first_query:
                pattern[:, head, r, :] = 0
                pattern[:, head, r, [k - first_key for k in keys]] = 1 / len(keys)
        return pattern

    return [(model.hook_name(layer, "pattern"), hook)]


def test_a_head_reading_the_needle_from_the_query_scores_one(llama_model, word_tokenizer):
    model = llama_model
    trial = word_trial(word_tokenizer, template=FRAMED)
    end, (a, b) = trial.context_span[1], trial.target.span
    needle_keys = list(range(a, b))
    with model.hooks(force_rows(model, 1, 2, end, needle_keys)):
        for drop in (False, True):
            for query in ("tail", "question"):
                plain = query_focused_scores(
                    model, trial, calibrate=False, drop_outliers=drop, query=query
                )
                assert plain[1, 2] == pytest.approx(1, abs=1e-6)
                assert (np.delete(plain.ravel(), 1 * model.n_heads + 2) < 0.9).all()
        # It reads the needle whatever the question: calibration takes it all away.
        assert query_focused_scores(model, trial)[1, 2] == pytest.approx(0, abs=1e-6)
    with model.hooks(force_rows(model, 1, 2, end, [0])):  # the query rows on BOS only
        assert query_focused_scores(model, trial, calibrate=False)[1, 2] == pytest.approx(0)


def test_calibration_subtracts_the_null_question(llama_model, word_tokenizer, monkeypatch):
    """Forced on the needle for the real question only: 1 minus what the head gives the needle
    when the question is "N/A" (from the null prompt's full pattern)."""
    model = llama_model
    trial = word_trial(word_tokenizer)
    end, (a, b) = trial.context_span[1], trial.target.span
    real, null_ids, null_q = by_hand(trial, word_tokenizer, "{context} {question}")
    rows = model.attention_rows
    calls = []

    def first_call_forced(ids, positions):
        calls.append(positions)
        if len(calls) > 1:
            return rows(ids, positions)
        with model.hooks(force_rows(model, 0, 3, end, list(range(a, b)))):
            return rows(ids, positions)

    monkeypatch.setattr(model, "attention_rows", first_call_forced)
    got = query_focused_scores(model, trial, calibrate=True, drop_outliers=False)
    null_mass = full_patterns(model, null_ids)[0, 3][null_q][:, a:b].sum(-1).mean()
    assert len(calls) == 2
    assert got[0, 3] == pytest.approx(1 - float(null_mass), abs=1e-6)
    assert 0 < null_mass < 1


def test_query_focused_refuses_a_trial_without_a_query(word_tokenizer):
    trial = word_trial(word_tokenizer)
    no_tail = dataclasses.replace(trial, context_span=(1, len(trial.input_ids)))
    with pytest.raises(ValueError, match="no tokens after its context"):
        query_positions(word_tokenizer, no_tail)
    with pytest.raises(ValueError, match="not found"):
        query_positions(
            word_tokenizer,
            dataclasses.replace(trial, params={**trial.params, "question": "w50"}),
            query="question",
        )
    with pytest.raises(ValueError, match="'tail' or 'question'"):
        query_positions(word_tokenizer, trial, query="answer")  # type: ignore[arg-type]


# ---- the pattern scores ------------------------------------------------------------------------


def test_probe_is_bos_then_distinct_random_tokens_twice(llama_model, word_tokenizer):
    ids = pattern_probe(llama_model, length=30, seed=4).tolist()
    assert ids[0] == word_tokenizer.bos_token_id and len(ids) == 61
    first, second = ids[1:31], ids[31:]
    assert first == second and len(set(first)) == 30
    assert not set(first) & set(word_tokenizer.all_special_ids)
    assert pattern_probe(llama_model, length=30, seed=4).tolist() == ids
    assert pattern_probe(llama_model, length=30, seed=5).tolist() != ids
    with pytest.raises(ValueError, match="fewer than"):
        pattern_probe(llama_model, length=500)


def test_detection_patterns_are_transformer_lens(llama_model):
    ids = pattern_probe(llama_model, length=12, seed=1)
    ids = torch.cat([ids, ids[3:6]])  # duplicates across copies too
    ours = detection_patterns(ids)
    assert tuple(ours) == PATTERNS
    for name, pattern in ours.items():
        theirs = getattr(head_detector, f"get_{name}_head_detection_pattern")(ids[None])
        assert torch.equal(pattern, theirs.float()), name


@pytest.mark.parametrize("fixture", MODELS)
def test_pattern_scores_equal_transformer_lens_detect_head(fixture, request, word_tokenizer):
    """TransformerLens' own detector, run on the bridge with its defaults: the probe's text
    tokenizes back to the probe (word-level tokenizer), BOS prepended where the bridge's
    default says so (not for Qwen2)."""
    model = request.getfixturevalue(fixture)
    ids = pattern_probe(model, length=25, seed=2)
    text = word_tokenizer.decode(ids[1:].tolist())
    tokens = model.bridge.to_tokens(text)[0]
    assert tokens.tolist() in (ids.tolist(), ids[1:].tolist())
    ours = pattern_scores(model, tokens=tokens)
    for name in PATTERNS:
        theirs = head_detector.detect_head(model.bridge, text, f"{name}_head")
        np.testing.assert_allclose(ours[name], theirs.double().numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fixture", MODELS)
@pytest.mark.parametrize("error_measure", ["mul", "abs"])
@pytest.mark.parametrize("exclude_bos", [False, True])
@pytest.mark.parametrize("exclude_current_token", [False, True])
def test_pattern_scores_equal_the_similarity_of_full_patterns(
    fixture, error_measure, exclude_bos, exclude_current_token, request
):
    model = request.getfixturevalue(fixture)
    ids = pattern_probe(model, length=20, seed=6)
    options = dict(
        error_measure=error_measure,
        exclude_bos=exclude_bos,
        exclude_current_token=exclude_current_token,
    )
    ours = pattern_scores(model, tokens=ids, **options)
    full = full_patterns(model, ids.tolist())
    # TransformerLens rounds the "abs" error to 3 decimals; these scores are not rounded.
    atol = 5e-4 + 1e-6 if error_measure == "abs" else 1e-5
    for name, detection in detection_patterns(ids).items():
        want = [
            [
                head_detector.compute_head_attention_similarity_score(
                    full[layer, head].clone(), detection, **options
                )
                for head in range(model.n_heads)
            ]
            for layer in range(model.n_layers)
        ]
        np.testing.assert_allclose(ours[name], np.array(want), atol=atol, rtol=0)


def force_pattern(model, layer, head, target):
    """``head``'s row at absolute query ``q`` puts all its attention on key ``target(q)``."""

    def hook(pattern, hook):
        start = model.position_offset
        pattern[:, head] = 0
        for r in range(pattern.shape[2]):
            pattern[:, head, r, target(start + r)] = 1
        return pattern

    return (model.hook_name(layer, "pattern"), hook)


def test_forced_heads_score_the_documented_exact_values(llama_model):
    model, length = llama_model, 15
    n = 2 * length + 1  # BOS, then the two copies at 1..length and length+1..2*length
    in_second = lambda q: q > length  # noqa: E731

    hooks = [
        force_pattern(model, 0, 1, lambda q: max(q - 1, 0)),
        force_pattern(model, 1, 0, lambda q: q - length if in_second(q) else 0),
        force_pattern(model, 1, 3, lambda q: q - length + 1 if in_second(q) else 0),
    ]
    with model.hooks(hooks):
        plain = pattern_scores(model, length=length)
        no_bos = pattern_scores(model, length=length, exclude_bos=True)
        absolute = pattern_scores(model, length=length, error_measure="abs")
        abs_no_bos = pattern_scores(model, length=length, error_measure="abs", exclude_bos=True)
    # Previous token: every row but the first (it can only attend to itself).
    assert plain["previous_token"][0, 1] == pytest.approx((n - 1) / n)
    assert no_bos["previous_token"][0, 1] == pytest.approx(1)
    assert absolute["previous_token"][0, 1] == pytest.approx(1 - 1 / n)
    assert abs_no_bos["previous_token"][0, 1] == pytest.approx(1)
    # Duplicate and induction: the second copy's rows; the rest sit on BOS.
    for head, name in ((0, "duplicate_token"), (3, "induction")):
        assert plain[name][1, head] == pytest.approx(length / n)
        assert no_bos[name][1, head] == pytest.approx(1)
        assert abs_no_bos[name][1, head] == pytest.approx(1)
    assert plain["induction"][1, 0] == 0 and plain["duplicate_token"][1, 3] == 0
    assert plain["previous_token"][1, 3] == pytest.approx(1 / n)  # row 1 on BOS, its previous


# ---- the shipped tiny model --------------------------------------------------------------------


def top(scores: np.ndarray, k: int) -> set[str]:
    order = np.argsort(-scores.ravel(), kind="stable")[:k]
    return {f"{i // scores.shape[1]}.{i % scores.shape[1]}" for i in order}


RETRIEVAL_TOP6 = {"2.0", "2.1", "2.4", "2.5", "2.6", "2.7"}


def test_query_focused_on_tiny_in_range(tiny_model, tiny_trials):
    for trial in tiny_trials[:4]:
        plain = query_focused_scores(tiny_model, trial, calibrate=False, drop_outliers=False)
        calibrated = query_focused_scores(tiny_model, trial)
        assert plain.shape == calibrated.shape == (tiny_model.n_layers, tiny_model.n_heads)
        assert (plain >= 0).all() and (plain <= 1 + 1e-6).all()
        assert (calibrated >= -1).all() and (calibrated <= 1).all()


@pytest.mark.golden
def test_query_focused_on_tiny_ranks_the_retrieval_heads_first(tiny_model, tiny_trials):
    """Measured on the shipped weights over the 12 ``tiny_trials``: uncalibrated, the top 7
    are layer-2 heads, the six retrieval heads among them (2.2 first at 0.43; the eighth, 4.4,
    at 0.22); calibrated, the top 5 are retrieval heads (2.5 0.27, 2.6 0.27, 2.1 0.18, 2.4 0.16,
    2.7 0.15)."""
    plain = np.mean(
        [
            query_focused_scores(tiny_model, t, calibrate=False, drop_outliers=False)
            for t in tiny_trials
        ],
        axis=0,
    )
    calibrated = np.mean([query_focused_scores(tiny_model, t) for t in tiny_trials], axis=0)
    assert RETRIEVAL_TOP6 < top(plain, 7)
    assert {h.split(".")[0] for h in top(plain, 7)} == {"2"}
    assert top(calibrated, 5) < RETRIEVAL_TOP6


@pytest.mark.golden
def test_pattern_scores_on_tiny(tiny_model):
    """Measured on the shipped weights (probe of 50, seed 0): 1.1 is a previous-token head
    (0.99, the most a head can score with BOS counted); the five best induction scores
    (0.29-0.35) are retrieval heads; no head attends to duplicates (at most 0.02)."""
    scores = pattern_scores(tiny_model)
    assert set(scores) == set(PATTERNS)
    for values in scores.values():
        assert values.shape == (tiny_model.n_layers, tiny_model.n_heads)
        assert (values >= 0).all() and (values <= 1).all()
    assert top(scores["previous_token"], 1) == {"1.1"}
    assert scores["previous_token"][1, 1] > 0.98
    assert top(scores["induction"], 5) < RETRIEVAL_TOP6
    assert scores["duplicate_token"].max() < 0.05


def test_detect_runs_the_requested_scorers_on_every_trial(tiny_model, tiny_trials, tmp_path):
    from retrieval_heads.detectors import query_focused_scores
    from retrieval_heads.logit_attribution import write_scores
    from retrieval_heads.scoring import detect
    from retrieval_heads.store import load_records, read_meta

    trials = tiny_trials[:3]
    out = tmp_path / "run"
    detect(tiny_model, trials, out=out, scorers=["write", "query_focused"])
    records = {r.trial_id: r for r in load_records(out)}
    for trial in trials:
        record = records[trial.trial_id]
        np.testing.assert_allclose(
            record.score_array("write"), write_scores(tiny_model, trial, record.generated_ids)
        )
        np.testing.assert_allclose(
            record.score_array("query_focused"), query_focused_scores(tiny_model, trial)
        )
    meta = read_meta(out)
    assert meta["config"]["scorers"] == ["write", "query_focused"]
    assert set(meta["scorers"]) == {"retrieval", "topk", "attention_mass", "write", "query_focused"}
    with pytest.raises(ValueError, match="unknown scorer"):
        detect(tiny_model, trials, scorers=["telepathy"])
    from retrieval_heads.interventions import UniformAblation

    with pytest.raises(ValueError, match="unchanged model"):
        detect(tiny_model, trials, scorers=["write"], intervention=UniformAblation(["2.0"]))
