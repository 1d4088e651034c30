"""Unit tests of the results modules: records, head scores, the published format, results dirs
(``retrieval_heads.records``, ``scores``, ``published``, ``store``, ``lock``, ``files``), and the
``retrieval_heads.results`` names kept for compatibility."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval_heads import files, lock
from retrieval_heads import results as R
from retrieval_heads.files import ResultsError, ResultsLocked
from retrieval_heads.heads import Head
from retrieval_heads.published import dumps_published, export_published, import_published
from retrieval_heads.records import TrialRecord
from retrieval_heads.scores import HeadScores
from retrieval_heads.store import ResultsDir, load_results

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "published"
FIXTURE_FILES = sorted(FIXTURES.glob("*.json"))


def reference_dir() -> Path | None:
    """The published score files: $RETRIEVAL_HEADS_REFERENCE, or <repo>/../shared/reference."""
    env = os.environ.get("RETRIEVAL_HEADS_REFERENCE")
    base = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "reference"
    for candidate in (base / "retrieval_head_scores", base):
        if candidate.is_dir() and list(candidate.glob("*.json")):
            return candidate
    return None


REFERENCE = reference_dir()
REFERENCE_FILES = sorted(REFERENCE.glob("*.json")) if REFERENCE else []
needs_reference = pytest.mark.skipif(
    REFERENCE is None,
    reason="published reference scores not found (set RETRIEVAL_HEADS_REFERENCE or provide "
    "../shared/reference/retrieval_head_scores next to the repository)",
)


def make_record(
    trial_id: str,
    *,
    passed: bool = True,
    table: list[list[float]] | None = None,
    n_layers: int = 2,
    n_heads: int = 3,
    events: list[tuple[int, int, int, int]] | None = None,
    params: dict | None = None,
    recall: float | None = None,
) -> TrialRecord:
    if table is None:
        rng = random.Random(trial_id)
        table = [[rng.random() for _ in range(n_heads)] for _ in range(n_layers)]
    return TrialRecord(
        trial_id=trial_id,
        params=params if params is not None else {"context_length": 100, "depth_percent": 50},
        expected="the answer",
        generated_ids=[1, 2, 3],
        generated_text="the answer",
        passed=passed,
        recall=recall if recall is not None else (1.0 if passed else 0.0),
        reason=None if passed else "wrong answer",
        scores={"retrieval": table, "topk": [[0.5] * n_heads for _ in range(n_layers)]},
        copy_events=list(events or [(0, 0, 1, 7)]),
        n_layers=n_layers,
        n_heads=n_heads,
        elapsed_s=0.25,
    )


# ---------------------------------------------------------------------------------------------
# TrialRecord


def test_trial_record_round_trip_and_numpy_inputs():
    record = make_record("t1")
    again = TrialRecord.from_json(record.to_json())
    assert again == record
    assert again.copy_events == [(0, 0, 1, 7)]
    arr = TrialRecord(
        trial_id="t2",
        params={"len": np.int64(5), "path": Path("/x"), "heads": (Head(1, 2),)},
        expected="",
        generated_ids=np.array([4, 5]),
        generated_text="",
        passed=np.bool_(False),
        recall=np.float32(0.5),
        reason="empty",
        scores={"retrieval": np.zeros((2, 3))},
        copy_events=np.array([[1, 1, 2, 9]]),
        n_layers=2,
        n_heads=3,
    )
    d = json.loads(arr.validate().to_json())
    assert d["params"] == {"len": 5, "path": "/x", "heads": ["1.2"]}
    assert d["scores"]["retrieval"] == [[0.0] * 3] * 2
    assert d["copy_events"] == [[1, 1, 2, 9]] and d["passed"] is False


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("scores"), "missing field"),
        (lambda d: d["scores"].pop("retrieval"), "retrieval"),
        (lambda d: d["scores"]["retrieval"].pop(), "2 layers"),
        (lambda d: d["scores"]["retrieval"][1].__setitem__(2, "x"), "scores['retrieval'][1][2]"),
        (lambda d: d.__setitem__("copy_events", [[0, 5, 0, 1]]), "outside the model"),
        (lambda d: d.__setitem__("copy_events", [[0, 1]]), "copy_events[0]"),
        (lambda d: d.__setitem__("passed", "yes"), "passed"),
        (lambda d: d.__setitem__("n_heads", 0), "n_heads"),
    ],
)
def test_trial_record_validation_names_the_field(change, message):
    data = make_record("bad").to_dict()
    change(data)
    with pytest.raises(ResultsError) as info:
        TrialRecord.from_dict(data, source="trials.jsonl, line 3")
    assert message in str(info.value)
    assert "trials.jsonl, line 3" in str(info.value)


# ---------------------------------------------------------------------------------------------
# HeadScores


def records_for_stats() -> list[TrialRecord]:
    return [
        make_record("a", table=[[0.0, 1.0, 0.5], [0.2, 0.0, 0.0]]),
        make_record("b", table=[[0.0, 0.5, 0.5], [0.4, 0.0, 0.1]]),
        make_record("c", table=[[0.0, 0.0, 0.5], [0.6, 0.0, 0.0]]),
        make_record("d", passed=False, table=[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]),
    ]


def test_head_scores_statistics_by_hand():
    hs = HeadScores.from_records(records_for_stats())
    assert hs.shape == (2, 3) and hs.n_total == 4 and hs.n_passed == 3
    np.testing.assert_allclose(hs.mean, [[0.0, 0.5, 0.5], [0.4, 0.0, 0.1 / 3]])
    np.testing.assert_allclose(hs.mean_all, [[0.25, 0.625, 0.625], [0.55, 0.25, 1.1 / 4]])
    assert (hs.n == 3).all() and (hs.n_all == 4).all()
    assert hs.std[0, 1] == pytest.approx(np.std([1.0, 0.5, 0.0], ddof=1))
    assert hs.std[0, 0] == 0.0
    np.testing.assert_array_equal(hs.per_trial("0.1"), [1.0, 0.5, 0.0])
    np.testing.assert_array_equal(hs.per_trial("0-1", passing_only=False), [1.0, 0.5, 0.0, 1.0])
    assert hs.stats(Head(1, 0))["mean"] == pytest.approx(0.4)


def test_ranking_top_above_ties_and_as_array():
    hs = HeadScores.from_records(records_for_stats())
    # 0.1 and 0.2 tie at 0.5: (layer, head) order breaks the tie
    assert hs.top(3) == [Head(0, 1), Head(0, 2), Head(1, 0)]
    assert hs.above(0.1) == [Head(0, 1), Head(0, 2), Head(1, 0)]
    assert hs.above(0.45) == [Head(0, 1), Head(0, 2)]
    arr = hs.as_array()
    arr[:] = 7
    assert hs.mean[0, 1] == 0.5  # a copy


def test_kv_heads_max_and_mean():
    table = np.array([[[0.1, 0.3, 0.0, 0.8]]])
    hs = HeadScores(table)
    np.testing.assert_allclose(hs.kv_heads(2), [[0.3, 0.8]])
    np.testing.assert_allclose(hs.kv_heads(2, how="mean"), [[0.2, 0.4]])
    np.testing.assert_allclose(hs.kv_heads(1), [[0.8]])
    with pytest.raises(ValueError, match="divide"):
        hs.kv_heads(3)


def test_bootstrap_ci_contains_mean_and_is_reproducible():
    rng = np.random.default_rng(1)
    values = rng.random((50, 3, 4))
    a, b = HeadScores(values, seed=7), HeadScores(values, seed=7)
    assert (a.ci_low <= a.mean).all() and (a.mean <= a.ci_high).all()
    assert (a.ci_low < a.ci_high).all()
    np.testing.assert_array_equal(a.ci_low, b.ci_low)
    np.testing.assert_array_equal(a.ci_high, b.ci_high)
    c = HeadScores(values, seed=8)
    assert not np.array_equal(a.ci_low, c.ci_low)
    # a narrower confidence gives a narrower interval
    d = HeadScores(values, seed=7, confidence=0.5)
    assert ((d.ci_high - d.ci_low) <= (a.ci_high - a.ci_low)).all()


@pytest.mark.parametrize(
    ("field", "value"), [("n_resamples", 1_965_977_803), ("n_resamples", 0), ("confidence", 1.5)]
)
def test_a_stored_bootstrap_that_would_not_fit_is_refused(field, value):
    """Found by the fuzz test: a file asking for 2e9 resamples made numpy allocate 29 GiB."""
    data = HeadScores(np.random.default_rng(0).random((3, 2, 2))).to_dict()
    data["bootstrap"][field] = value
    with pytest.raises(ResultsError, match=r"bootstrap n_resamples must be 1\.\.100000"):
        HeadScores.from_dict(data, "f")


def test_head_scores_dict_round_trip_is_byte_stable():
    hs = HeadScores.from_records(records_for_stats())
    text = hs.to_json()
    again = HeadScores.from_dict(json.loads(text))
    assert again.to_json() == text
    np.testing.assert_array_equal(again.values, hs.values)
    assert again.trial_ids == ["a", "b", "c", "d"]
    # record order does not matter
    shuffled = records_for_stats()[::-1]
    assert HeadScores.from_records(shuffled).to_json() == text


def test_head_scores_from_dict_rejects_bad_files():
    good = HeadScores.from_records(records_for_stats()).to_dict()
    with pytest.raises(ResultsError, match="schema version 99"):
        HeadScores.from_dict({**good, "schema_version": 99}, "x.json")
    with pytest.raises(ResultsError, match="not a head-scores file"):
        HeadScores.from_dict({**good, "schema": "other"}, "x.json")
    edited = json.loads(json.dumps(good))
    edited["heads"]["0.1"]["n"] = 2
    with pytest.raises(ResultsError, match=r"heads\['0.1'\] disagrees"):
        HeadScores.from_dict(edited, "x.json")
    edited = json.loads(json.dumps(good))
    edited["per_trial"]["0.1"][1] = "high"
    with pytest.raises(ResultsError, match="x.json.*'0.1', trial 1"):
        HeadScores.from_dict(edited, "x.json")


# ---------------------------------------------------------------------------------------------
# the published format


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
def test_published_round_trip_on_fixtures(path):
    raw = path.read_text()
    hs = import_published(path)
    assert dumps_published(export_published(hs)) == raw
    # and through the project's head_scores.json
    again = HeadScores.from_dict(json.loads(hs.to_json()))
    assert dumps_published(export_published(again)) == raw
    data = json.loads(raw)
    for label, column in data.items():
        assert hs.score(label) == np.mean(column)


def test_fixtures_are_present():
    assert len(FIXTURE_FILES) == 7


@needs_reference
@pytest.mark.parametrize("name", [p.name for p in REFERENCE_FILES] or ["none"])
def test_published_round_trip_on_reference_files(name):
    path = REFERENCE / name
    raw = path.read_text()
    hs = import_published(path)
    # Same bytes: the same keys in the same order, every float bit-identical, ints still ints.
    assert dumps_published(export_published(hs)) == raw
    assert hs.n_passed == hs.n_total > 0


def test_import_infers_or_takes_the_shape():
    hs = import_published({"0-0": [0, 0.5], "3-7": [0.25, 1]})
    assert hs.shape == (4, 8)
    assert hs.heads() == [Head(0, 0), Head(3, 7)]
    assert math.isnan(hs.mean[1, 1])  # not in the file: absent, not zero
    hs = import_published({"0-0": [0.5]}, n_layers=2, n_heads=2)
    assert hs.shape == (2, 2) and hs.heads() == [Head(0, 0)]
    with pytest.raises(ResultsError, match="'5-0'.*out of range"):
        import_published({"5-0": [0.5]}, n_layers=2, n_heads=2)


def test_import_ragged_lists_round_trip():
    data = {"0-0": [0.5, 0, 1.0], "0-1": [], "1-0": [0.25]}
    hs = import_published(data)
    assert export_published(hs) == data
    assert [type(x) for x in export_published(hs)["0-0"]] == [float, int, float]
    assert hs.n[0, 0] == 3 and hs.n[0, 1] == 0 and math.isnan(hs.mean[0, 1])


def write(tmp_path: Path, text: str, name: str = "scores.json") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, pattern",
    [
        ('{"0-0": [0.1, "high"]}', r"key '0-0', trial 1: score 'high' is not a number"),
        ('{"0-0": [0.1, null]}', r"key '0-0', trial 1: score None is not a number"),
        ('{"0-0": [true]}', r"key '0-0', trial 0: score True is not a number"),
        ('{"0-0": [[0.1]]}', r"key '0-0', trial 0"),
        ('{"0-0": [NaN]}', r"key '0-0', trial 0: score nan is not a finite number"),
        ('{"0-0": [1e400]}', r"key '0-0', trial 0: score inf is not a finite"),
        ('{"0-0": [' + str(10**30) + "]}", r"key '0-0', trial 0: integer .* too large"),
        ('{"0-0": 0.5}', r"key '0-0': expected a list of scores, got float"),
        ('{"layer0-head1": [0.5]}', r"key 'layer0-head1' is not a head label"),
        ('{"3_4": [0.5]}', r"key '3_4' is not a head label"),
        ('{"1-2": [0.5], "1.2": [0.5]}', r"keys '1-2' and '1.2' name the same head"),
        ("[[0.5]]", r"expected a JSON object .* got list"),
        ("{}", r"has no heads"),
        ('{"0-0": [0.1, 0.2', r"not valid JSON .* truncated"),
        ("", r"not valid JSON"),
    ],
)
def test_bad_published_files_raise_clear_errors(tmp_path, text, pattern):
    path = write(tmp_path, text)
    with pytest.raises(ResultsError, match=pattern) as info:
        import_published(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_truncated_reference_like_file(tmp_path):
    raw = FIXTURE_FILES[0].read_text()
    path = write(tmp_path, raw[: len(raw) // 2])
    with pytest.raises(ResultsError, match="truncated"):
        import_published(path)
    with pytest.raises(ResultsError, match="truncated"):
        load_results(path)


labels = st.tuples(st.integers(0, 40), st.integers(0, 40)).map(lambda t: f"{t[0]}-{t[1]}")
scores_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.integers(-(2**53), 2**53),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(labels, st.lists(scores_values, max_size=8), min_size=1, max_size=8))
def test_fuzz_valid_published_data_round_trips_exactly(data):
    hs = import_published(data)
    exported = export_published(hs)
    canonical = dict(sorted(data.items(), key=lambda kv: Head.parse(kv[0])))
    assert list(exported) == list(canonical)
    for label, column in canonical.items():
        assert [(type(x), x) for x in exported[label]] == [(type(x), x) for x in column]
    assert json.loads(dumps_published(exported)) == canonical


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)
any_key = st.one_of(labels, st.text(max_size=6))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        json_values.filter(lambda v: not isinstance(v, str)),  # a str is a path to read
        st.dictionaries(any_key, json_values, max_size=5),
        st.dictionaries(labels, st.lists(json_scalars, max_size=5), max_size=5),
    )
)
def test_fuzz_importer_raises_only_results_errors(data):
    try:
        hs = import_published(data, name="fuzz")
    except ResultsError as exc:
        assert "fuzz" in str(exc)
        return
    assert isinstance(data, dict) and data
    # labels come back in the canonical "L-H" spelling, in (layer, head) order
    canonical = {
        Head.parse(k).dashed: v for k, v in sorted(data.items(), key=lambda kv: Head.parse(kv[0]))
    }
    assert export_published(hs) == canonical


# ---------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_write_crash_before_rename_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "head_scores.json"
    files.atomic_write_text(target, "old contents\n")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed between temp write and rename")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write_text(target, "new contents that never land\n")
    assert target.read_text() == "old contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head_scores.json"]


def test_hard_kill_before_rename_leaves_old_file_and_temp_is_cleaned(tmp_path):
    run = tmp_path / "run"
    with ResultsDir(run, model="m", config={"a": 1}) as rd:
        rd.append(make_record("t1"))
    meta_before = (run / "meta.json").read_text()
    script = f"""
        import os, signal
        from retrieval_heads import files
        os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        files.atomic_write_text(files.Path({str(run / "meta.json")!r}), "half")
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True)
    assert proc.returncode == -9
    assert (run / "meta.json").read_text() == meta_before
    assert list(run.glob(".meta.json.*.tmp"))  # the kill left its temp file ...
    with ResultsDir(run, model="m", config={"a": 1}) as rd:  # ... which reopening removes
        assert rd.done_ids() == {"t1"}
    assert not list(run.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# the results directory


def test_results_dir_append_resume_finalize(tmp_path):
    run = tmp_path / "run"
    with ResultsDir(run, model="tiny", config={"lengths": [100, 200]}, seed=3) as rd:
        assert rd.done_ids() == frozenset()
        assert rd.append(make_record("b")) is True
        assert rd.append(make_record("a", passed=False)) is True
        assert rd.append(make_record("a")) is False  # already done: skipped
        with pytest.raises(ResultsError, match="'a' is already done"):
            rd.append(make_record("a"), on_duplicate="error")
        assert "a" in rd and len(rd) == 2
    assert sorted(p.name for p in (run / "trials").iterdir()) == ["a.json", "b.json"]
    with ResultsDir(run, model="tiny", config={"lengths": [100, 200]}, seed=3) as rd:
        assert rd.done_ids() == {"a", "b"}
        assert rd.append(make_record("b")) is False
        assert rd.append(make_record("c")) is True
        scores = rd.finalize(timing={"wall_s": 1.5})
    assert scores is not None and scores.trial_ids == ["a", "b", "c"]
    lines = (run / "trials.jsonl").read_text().splitlines()
    assert [json.loads(line)["trial_id"] for line in lines] == ["a", "b", "c"]
    assert not list((run / "trials").glob("*.json"))  # merged into trials.jsonl
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["n_trials"] == 3 and meta["n_passed"] == 2
    assert meta["schema_version"] == files.SCHEMA_VERSION and meta["kind"] == "detect"
    assert meta["timing"]["wall_s"] == 1.5 and meta["scorers"] == ["retrieval", "topk"]
    assert "packages" in meta["provenance"] and len(meta["resumed"]) == 1
    # resume after finalize: ids in trials.jsonl count as done; no duplicates after a 2nd finalize
    with ResultsDir(run, model="tiny", config={"lengths": [100, 200]}, seed=3) as rd:
        assert rd.done_ids() == {"a", "b", "c"}
        assert rd.append(make_record("c")) is False
        rd.append(make_record("d"))
        rd.finalize()
    ids = [json.loads(line)["trial_id"] for line in (run / "trials.jsonl").read_text().splitlines()]
    assert ids == ["a", "b", "c", "d"]
    meta, hs, records = load_results(run)
    assert meta["n_trials"] == 4 and hs.n_total == 4 and [r.trial_id for r in records] == ids


def test_crash_during_finalize_is_harmless(tmp_path, monkeypatch):
    run = tmp_path / "run"
    with ResultsDir(run, model="m") as rd:
        rd.append(make_record("a"))
        rd.append(make_record("b"))
        rd.finalize(keep_trial_files=True)  # a crash right before removing the trial files
        rd.append(make_record("c"))
    _, hs, records = load_results(run)
    assert [r.trial_id for r in records] == ["a", "b", "c"]
    assert hs.trial_ids == ["a", "b", "c"]  # stale head_scores.json is rebuilt from the trials


def test_killed_run_loses_only_the_trial_in_flight_and_lock_is_released(tmp_path):
    run = tmp_path / "run"
    script = f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_results import make_record
        from retrieval_heads.store import ResultsDir
        rd = ResultsDir({str(run)!r}, model="m", config={{"x": 1}})
        for i in range(3):
            rd.append(make_record(f"t{{i}}"))
        os.kill(os.getpid(), signal.SIGKILL)  # mid-run, lock held, no finalize
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert (run / ".lock").exists()  # the dead process left its lock file behind ...
    with ResultsDir(run, model="m", config={"x": 1}) as rd:  # ... but it does not block
        assert rd.done_ids() == {"t0", "t1", "t2"}
        assert rd.append(make_record("t1")) is False
        rd.append(make_record("t3"))
        rd.finalize()
    assert len((run / "trials.jsonl").read_text().splitlines()) == 4
    assert not (run / ".lock").exists()


def test_lock_refuses_a_second_writer(tmp_path):
    run = tmp_path / "run"
    first = ResultsDir(run, model="m")
    with pytest.raises(ResultsLocked, match=rf"in use by pid {os.getpid()} on .* \(lock file"):
        ResultsDir(run, model="m")
    first.close()
    with pytest.raises(ResultsError, match="closed"):
        first.append(make_record("x"))
    with ResultsDir(run, model="m") as second:
        second.append(make_record("x"))


def test_pid_file_lock_without_flock(tmp_path, monkeypatch):
    """Where flock is missing, the lock is an O_EXCL pid file; a dead holder's is stale."""
    monkeypatch.setattr(lock, "fcntl", None)
    run = tmp_path / "run"
    first = ResultsDir(run, model="m")
    with pytest.raises(ResultsLocked, match=f"pid {os.getpid()}"):
        ResultsDir(run, model="m")
    first.close()
    assert not (run / ".lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(
        json.dumps({"pid": dead.pid, "host": lock.socket.gethostname(), "time": "then"})
    )
    with ResultsDir(run, model="m") as rd:  # stale: its pid is gone
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
        rd.append(make_record("a"))
    (run / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": "then"}))
    with pytest.raises(ResultsLocked, match="pid 1 on elsewhere"):  # another host: not judged
        ResultsDir(run, model="m")


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"model": "other"}, r"made for another run \(model: 'm' there, 'other' now"),
        ({"config": {"lengths": [1, 3]}}, r"lengths: \[1, 2\] -> \[1, 3\]"),
        ({"config": {"lengths": [1, 2], "depth": 5}}, r"depth: new"),
        ({"kind": "ablate"}, r"kind: 'detect' there, 'ablate' now"),
        ({"seed": 1}, r"seed: None there, 1 now"),
    ],
)
def test_reopening_for_another_run_is_refused(tmp_path, change, pattern):
    run = tmp_path / "run"
    base = {"model": "m", "config": {"lengths": [1, 2]}}
    with ResultsDir(run, **base) as rd:
        rd.append(make_record("a"))
    with pytest.raises(ResultsError, match=pattern):
        ResultsDir(run, **{**base, **change})
    assert not (run / ".lock").exists()  # a refused open releases the lock
    with ResultsDir(run, **{**base, **change}, overwrite=True) as rd:
        assert rd.done_ids() == frozenset()
        assert json.loads((run / "meta.json").read_text())["model"] == {**base, **change}["model"]


