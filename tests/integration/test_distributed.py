"""Sweeps over several processes, and one model over several devices, on CPU.

- ``torchrun`` (``python -m torch.distributed.run --standalone --nproc-per-node 2``, gloo) runs
  ``detect`` as two ranks; rank 0 merges. The merged directory equals a one-process run trial
  for trial (``elapsed_s`` aside) and has the same ``head_scores.json`` bytes.
- A rank is SIGKILLed mid-share: torchrun stops the job, nothing is merged; the rerun resumes,
  keeps the trials written before the kill (the very files, not recomputed) and completes with
  no duplicate and no missing trial. (Slow tier: with ``--max-restarts 1`` torchrun restarts
  the ranks itself and the one command completes.)
- ``--shard 0/2`` and ``--shard 1/2`` as separate commands, then ``merge``: the same, for
  ``detect``, for an ``ablate`` K-sweep and for a ``kv-sim`` sweep (whose exports match too).
- A device map spreading the model over ``cpu`` and ``disk`` puts it under accelerate's dispatch
  hooks (the machinery of a multi-GPU split; no GPU here) and turns the fast prefill off; the
  scores are the same as without a map.

The bad inputs (shard sets that do not match, a missing or unfinished shard, malformed
``--shard``/``--device-map``/``--max-memory``) are rows E42-E45 of ``tests/integration/test_errors.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support import ABLATE, DETECT, N_ABLATE, N_DETECT, records, subprocess_env

from retrieval_heads import cli as cli_module
from retrieval_heads.cli import inputs as cli_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIMEOUT = 300


def in_process(argv: list, model=None) -> str:
    """``cli.main(argv)`` in this process (``model`` stands in for loading); its stdout."""
    saved = cli_inputs.load
    if model is not None:
        cli_inputs.load = lambda args: model
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            assert cli_module.main([str(a) for a in argv]) == 0
    finally:
        cli_inputs.load = saved
    return out.getvalue()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """One-process ``detect`` and ``ablate`` runs (the ablation reads the detection's scores)."""
    root = tmp_path_factory.mktemp("reference")
    in_process([*DETECT, "--out", root / "detect"], tiny_model)
    in_process([*ABLATE, "--scores", root / "detect", "--out", root / "ablate"], tiny_model)
    return {"detect": root / "detect", "ablate": root / "ablate"}


def assert_same_results(reference: Path, out: Path, n: int) -> None:
    assert (out / "head_scores.json").read_bytes() == (reference / "head_scores.json").read_bytes()
    got = records(out)
    ids = [r["trial_id"] for r in got]
    assert len(ids) == n and len(set(ids)) == n  # no missing, no duplicate trial
    assert got == records(reference)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["n_trials"] == n
    assert meta["extra"]["merged_from"]["count"] == 2


def torchrun(argv: list, cwd: Path, *options: str) -> subprocess.Popen:
    """``argv`` as a 2-rank torchrun job on this machine (gloo; --standalone picks a free port)."""
    log = open(cwd / f"torchrun-{time.monotonic_ns()}.log", "w")  # noqa: SIM115 - closed in wait
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    proc = subprocess.Popen(
        [*launcher, "2", *options, "-m", "retrieval_heads", *map(str, argv)],
        cwd=cwd,
        env=subprocess_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def finished(proc: subprocess.Popen) -> tuple[int, str]:
    proc.wait(TIMEOUT)
    proc.log.close()  # type: ignore[attr-defined]
    return proc.returncode, Path(proc.log.name).read_text()  # type: ignore[attr-defined]


def test_torchrun_ranks_merge_into_what_one_process_writes(tmp_path, reference):
    out = tmp_path / "run"
    code, log = finished(torchrun([*DETECT, "--out", out], tmp_path))
    assert code == 0, log
    assert_same_results(reference["detect"], out, N_DETECT)
    for i in range(2):
        meta = json.loads((out / "shards" / f"{i}-of-2" / "meta.json").read_text())
        assert meta["extra"]["shard"] | {"command": None} == {
            "index": i, "count": 2, "units": 6, "units_total": 12, "require_pass": True,
            "command": None,
        }  # fmt: skip
        assert meta["extra"]["shard"]["command"].startswith("retrieval-heads detect --model tiny")
    assert "shard 1/2 written to" in log  # rank 1
    assert "merged 2 shards: 12 trials" in log and "heads score above 0.1" in log  # rank 0


def kill_rank_1(job: subprocess.Popen, out: Path) -> None:
    """SIGKILL rank 1 once it has written the first of its 6 trials."""
    rank1 = out / "shards" / "1-of-2"
    began = time.monotonic()
    while not list((rank1 / "trials").glob("[!.]*.json")):
        assert job.poll() is None, finished(job)[1]
        assert time.monotonic() - began < TIMEOUT
        time.sleep(0.005)
    os.kill(json.loads((rank1 / ".lock").read_text())["pid"], signal.SIGKILL)  # the shard's rank


def trial_files(out: Path) -> list[str]:
    return [p.read_text() for p in (out / "shards" / "1-of-2" / "trials").glob("[!.]*.json")]


def test_killed_rank_loses_only_its_unfinished_trials(tmp_path, reference):
    out = tmp_path / "run"
    job = torchrun([*DETECT, "--out", out], tmp_path)
    kill_rank_1(job, out)
    code, log = finished(job)
    assert code != 0  # torchrun reports the dead rank and stops the other
    assert not (out / "trials.jsonl").exists()  # nothing merged
    kept = trial_files(out)
    assert 1 <= len(kept) < 6
    meta = json.loads((out / "shards" / "1-of-2" / "meta.json").read_text())
    assert meta["status"] == "running"

    code, log = finished(torchrun([*DETECT, "--out", out], tmp_path))  # the same command again
    assert code == 0, log
    assert_same_results(reference["detect"], out, N_DETECT)
    lines = (out / "trials.jsonl").read_text().splitlines()
    for text in kept:  # timings included: the trials done before the kill were kept, not redone
        assert text.strip() in lines


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_and_completes(tmp_path, reference):
    """With ``--max-restarts``, torchrun restarts the ranks itself and they resume."""
    out = tmp_path / "run"
    job = torchrun([*DETECT, "--out", out], tmp_path, "--max-restarts", "1")
    kill_rank_1(job, out)
    code, log = finished(job)
    assert code == 0, log
    assert_same_results(reference["detect"], out, N_DETECT)


def test_shard_jobs_then_merge(tmp_path, reference, tiny_model):
    out = tmp_path / "run"
    said = in_process([*DETECT, "--out", out, "--shard", "1/2"], tiny_model)
    assert f"shard 1/2 written to {out}/shards/1-of-2; once all are: retrieval-heads merge" in said
    in_process([*DETECT, "--out", out, "--shard", "0/2"], tiny_model)
    assert not (out / "trials.jsonl").exists()  # shards are merged by merge, not by a shard
    said = in_process(["merge", out])
    assert "merged 2 shards: 12 trials" in said and "passing trials" in said
    assert_same_results(reference["detect"], out, N_DETECT)
    said = in_process(["merge", out])  # again: the same
    assert_same_results(reference["detect"], out, N_DETECT)


def test_ablate_shard_jobs_then_merge(tmp_path, reference, tiny_model):
    out = tmp_path / "ablate"
    argv = [*ABLATE, "--scores", reference["detect"], "--out", out]
    for i in range(2):
        in_process([*argv, "--shard", f"{i}/2"], tiny_model)
        meta = json.loads((out / "shards" / f"{i}-of-2" / "meta.json").read_text())
        assert meta["extra"]["shard"]["units"] == 8 and meta["n_trials"] == 8
    said = in_process(["merge", out])
    assert "merged 2 shards: 16 trials" in said and "random" in said  # the K-sweep table
    assert_same_results(reference["ablate"], out, N_ABLATE)


def test_device_map_over_cpu_and_disk_gives_the_same_scores(tmp_path, reference, tiny_model):
    """accelerate offloads the odd layers to disk and wraps every dispatched module in hooks that
    load its weights per call: the code path of a model split over GPUs, runnable on a CPU."""
    from retrieval_heads import load_model

    device_map = {name: "cpu" for name in ("model.embed_tokens", "model.rotary_emb", "model.norm")}
    device_map |= {f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(8)}
    device_map["lm_head"] = "cpu"
    model = load_model("tiny", device_map=device_map)
    assert model.fast_prefill_reason == "the model is spread over several devices"
    assert type(model.hf_model.model.layers[1]._hf_hook).__name__ == "AlignDevicesHook"
    out = tmp_path / "detect"
    in_process([*DETECT, "--out", out], model)
    assert (out / "head_scores.json").read_bytes() == (
        reference["detect"] / "head_scores.json"
    ).read_bytes()
    # and through the command line's parsing (a JSON file), on a smaller grid
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(device_map))
    argv = ["detect", "--model", "tiny", "--lengths", "150", "--n-depths", "2", "--n-needles", "1"]
    in_process([*argv, "--out", tmp_path / "plain"], tiny_model)
    in_process([*argv, "--device-map", map_file, "--out", tmp_path / "mapped"])
    plain, mapped = records(tmp_path / "plain"), records(tmp_path / "mapped")
    assert len(plain) == 2
    for a, b in zip(plain, mapped, strict=True):
        # The prefill differs (the SDPA twin without a map, the bridge in chunks with one): the
        # attention masses agree to float rounding, argmaxes and answers exactly.
        for scorer in ("topk", "attention_mass"):
            want, got = np.array(a["scores"].pop(scorer)), np.array(b["scores"].pop(scorer))
            assert np.abs(want - got).max() < 1e-5
        assert a == b


def test_device_map_auto_without_gpus_keeps_the_model_on_cpu(tiny_model, tiny_trials):
    import torch

    from retrieval_heads import load_model
    from retrieval_heads.scoring import detect

    if torch.cuda.is_available():
        pytest.skip("with a GPU, auto places the model there")
    model = load_model("tiny", device_map="auto")
    assert str(model.device) == "cpu" and model.fast_prefill  # one device: the fast path stays
    trials = tiny_trials[:3]
    assert (detect(model, trials).values == detect(tiny_model, trials).values).all()


def test_experiment_detection_shards_then_merge(tmp_path, tiny_model, monkeypatch):
    """The experiment scripts' detection (``_common.detection``) with ``--shard``: each share
    stops the script; after ``merge`` the script without ``--shard`` goes on from the merge."""
    import argparse
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "experiments"))
    common = importlib.import_module("_common")
    monkeypatch.setattr(common, "load", lambda name: tiny_model)
    said: list[str] = []

    def detection(out: Path, shard: str | None):
        args = argparse.Namespace(
            model="tiny", scores=None, lengths=[150, 250], depths=[0.0, 100.0], n_needles=1,
            n_distractors=2, seed=0, shard=shard,
        )  # fmt: skip
        return common.detection(args, out, said.append)

    for which in ("1/2", "0/2"):
        with pytest.raises(SystemExit) as info:
            detection(tmp_path / "sharded", which)
        assert info.value.code == 0
    assert f"merge with `retrieval-heads merge {tmp_path / 'sharded' / 'detect'}`" in said[-1]
    in_process(["merge", tmp_path / "sharded" / "detect"])
    _, _, kept, _ = detection(tmp_path / "sharded", None)
    _, _, records_one, _ = detection(tmp_path / "one", None)
    assert len(kept) == 4 and [r.trial_id for r in kept] == [r.trial_id for r in records_one]
    one, sharded = tmp_path / "one" / "detect", tmp_path / "sharded" / "detect"
    assert (sharded / "head_scores.json").read_bytes() == (one / "head_scores.json").read_bytes()


