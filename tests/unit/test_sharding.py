"""Sharding without a model: shard parsing and ownership, torchrun's environment, and the merge
of shard directories (written here from synthetic records) into what one process writes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from retrieval_heads.records import TrialRecord
from retrieval_heads.sharding import Job, MergeError, Shard, merge, owned, shard_dir, shard_meta
from retrieval_heads.store import ResultsDir

CONFIG = {"lengths": [100, 200], "depths": [0, 50, 100], "trials": 10}

# ---- Shard ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "index", "count"), [("0/1", 0, 1), ("3/4", 3, 4), (" 1 / 2 ", 1, 2), ("7/100", 7, 100)]
)
def test_parse(text, index, count):
    shard = Shard.parse(text)
    assert (shard.index, shard.count) == (index, count)
    assert str(shard) == f"{index}/{count}" and shard.dirname == f"{index}-of-{count}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1-2", r"malformed shard '1-2': write I/N"),
        ("a/b", r"malformed shard 'a/b'"),
        ("", r"malformed shard ''"),
        ("1/2/3", r"malformed shard"),
        ("2/2", r"shard 2/2 does not exist: the shards of 2 are 0/2 to 1/2"),
        ("-1/2", r"shard -1/2 does not exist"),
        ("0/0", r"at least 1 shard, got 0"),
        ("0/-3", r"at least 1 shard, got -3"),
    ],
)
def test_parse_refuses_bad_text(text, message):
    with pytest.raises(ValueError, match=message):
        Shard.parse(text)


def test_shard_refuses_non_integers():
    with pytest.raises(ValueError, match="index must be an integer"):
        Shard(True, 2)
    with pytest.raises(ValueError, match="count must be an integer"):
        Shard(0, 2.0)


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("total", [0, 1, 4, 13])
def test_shards_split_a_sweep_into_disjoint_round_robin_shares(count, total):
    shares = [list(Shard(i, count).positions(total)) for i in range(count)]
    assert sorted(p for share in shares for p in share) == list(range(total))  # each unit once
    for i, share in enumerate(shares):
        assert all(p % count == i for p in share)
        assert [p for p in range(total) if Shard(i, count).owns(p)] == share
    sizes = [len(share) for share in shares]
    assert max(sizes, default=0) - min(sizes, default=0) <= 1  # balanced
    letters = [chr(97 + p) for p in range(total)]
    assert owned(letters, Shard(count - 1, count)) == [letters[p] for p in shares[-1]]
    assert owned(letters, None) == letters


# ---- torchrun's environment ------------------------------------------------------------------


def test_job_outside_torchrun():
    assert Job.from_env(None, {}).shard is None
    job = Job.from_env("1/3", {"WORLD_SIZE": "1"})
    assert job.shard == Shard(1, 3) and not job.torchrun and not job.merges
    assert job.device("cpu") == "cpu" and job.device(None) is None


def test_job_under_torchrun():
    env = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}
    job = Job.from_env(None, env)
    assert job.shard == Shard(2, 4) and job.torchrun and not job.merges
    assert Job.from_env(None, {**env, "RANK": "0"}).merges
    assert job.device("cpu") == "cpu"  # an explicit device is kept
    with pytest.raises(ValueError, match="--shard and torchrun both split the sweep"):
        Job.from_env("0/2", env)
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        Job.from_env(None, {**env, "RANK": "x"})
    with pytest.raises(ValueError, match="torchrun sets RANK, but it is missing"):
        Job.from_env(None, {"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="shard 4/4 does not exist"):
        Job.from_env(None, {**env, "RANK": "4"})


# ---- merge --------------------------------------------------------------------------------------


def record(i: int, passed: bool = True) -> TrialRecord:
    rng = random.Random(i)
    return TrialRecord(
        trial_id=f"t{i:02d}",
        params={"context_length": 100 * (1 + i % 2), "depth_percent": 50},
        expected="the answer",
        generated_ids=[1, 2],
        generated_text="the answer" if passed else "no",
        passed=passed,
        recall=1.0 if passed else 0.0,
        reason=None if passed else "wrong answer",
        scores={"retrieval": [[rng.random() for _ in range(3)] for _ in range(2)]},
        copy_events=[(0, 1, 2, 5)],
        n_layers=2,
        n_heads=3,
        elapsed_s=0.5,
    )


def write_shard(out: Path, shard: Shard, records, *, finish=True, config=CONFIG, seed=0) -> Path:
    """A shard as detect(shard=...) writes it: its share of ``records``, in a ResultsDir."""
    path = shard_dir(out, shard)
    extra = shard_meta(shard, len(records), require_pass=True)
    with ResultsDir(
        path, model="m", config=config, kind="detect", seed=seed, extra_meta=extra
    ) as run:
        for p in shard.positions(len(records)):
            run.append(records[p])
        if finish:
            run.finalize()
    return path


def files(directory: Path) -> dict[str, bytes]:
    return {n: (directory / n).read_bytes() for n in ("trials.jsonl", "head_scores.json")}


def test_merge_writes_what_one_process_writes(tmp_path):
    records = [record(i, passed=i % 3 != 0) for i in range(10)]
    with ResultsDir(tmp_path / "one", model="m", config=CONFIG, kind="detect", seed=0) as run:
        for r in records:
            run.append(r)
        run.finalize()
    out = tmp_path / "sharded"
    for i in range(3):
        write_shard(out, Shard(i, 3), records)
    merged = merge(out)
    assert files(out) == files(tmp_path / "one")  # byte for byte (the timings are equal here)
    assert merged.kind == "detect" and merged.count == 3
    assert [r.trial_id for r in merged.records] == [r.trial_id for r in records]
    meta = json.loads((out / "meta.json").read_text())
    one = json.loads((tmp_path / "one" / "meta.json").read_text())
    for key in ("kind", "model", "config", "seed", "status", "n_trials", "n_passed"):
        assert meta[key] == one[key], key
    assert meta["extra"]["merged_from"]["count"] == 3
    before = files(out)
    merge(out)  # again: nothing changes
    assert files(out) == before


def test_merge_of_a_run_without_a_passing_trial_fails_as_the_run_would(tmp_path):
    records = [record(i, passed=False) for i in range(4)]
    for i in range(2):
        write_shard(tmp_path, Shard(i, 2), records)

    class NoPass(RuntimeError):
        pass

    with pytest.raises(NoPass, match="4 failed"):
        merge(tmp_path, no_pass_error=lambda rs: NoPass(f"{len(rs)} failed"))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["status"] == "failed" and meta["failure"] == "4 failed"
    assert not (tmp_path / "head_scores.json").exists()


def refused(out: Path, pattern: str) -> None:
    """merge(out) raises MergeError matching ``pattern`` and writes nothing outside shards/."""
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(MergeError, match=pattern):
        merge(out)
    assert sorted(p.name for p in out.iterdir()) == before


def test_merge_refuses_what_is_not_one_complete_run(tmp_path):
    records = [record(i) for i in range(6)]
    out = tmp_path / "run"
    out.mkdir()
    refused(out, r"no shards in .*/run/shards: write them first")
    write_shard(out, Shard(0, 2), records)
    refused(out, r"shard 1/2 is missing .*rerun the command that wrote the other shards with "
                 r"--shard 1/2, then merge again")  # fmt: skip
    write_shard(out, Shard(1, 2), records, finish=False)
    refused(out, r"shard 1/2 is unfinished \(3 of 3 trials .* status 'running'; it may still be")
    write_shard(out, Shard(1, 2), records)
    write_shard(out, Shard(0, 3), records)
    refused(out, r"mismatched shard sets in .*0-of-2, 0-of-3, 1-of-2\)")


def test_merge_refuses_shards_of_different_runs(tmp_path):
    records = [record(i) for i in range(6)]
    write_shard(tmp_path, Shard(0, 2), records)
    write_shard(tmp_path, Shard(1, 2), records, config={**CONFIG, "lengths": [100, 300]})
    refused(tmp_path, r"not from one run: config lengths \[100, 200\] in 0-of-2, \[100, 300\] in")
    write_shard(tmp_path / "b", Shard(0, 2), records)
    write_shard(tmp_path / "b", Shard(1, 2), records, seed=1)
    refused(tmp_path / "b", r"not from one run: seed 0 in 0-of-2, 1 in 1-of-2")


def test_merge_refuses_repeated_or_renamed_shards(tmp_path):
    records = [record(i) for i in range(4)]
    write_shard(tmp_path, Shard(0, 2), records)
    write_shard(tmp_path, Shard(1, 2), [records[1], records[0], records[3], records[2]])
    refused(tmp_path, r"trial 't00' is in more than one shard .*\(2 repeated ids\)")
    other = tmp_path / "b"
    write_shard(other, Shard(0, 2), records)
    shard_dir(other, Shard(0, 2)).rename(shard_dir(other, Shard(1, 2)))
    write_shard(other, Shard(0, 2), records)
    refused(other, r"1-of-2 is not shard 1/2: its meta.json says .*'index': 0")
    stray = tmp_path / "c"
    write_shard(stray, Shard(0, 2), records)
    write_shard(stray, Shard(1, 2), records)
    (stray / "shards" / "2-of-2").mkdir()
    refused(stray, r"2-of-2 in .* cannot be shards \(shard I of N has I < N\)")


def test_merge_says_how_to_finish_a_shard_from_the_recorded_command(tmp_path, monkeypatch):
    argv = ["/x/retrieval_heads/__main__.py", "detect", "--out", "my run", "--shard", "0/3"]
    monkeypatch.setattr("sys.argv", argv)
    records = [record(i) for i in range(6)]
    write_shard(tmp_path, Shard(0, 3), records)
    meta = json.loads((shard_dir(tmp_path, Shard(0, 3)) / "meta.json").read_text())
    assert meta["extra"]["shard"]["command"] == "retrieval-heads detect --out 'my run' --shard 0/3"
    refused(tmp_path, r"shard 1/3 is missing .*: run `retrieval-heads detect --out 'my run' "
                      r"--shard 1/3`, then merge again")  # fmt: skip
    monkeypatch.setattr("sys.argv", ["/usr/bin/pytest", "-q"])  # not a retrieval-heads command
    assert shard_meta(Shard(0, 1), 1)["shard"]["command"] is None
