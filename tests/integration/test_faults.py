"""Faults: ``kill -9`` at random points, and two processes on one results directory.

The real command line runs as a subprocess (``python -m retrieval_heads``), is killed with
SIGKILL at seeded points (once a number of trial files exist under ``OUT/trials/``, or after a
delay, which can land in model loading or in ``finalize()``), is checked, and restarted; the
last restart runs to completion. After every kill every JSON file in the directory parses (no
partially written file is ever visible under its name: temp files are ignored, and removed
when the directory is next opened). The completed run equals an uninterrupted one: the same
``head_scores.json`` bytes and the same ``trials.jsonl`` records (their ``elapsed_s`` timings
aside).

The default tier kills ``detect`` and ``ablate`` once each (and checks the lock with a second
process); the slow tier kills each at five seeded points in a row.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import ABLATE, DETECT, N_ABLATE, N_DETECT, records, subprocess_env

from retrieval_heads import cli as cli_module
from retrieval_heads.cli import inputs as cli_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIMEOUT = 300


# ---- running and killing the command line ------------------------------------------------------


def start(argv: list, cwd: Path) -> subprocess.Popen:
    """The command as a real process; stderr (progress bars) to a file, so no pipe fills up."""
    env = subprocess_env()
    log = open(cwd / f"stderr-{time.monotonic_ns()}.log", "w")  # noqa: SIM115 - closed on exit
    proc = subprocess.Popen(
        [sys.executable, "-m", "retrieval_heads", *map(str, argv)],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def stderr_of(proc: subprocess.Popen) -> str:
    proc.log.close()  # type: ignore[attr-defined]
    return Path(proc.log.name).read_text()  # type: ignore[attr-defined]


def trial_files(out: Path) -> int:
    """Finished trial files (temp files are ``.<name>.*.tmp`` and do not count)."""
    trials = out / "trials"
    return len(list(trials.glob("[!.]*.json"))) if trials.is_dir() else 0


def wait_for(proc: subprocess.Popen, ready, timeout: float = TIMEOUT, poll: float = 0.005) -> bool:
    """Poll until ``ready()``; False if the process ended first."""
    began = time.monotonic()
    while proc.poll() is None:
        if ready():
            return True
        if time.monotonic() - began > timeout:
            proc.kill()
            pytest.fail(f"the process did not get there within {timeout} s")
        time.sleep(poll)
    return False


def temp_files(out: Path) -> list[str]:
    """Temp files of ``atomic_write_text`` in the directory (cheap: polled in a tight loop)."""
    found = []
    for directory in (out, out / "trials"):
        with contextlib.suppress(FileNotFoundError):
            found += [e.name for e in os.scandir(directory) if e.name.endswith(".tmp")]
    return found


def run_and_kill(argv: list, out: Path, cwd: Path, point: tuple) -> bool:
    """Start the command and SIGKILL it at ``point``; True if killed, False if it finished first.

    ``("delay", s)``: after s seconds (at most until a first trial file exists);
    ``("files", k, s)``: s seconds after k trial files exist; ``("temp", k)``: once k trial
    files exist (or all there are), at the first temp file seen (mid-write)."""
    kind, value, *rest = point
    proc = start(argv, cwd)
    began = time.monotonic()
    if kind == "delay":  # or the first trial file, whichever comes first
        ready = lambda: time.monotonic() - began >= value or trial_files(out) > 0  # noqa: E731
    else:
        ready = lambda: trial_files(out) >= value  # noqa: E731
    reached = wait_for(proc, ready)
    if reached and kind == "files" and rest:
        time.sleep(rest[0])
    elif reached and kind == "temp":
        reached = wait_for(proc, lambda: bool(temp_files(out)), poll=0)  # the window is short
    if not reached or proc.poll() is not None:
        proc.wait()
        assert proc.returncode == 0, stderr_of(proc)
        stderr_of(proc)
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stderr_of(proc)
    assert proc.returncode == -signal.SIGKILL
    return True


def complete(argv: list, cwd: Path) -> None:
    proc = start(argv, cwd)
    proc.wait(TIMEOUT)
    assert proc.returncode == 0, stderr_of(proc)
    stderr_of(proc)


# ---- what must hold ----------------------------------------------------------------------------


def assert_consistent(out: Path) -> None:
    """Every file under its final name is whole: each JSON file and trials.jsonl line parses."""
    if not out.exists():
        return
    for path in out.rglob("*.json"):
        if not path.name.startswith("."):  # .<name>.*.tmp are temp files, never read
            json.loads(path.read_text())
    if (out / "trials.jsonl").exists():
        for line in (out / "trials.jsonl").read_text().splitlines():
            json.loads(line)


def assert_same_results(reference: Path, out: Path, n: int) -> None:
    assert (out / "head_scores.json").read_bytes() == (reference / "head_scores.json").read_bytes()
    got, want = records(out), records(reference)
    assert [r["trial_id"] for r in got] == sorted(r["trial_id"] for r in want)
    assert len(got) == n and got == want
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["n_trials"] == n
    assert not list(out.rglob("*.tmp")) and not (out / ".lock").exists()
    assert trial_files(out) == 0  # merged into trials.jsonl by finalize()


def kill_points(seed: int, n_trials: int, count: int) -> list[tuple]:
    """``count`` seeded kill points. One: just after some trials. Five: after a delay (model
    loading, or the first trial), at three growing trial counts (plus a pause), and at the first
    temp file seen (inside ``atomic_write_text``: a write of ``meta.json``, of a trial or of
    ``finalize()``). All but the last are sure to come before the run ends."""
    rng = random.Random(seed)
    if count == 1:
        return [("files", rng.randint(2, n_trials - 4), round(rng.uniform(0, 0.2), 3))]
    k = sorted(rng.sample(range(1, n_trials - 1), count - 2))
    return [
        ("delay", round(rng.uniform(0.5, 6.0), 2)),
        *[("files", k[i], round(rng.uniform(0, 0.05), 3)) for i in range(len(k))],
        ("temp", n_trials),
    ]


def kill_repeatedly(argv: list, out: Path, cwd: Path, points) -> int:
    """Kill the command at each point in turn, checking the directory after each kill."""
    kills = 0
    for kind, value, *rest in points:
        if kind != "delay" and value <= trial_files(out):
            value = trial_files(out) + (kind == "files")  # not while it loads the model
        kills += run_and_kill(argv, out, cwd, (kind, value, *rest))
        assert_consistent(out)
    return kills


# ---- references (uninterrupted, in-process) -------------------------------------------------------


def in_process(argv: list, model) -> None:
    saved = cli_inputs.load
    cli_inputs.load = lambda args: model
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert cli_module.main([str(a) for a in argv]) == 0
    finally:
        cli_inputs.load = saved


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """Uninterrupted ``detect`` and ``ablate`` runs (the ablation reads the detection's scores)."""
    root = tmp_path_factory.mktemp("reference")
    in_process([*DETECT, "--out", root / "detect"], tiny_model)
    in_process([*ABLATE, "--scores", root / "detect", "--out", root / "ablate"], tiny_model)
    return {"detect": root / "detect", "ablate": root / "ablate"}


# ---- default tier ------------------------------------------------------------------------------


def test_detect_killed_once_then_resumed_while_a_second_process_is_refused(tmp_path, reference):
    out = tmp_path / "detect"
    argv = [*DETECT, "--out", out]
    assert kill_repeatedly(argv, out, tmp_path, kill_points(0, N_DETECT, 1)) == 1
    done = trial_files(out)
    assert 0 < done < N_DETECT
    # resume; stop it (it holds the lock) once it has written another trial
    first = start(argv, tmp_path)
    assert wait_for(first, lambda: trial_files(out) > done), stderr_of(first)
    first.send_signal(signal.SIGSTOP)
    try:
        second = start(argv, tmp_path)
        second.wait(TIMEOUT)
        err = stderr_of(second)
        assert second.returncode == 2, err
        assert f"is in use by pid {first.pid} on" in err and "Traceback" not in err
        assert_consistent(out)
    finally:
        first.send_signal(signal.SIGCONT)
    first.wait(TIMEOUT)
    assert first.returncode == 0, stderr_of(first)
    stderr_of(first)
    assert_same_results(reference["detect"], out, N_DETECT)


def test_ablate_killed_once_then_resumed(tmp_path, reference):
    out = tmp_path / "ablate"
    argv = [*ABLATE, "--scores", reference["detect"], "--out", out]
    assert kill_repeatedly(argv, out, tmp_path, kill_points(1, N_ABLATE, 1)) == 1
    complete(argv, tmp_path)
    assert_same_results(reference["ablate"], out, N_ABLATE)


# ---- slow tier: five kill points each ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12])
def test_detect_killed_at_five_points(tmp_path, reference, seed):
    out = tmp_path / "detect"
    argv = [*DETECT, "--out", out]
    kills = kill_repeatedly(argv, out, tmp_path, kill_points(seed, N_DETECT, 5))
    assert kills >= 3  # a late point (the temp file, say) may come after the run ended
    complete(argv, tmp_path)
    assert_same_results(reference["detect"], out, N_DETECT)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [21, 22])
def test_ablate_killed_at_five_points(tmp_path, reference, seed):
    out = tmp_path / "ablate"
    argv = [*ABLATE, "--scores", reference["detect"], "--out", out]
    kills = kill_repeatedly(argv, out, tmp_path, kill_points(seed, N_ABLATE, 5))
    assert kills >= 3
    complete(argv, tmp_path)
    assert_same_results(reference["ablate"], out, N_ABLATE)
