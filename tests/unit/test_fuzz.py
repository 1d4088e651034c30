"""Fuzzing what reads user input: head labels, result and score files, needles, the trial builder.

Each property is "it returns something valid or raises the module's own ``ValueError``
subclass, never anything else" (a ``TypeError``, ``KeyError``, ``UnicodeDecodeError`` or a
numpy error would reach the command line as a crash). Round trips and the well-formed cases are
fuzzed in ``test_heads.py``, ``test_results.py`` and ``test_haystack.py``; this module adds the
hostile inputs.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from retrieval_heads.files import ResultsError
from retrieval_heads.heads import Head, parse_heads
from retrieval_heads.published import import_published
from retrieval_heads.records import TrialRecord
from retrieval_heads.scores import HeadScores
from retrieval_heads.store import load_results
from retrieval_heads.trials.base import TrialError
from retrieval_heads.trials.builder import BoundaryFallbackWarning, build_trial
from retrieval_heads.trials.haystacks import Haystack
from retrieval_heads.trials.needles import Needle, load_needles

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOWER = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)
anything = st.one_of(
    json_values,
    st.binary(max_size=8),
    st.tuples(json_values, json_values),
    st.tuples(st.integers(), st.integers()),
    st.tuples(st.floats(), st.integers()),
    st.builds(Head, st.integers(0, 50), st.integers(0, 50)),
    st.just(np.int64(3)),
    st.just((np.int64(2), np.uint8(5))),
    st.just(object()),
)


# ---- head labels ---------------------------------------------------------------------------------


@FAST
@given(anything)
def test_head_parse_raises_only_value_error(label):
    try:
        head = Head.parse(label)
    except ValueError as exc:
        assert "head label" in str(exc)
        return
    assert isinstance(head.layer, int) and isinstance(head.head, int)
    assert head.layer >= 0 and head.head >= 0
    assert Head.parse(head.dotted) == head


@FAST
@given(st.one_of(anything, st.lists(anything, max_size=4), st.text(max_size=20)))
def test_parse_heads_raises_only_value_error(labels):
    try:
        heads = parse_heads(labels)
    except ValueError:
        return
    assert all(isinstance(h, Head) for h in heads)


spellings = st.sampled_from(["{l}.{h}", "{l}-{h}", "L{l}H{h}", "l{l}h{h}", " {l} . {h} "])
pairs = st.lists(st.tuples(st.integers(-3, 12), st.integers(-3, 12)), max_size=6)


@FAST
@given(pairs, st.lists(spellings, min_size=6, max_size=6), st.integers(1, 10), st.integers(1, 10))
def test_parse_heads_range_checks(pairs, forms, n_layers, n_heads):
    """Accepted exactly when every head exists in an n_layers x n_heads model; the string and
    list forms agree; a refusal says why."""
    labels = [
        form.format(l=layer, h=head) for (layer, head), form in zip(pairs, forms, strict=False)
    ]
    valid = all(0 <= layer < n_layers and 0 <= head < n_heads for layer, head in pairs)
    for given_labels in (labels, ",".join(labels), [tuple(p) for p in pairs]):
        try:
            heads = parse_heads(given_labels, n_layers, n_heads)
        except ValueError as exc:
            assert not valid
            assert "out of range" in str(exc) or "malformed head label" in str(exc)
            assert any(layer < 0 or head < 0 for layer, head in pairs) or "out of range" in str(exc)
        else:
            assert valid and heads == [Head(layer, head) for layer, head in pairs]


# ---- score files and results ---------------------------------------------------------------------


labels = st.tuples(st.integers(0, 12), st.integers(0, 12)).map(lambda t: f"{t[0]}-{t[1]}")
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@FAST
@given(
    st.dictionaries(labels, st.lists(finite, min_size=1, max_size=4), min_size=1, max_size=6),
    st.integers(1, 12),
    st.integers(1, 12),
)
def test_published_import_with_a_shape_checks_every_label(data, n_layers, n_heads):
    fits = all(Head.parse(k).layer < n_layers and Head.parse(k).head < n_heads for k in data)
    try:
        scores = import_published(data, n_layers=n_layers, n_heads=n_heads, name="fuzz")
    except ResultsError as exc:
        assert not fits and "out of range" in str(exc) and "fuzz" in str(exc)
        return
    assert fits and scores.shape == (n_layers, n_heads)
    assert {h.dashed for h in scores.heads()} == {Head.parse(k).dashed for k in data}


def _in_tmp(name: str, content: bytes) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="rh-fuzz-"))
    path = directory / name
    path.write_bytes(content)
    return path


@FAST
@example(b'"/etc/hostname"', "scores.json")  # a JSON string is not a path to follow
@example(b'{"100000-100000": [0.5]}', "scores.json")  # a table no model has
@given(
    st.one_of(
        st.binary(max_size=64),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.text(max_size=40).map(str.encode),
    ),
    st.sampled_from(["scores.json", "trials.jsonl", "head_scores.json"]),
)
def test_load_results_raises_only_results_errors_on_any_bytes(content, name):
    path = _in_tmp(name, content)
    try:
        load_results(path)
    except ResultsError as exc:
        assert str(path) in str(exc)
    # a valid file is fine too (a published dict of lists, say)


@FAST
@given(st.binary(min_size=1, max_size=64))
def test_a_binary_meta_json_is_a_results_error(content):
    path = _in_tmp("meta.json", content)
    (path.parent / "head_scores.json").write_bytes(b"\xff" + content)
    with pytest.raises(ResultsError):
        load_results(path.parent)


def _scores(n_trials: int, n_layers: int, n_heads: int, seed: int) -> HeadScores:
    rng = np.random.default_rng(seed)
    values = rng.random((n_trials, n_layers, n_heads)).round(3)
    values[rng.random(values.shape) < 0.2] = np.nan
    passed = rng.random(n_trials) < rng.random()
    return HeadScores(values, passed, [f"t{i}" for i in range(n_trials)], n_resamples=50)


@FAST
@given(st.integers(0, 6), st.integers(1, 4), st.integers(1, 4), st.integers(0, 10_000))
def test_head_scores_of_any_pass_pattern_save_and_load_back(n_trials, n_layers, n_heads, seed):
    """No passing trial, no trial, ragged NaN: statistics compute, the file round-trips."""
    scores = _scores(n_trials, n_layers, n_heads, seed)
    text = scores.to_json()
    again = HeadScores.from_dict(json.loads(text), "fuzz")
    assert again.to_json() == text
    if scores.n_passed == 0:
        assert np.isnan(scores.mean).all() and (scores.n == 0).all()


def _mutations(data: dict) -> st.SearchStrategy:
    keys = sorted(data)
    return st.one_of(
        st.tuples(st.sampled_from(keys), json_values).map(lambda kv: {**data, kv[0]: kv[1]}),
        st.sampled_from(keys).map(lambda k: {x: v for x, v in data.items() if x != k}),
        st.tuples(st.sampled_from(keys), json_values).map(
            lambda kv: {**data, kv[0]: _swap_inner(data[kv[0]], kv[1])}
        ),
    )


def _swap_inner(value, new):
    """Replace the first leaf inside ``value`` (a nested list or dict) by ``new``."""
    if isinstance(value, list) and value:
        return [_swap_inner(value[0], new), *value[1:]]
    if isinstance(value, dict) and value:
        first = next(iter(value))
        return {**value, first: _swap_inner(value[first], new)}
    return new


SCORES_DICT = json.loads(_scores(3, 2, 2, 0).to_json())
RECORD_DICT = TrialRecord(
    "t1",
    {"context_length": 100, "depth_percent": 50.0},
    "zero four",
    [5, 6],
    "zero four",
    True,
    1.0,
    None,
    {"retrieval": [[0.5, 0.0], [1.0, 0.25]], "topk": [[0.1, 0.2], [0.3, 0.4]]},
    [(0, 1, 0, 17)],
    2,
    2,
    0.5,
).to_dict()


@FAST
@given(_mutations(SCORES_DICT))
@example({**SCORES_DICT, "bootstrap": None})
@example({**SCORES_DICT, "n_layers": 10**9, "n_heads": 10**9})
@example({**SCORES_DICT, "n_layers": -2})
def test_head_scores_file_validation_raises_only_results_errors(data):
    try:
        HeadScores.from_dict(data, "fuzz")
    except ResultsError as exc:
        assert "fuzz" in str(exc)


@FAST
@given(_mutations(RECORD_DICT))
@example({**RECORD_DICT, "params": {"depth_percent": math.nan}})  # valid once, unwritable
@example({**RECORD_DICT, "copy_events": [[0, 5, 0, 1]]})
def test_trial_record_validation_raises_only_results_errors(data):
    try:
        record = TrialRecord.from_dict(data, "fuzz")
    except ResultsError as exc:
        assert "fuzz" in str(exc)
        return
    assert TrialRecord.from_json(record.to_json()) == record


# ---- needles and the trial builder ----------------------------------------------------------------


needle_keys = st.sampled_from(["id", "needle", "question", "answer", "extra"])
needle_lines = st.one_of(
    st.dictionaries(needle_keys, json_values, max_size=5).map(json.dumps),
    st.fixed_dictionaries(
        {k: st.text(max_size=8) for k in ("id", "needle", "question", "answer")}
    ).map(json.dumps),
    st.text(max_size=20),
)


@FAST
@given(st.one_of(st.lists(needle_lines, max_size=4).map("\n".join).map(str.encode), st.binary()))
def test_load_needles_raises_only_trial_errors(content):
    path = _in_tmp("needles.jsonl", content)
    try:
        needles = load_needles(path)
    except TrialError as exc:
        assert str(path) in str(exc)
        return
    for n in needles:
        assert n.answer in n.text and n.needle_id.strip()


words = st.sampled_from("the key is in a box red blue 42 . , ? ! é 名 \n".split(" "))
phrases = st.lists(words, min_size=0, max_size=8).map(" ".join)


@SLOWER
@given(
    text=phrases,
    answer=phrases,
    length=st.one_of(
        st.integers(-5, 160),
        st.floats(allow_nan=True),
        st.booleans(),
        st.none(),
        st.text(max_size=3),
    ),
    depth=st.one_of(
        st.floats(-50, 150),
        st.floats(allow_nan=True),
        st.integers(-10, 110),
        st.none(),
        st.text(max_size=3),
    ),
)
def test_build_trial_raises_only_trial_errors(word_tok, text, answer, length, depth):
    haystack = Haystack.filler()
    try:
        needle = Needle("fuzz", text, "What is it?", answer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BoundaryFallbackWarning)
            trial = build_trial(
                word_tok, haystack, needle, length=length, depth_percent=depth, n_ctx=150
            )
    except TrialError:
        return
    assert len(trial.input_ids) == length <= 150
    start, end = trial.answer_span
    assert trial.context_span[0] <= start < end <= trial.context_span[1]
    assert 0 <= depth <= 100 and not math.isnan(float(depth))


@pytest.mark.parametrize("bad", [b"\xff\xfe\x00", "caf\u00e9".encode("latin-1")])
def test_a_binary_needles_file_is_a_trial_error(tmp_path, bad):
    path = tmp_path / "needles.jsonl"
    path.write_bytes(bad)
    with pytest.raises(TrialError, match="not UTF-8 text"):
        load_needles(path)