def test_incompatible_schema_version_and_unknown_trials_are_refused(tmp_path):
    run = tmp_path / "run"
    with ResultsDir(run, model="m") as rd:
        rd.append(make_record("a"))
    meta = json.loads((run / "meta.json").read_text())
    (run / "meta.json").write_text(json.dumps({**meta, "schema_version": 0}))
    with pytest.raises(ResultsError, match="schema version 0"):
        ResultsDir(run, model="m")
    (run / "meta.json").unlink()
    with pytest.raises(ResultsError, match="no meta.json"):
        ResultsDir(run, model="m")
    (run / "notes.txt").write_text("mine")
    with ResultsDir(run, model="m", overwrite=True) as rd:
        assert rd.done_ids() == frozenset()
    assert (run / "notes.txt").read_text() == "mine"  # overwrite touches only our files


def test_append_refuses_another_shape(tmp_path):
    with ResultsDir(tmp_path / "run", model="m") as rd:
        rd.append(make_record("a"))
        with pytest.raises(ResultsError, match="3x3 heads, the stored trials 2x3"):
            rd.append(make_record("b", n_layers=3))
    with ResultsDir(tmp_path / "run", model="m") as rd:
        with pytest.raises(ResultsError, match="3x3 heads"):
            rd.append(make_record("b", n_layers=3))