# 2 trials x 5 conditions (baseline; top K=0 and 2; random K=2; uniform window 64) = 10 records
KV_SIM = ["kv-sim", "--model", "tiny", "--lengths", "200", "--n-depths", "2", "--n-needles", "1",
          "--top-k", "0,2", "--random", "1", "--window", "16", "--uniform-windows", "64"]  # fmt: skip
EXPORTS = (
    "full_attention_heads.json",
    "kv_head_scores.tsv",
    "duo_attention/full_attention_heads.tsv",
)


def test_kv_sim_shard_jobs_then_merge(tmp_path, reference, tiny_model):
    argv = [*KV_SIM, "--scores", reference["detect"]]
    single = tmp_path / "single"
    said = in_process([*argv, "--out", single], tiny_model)
    assert "KV share" in said
    out = tmp_path / "sharded"
    for i in range(2):
        said = in_process([*argv, "--out", out, "--shard", f"{i}/2"], tiny_model)
        assert "retrieval-heads merge" in said and not (out / EXPORTS[0]).exists()
    said = in_process(["merge", out])
    assert "merged 2 shards: 10 trials" in said and "KV share" in said
    assert_same_results(single, out, 10)
    for name in EXPORTS:  # the merged run picks and exports the same heads
        assert (out / name).read_bytes() == (single / name).read_bytes()