def test_byte_determinism_of_head_scores(tmp_path):
    records = [make_record(f"t{i}", passed=i % 3 > 0) for i in range(12)]
    outputs = []
    for name, order in (("x", records), ("y", records[::-1])):
        with ResultsDir(tmp_path / name, model="m", config={"k": 1}) as rd:
            for record in order:
                rd.append(record)
            rd.finalize()
        outputs.append(
            (
                (tmp_path / name / "head_scores.json").read_bytes(),
                (tmp_path / name / "trials.jsonl").read_bytes(),
            )
        )
    assert outputs[0] == outputs[1]


def test_odd_trial_ids_survive_as_file_names(tmp_path):
    ids = ["len=1000/depth=50", ".hidden", "ünï cödé", "a%2Fb", "..", "x" * 100]
    with ResultsDir(tmp_path / "run", model="m") as rd:
        for tid in ids:
            rd.append(make_record(tid))
    with ResultsDir(tmp_path / "run", model="m") as rd:
        assert rd.done_ids() == set(ids)
        assert sorted(r.trial_id for r in rd.records()) == sorted(ids)


def test_load_results_detects_the_format(tmp_path):
    run = tmp_path / "run"
    with ResultsDir(run, model="m") as rd:
        for i in range(3):
            rd.append(make_record(f"t{i}"))
        meta, hs, records = load_results(run)  # before finalize: from trials/
        assert len(records) == 3 and hs.n_total == 3 and meta["status"] == "running"
        rd.finalize()
    meta, hs, records = load_results(run / "head_scores.json")
    assert meta["format"] == "head-scores" and records == [] and hs.n_total == 3
    meta, hs2, records = load_results(run / "trials.jsonl")
    assert meta["format"] == "trials" and len(records) == 3
    np.testing.assert_array_equal(hs2.mean, hs.mean)
    meta, hs, records = load_results(FIXTURE_FILES[0])
    assert meta["format"] == "published" and hs.n_total == 40
    with pytest.raises(ResultsError, match="unknown schema 'nope'"):
        load_results(write(tmp_path, '{"schema": "nope"}'))
    with pytest.raises(ResultsError, match="no results at"):
        load_results(tmp_path / "missing")


def test_corrupt_trials_jsonl_names_the_line(tmp_path):
    run = tmp_path / "run"
    with ResultsDir(run, model="m") as rd:
        rd.append(make_record("a"))
        rd.append(make_record("b"))
        rd.finalize()
    lines = (run / "trials.jsonl").read_text().splitlines()
    (run / "trials.jsonl").write_text(lines[0] + "\n" + lines[1][:40] + "\n")
    with pytest.raises(ResultsError, match=r"trials.jsonl, line 2: not valid JSON"):
        load_results(run)


def test_provenance_and_no_model_imports():
    info = files.provenance()
    assert info["python"] and "numpy" in info["packages"] and "time" in info
    assert info["git"] is None or len(info["git"]["commit"]) == 40
    code = (
        "import sys, retrieval_heads.results, retrieval_heads.analysis;"
        "bad = [m for m in ('torch', 'transformers', 'transformer_lens') if m in sys.modules];"
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_atomic_writes_get_the_umask_mode_not_0600(tmp_path):
    import os
    import stat

    from retrieval_heads.files import _UMASK, atomic_write_text

    target = tmp_path / "shared.json"
    atomic_write_text(target, "{}")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~_UMASK


def test_results_module_keeps_every_public_name_of_the_split():
    """``from retrieval_heads.results import X`` works for every public name ``results.py`` had
    before records, scores, published, store and files took them over, and gives the same object."""
    import importlib

    owners = {
        "files": "SCHEMA_VERSION HEAD_SCORES_SCHEMA RESULTS_SCHEMA META_FILE SCORES_FILE "
        "TRIALS_FILE TRIALS_DIR LOCK_FILE OWNED_NAMES ResultsError ResultsLocked provenance "
        "atomic_write_text results_folder_of check_output_file check_output_folder",
        "records": "TrialRecord",
        "scores": "HeadScores MAX_RESAMPLES",
        "published": "import_published export_published dumps_published write_published",
        "store": "ResultsDir load_records read_meta load_results",
    }
    for module, names in owners.items():
        owner = importlib.import_module(f"retrieval_heads.{module}")
        for name in names.split():
            assert getattr(R, name) is getattr(owner, name), name
    assert R.__all__ == [
        "SCHEMA_VERSION",
        "HEAD_SCORES_SCHEMA",
        "RESULTS_SCHEMA",
        "ResultsError",
        "ResultsLocked",
        "TrialRecord",
        "HeadScores",
        "ResultsDir",
        "import_published",
        "export_published",
        "dumps_published",
        "write_published",
        "load_results",
        "load_records",
        "read_meta",
        "provenance",
        "atomic_write_text",
        "check_output_file",
        "check_output_folder",
    ]
