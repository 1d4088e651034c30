"""The bad-input catalogue of ``docs/errors.md``: one test per row, and the untrusted-file checks.

Each row checks three things: the exit code (CLI) or the exception type (API); a message of one
paragraph that says what is wrong, with no traceback and nothing from inside torch,
transformers or safetensors; and that nothing already written changed (every file of the
results directories involved is checksummed before and after, and a directory the failed
command would have made does not exist).

CLI rows run ``retrieval_heads.cli.main([...])`` in-process; ``--model tiny`` with default
settings reuses the session's loaded model (``cli`` fixture), every other model argument goes
through ``load_model``. ``TestRealProcess`` runs a few rows as real subprocesses
(``python -m retrieval_heads ...``) for the exit code and a stderr without "Traceback".
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from support import subprocess_env

from retrieval_heads import cli as cli_module
from retrieval_heads import registry
from retrieval_heads.cli import inputs as cli_inputs
from retrieval_heads.files import ResultsError
from retrieval_heads.store import ResultsDir, load_results

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRID = ["--lengths", "150", "--n-depths", "2", "--n-needles", "1"]
ONE = ["--lengths", "150", "--n-depths", "1", "--n-needles", "1"]
REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "retrieval_heads"
DOC = REPO / "docs" / "errors.md"
TINY_DIR = registry.PACKAGE_DIR / "tiny" / "weights" / "default"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
INNARDS = ("site-packages", "torch/", "transformers/", "safetensors/", 'File "')


# ---- helpers --------------------------------------------------------------------------------


@dataclass
class Run:
    code: int
    out: str
    err: str
    command: str

    @property
    def message(self) -> str:
        """stderr from the ``retrieval-heads <command>:`` line on (progress bars before it)."""
        at = self.err.rfind(f"retrieval-heads {self.command}:")
        assert at >= 0, f"no error message in stderr: {self.err!r}"
        return self.err[at:].strip()


def assert_error(run: Run, code: int, pattern: str, *, lines: int = 1) -> str:
    """Exit ``code``; a message of at most ``lines`` lines matching ``pattern``; no traceback."""
    assert run.code == code, (run.code, run.err)
    assert "Traceback" not in run.err, run.err
    message = run.message
    assert 1 <= len(message.splitlines()) <= lines, message
    assert "\n\n" not in message  # one paragraph
    assert not any(inner in message for inner in INNARDS), message
    assert re.search(pattern, message, re.S), message
    return message


def snapshot(*roots: Path) -> dict[str, str | None]:
    """sha256 of every file (and the list of directories) under ``roots``."""
    out: dict[str, str | None] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            out[str(root)] = None
            continue
        for path in sorted(root.rglob("*")):
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
    return out


def loader(model):
    """A stand-in for ``cli.inputs.load``: the given loaded model for plain ``--model tiny``."""
    original = cli_inputs.load

    def load(args):
        plain = (args.device, args.dtype, args.n_ctx, args.trust_remote_code) == (
            None,
            None,
            None,
            False,
        )
        placed = (args.device_map, args.n_devices, args.max_memory) != (None, None, None)
        return model if args.model == "tiny" and plain and not placed else original(args)

    return load


@pytest.fixture
def cli(monkeypatch, capsys, tiny_model):
    """``cli(*argv) -> Run``: ``cli.main`` in-process, stdout and stderr captured."""
    monkeypatch.setattr(cli_inputs, "load", loader(tiny_model))

    def run(*argv) -> Run:
        argv = [str(a) for a in argv]
        capsys.readouterr()
        code = cli_module.main(argv)
        out, err = capsys.readouterr()
        return Run(code, out, err, argv[0])

    return run


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model) -> Path:
    """A finished ``detect --model tiny`` results directory (2 trials); copy it to change it."""
    out = tmp_path_factory.mktemp("finished") / "detect"
    saved = cli_inputs.load
    cli_inputs.load = loader(tiny_model)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert cli_module.main(["detect", "--model", "tiny", *GRID, "--out", str(out)]) == 0
    finally:
        cli_inputs.load = saved
    return out


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    """A private copy of ``finished``."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


@pytest.fixture(scope="module")
def needles_file(tmp_path_factory) -> Path:
    """Two needles in the embedded model's language (JSONL)."""
    from retrieval_heads.tiny.trials import tiny_needles

    path = tmp_path_factory.mktemp("needles") / "needles.jsonl"
    path.write_text("".join(json.dumps(n.to_dict()) + "\n" for n in tiny_needles(2)))
    return path


@pytest.fixture(scope="module")
def trials(tiny_model):
    from retrieval_heads.tiny.trials import tiny_grid

    return tiny_grid(tiny_model.tokenizer, lengths=[150], depths=[50], n_needles=2)


def model_dir(tmp_path: Path, *files: str) -> Path:
    """A directory with some of the shipped tiny model's files."""
    path = tmp_path / "model"
    path.mkdir()
    for name in files:
        shutil.copy(TINY_DIR / name, path / name)
    return path


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---- the catalogue: loading a model -----------------------------------------------------------


def test_e01_unknown_model_name(cli, tmp_path):
    out = tmp_path / "run"
    run = cli("detect", "--model", "no-such-model", "--out", out)
    assert_error(
        run,
        2,
        r"'no-such-model'.*registered names: gemma-3-270m, smollm2-135m-instruct, tiny, tiny-short",
    )
    assert not out.exists()


def test_e02_hub_model_not_available_offline(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = cli("detect", "--model", "retrieval-heads-tests/no-such-model", "--out", tmp_path / "r")
    assert_error(run, 2, r"not in the local Hugging Face cache and the hub is offline")
    assert "registered names" not in run.message  # an org/name is a hub id, not a typo
    assert not (tmp_path / "r").exists()


def test_e03_missing_model_directory(cli, tmp_path):
    run = cli("detect", "--model", tmp_path / "no" / "such" / "model", "--out", tmp_path / "r")
    assert_error(run, 2, r"no such directory: .*no/such/model")
    assert not (tmp_path / "r").exists()


def test_e04_directory_without_config(cli, tmp_path):
    path = model_dir(tmp_path, *TOKENIZER_FILES)
    assert_error(cli("detect", "--model", path, "--out", tmp_path / "r"), 2, r"has no config.json")
    file = path / "tokenizer.json"
    assert_error(cli("detect", "--model", file, "--out", tmp_path / "r"), 2, r"is not a directory")
    assert not (tmp_path / "r").exists()


def test_e05_directory_without_weights(cli, tmp_path):
    path = model_dir(tmp_path, "config.json", *TOKENIZER_FILES)
    run = cli("detect", "--model", path, "--out", tmp_path / "r")
    assert_error(run, 2, r"cannot load .*no file named model.safetensors")
    assert not (tmp_path / "r").exists()


def test_e06_corrupt_weights(cli, tmp_path):
    path = model_dir(tmp_path, "config.json", *TOKENIZER_FILES)
    weights = (TINY_DIR / "model.safetensors").read_bytes()
    for broken in (weights[: len(weights) // 3], b"\x00" * 8 + os.urandom(100)):
        (path / "model.safetensors").write_bytes(broken)
        run = cli("detect", "--model", path, "--out", tmp_path / "r")
        assert_error(run, 2, r"cannot load the weights of .*corrupt or truncated")
    assert not (tmp_path / "r").exists()


def test_e07_unsupported_architecture(cli, tmp_path):
    from transformers import CTRLConfig

    config = CTRLConfig(n_embd=32, n_layer=1, n_head=2)
    config.architectures = ["CTRLLMHeadModel"]
    config.save_pretrained(tmp_path / "ctrl")
    run = cli("detect", "--model", tmp_path / "ctrl", "--out", tmp_path / "r")
    assert_error(run, 2, r"does not support architecture 'CTRLLMHeadModel'.*supported_arch")


def remote_code_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A model directory whose config maps to its own Python file, which leaves a marker."""
    path = model_dir(tmp_path, *TOKENIZER_FILES)
    marker = tmp_path / "EXECUTED"
    config = json.loads((TINY_DIR / "config.json").read_text())
    config.update(
        architectures=["EvilForCausalLM"],
        model_type="evil-remote",
        auto_map={
            "AutoConfig": "evil.EvilConfig",
            "AutoModelForCausalLM": "evil.EvilForCausalLM",
        },
    )
    (path / "config.json").write_text(json.dumps(config))
    (path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return path, marker


def test_e08_remote_code_is_not_executed(cli, tmp_path):
    path, marker = remote_code_dir(tmp_path)
    run = cli("detect", "--model", path, "--out", tmp_path / "r")
    assert_error(run, 2, r"ships its own model code: pass trust_remote_code=True if you trust")
    assert not marker.exists()
    assert not any("evil" in name for name in sys.modules)


def test_e09_pickled_checkpoint_is_not_executed(tmp_path):
    from retrieval_heads.model import ModelLoadError, load_model

    path = model_dir(tmp_path, "config.json", *TOKENIZER_FILES)
    marker = tmp_path / "EXECUTED"

    class Payload:  # unpickling calls open(marker, "w"): a stand-in for any code
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (path / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}, protocol=2))
    with pytest.raises(ModelLoadError, match=r"weights_only=True\) refuses") as info:
        load_model(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_e10_unknown_dtype(cli, tmp_path):
    run = cli("detect", "--model", "tiny", "--dtype", "float8", "--out", tmp_path / "r")
    assert_error(run, 2, r"unknown dtype 'float8': use float32, bfloat16 or float16")


def test_e11_unknown_or_missing_device(cli, tmp_path):
    run = cli("detect", "--model", "tiny", "--device", "tpu", "--out", tmp_path / "r")
    assert_error(run, 2, r"unknown device 'tpu': use cpu, cuda, cuda:N or mps")
    run = cli("detect", "--model", "tiny", "--device", "cuda:99", "--out", tmp_path / "r")
    assert_error(run, 2, r"device 'cuda:99' asked for, but")
    assert not (tmp_path / "r").exists()


def test_e12_bad_n_ctx(cli, tmp_path):
    run = cli("detect", "--model", "tiny", "--n-ctx", "0", "--out", tmp_path / "r")
    assert_error(run, 2, r"n_ctx must be positive, got 0")
    assert not (tmp_path / "r").exists()


# ---- the catalogue: building trials -----------------------------------------------------------


def test_e13_context_longer_than_the_window(cli, tmp_path, tiny_model):
    from retrieval_heads import causal
    from retrieval_heads.model import ContextLengthError
    from retrieval_heads.scoring import detect
    from retrieval_heads.tiny.trials import tiny_grid

    out = tmp_path / "run"
    run = cli("detect", "--model", "tiny", "--lengths", "2000", *ONE[2:], "--out", out)
    assert_error(run, 2, r"trials of 2000 tokens exceed the model's context window n_ctx=1024")
    assert not out.exists()  # so the corrected command can use the same --out
    assert cli("detect", "--model", "tiny", *ONE, "--out", out).code == 0
    # the API checks before it makes a results directory, for detection and for ablation
    long = tiny_grid(tiny_model.tokenizer, lengths=[1100], depths=[50], n_needles=1)
    with pytest.raises(ContextLengthError, match="n_ctx=1024"):
        detect(tiny_model, long, out=tmp_path / "api")
    with pytest.raises(ContextLengthError, match="n_ctx=1024"):
        causal.ablate_grid(tiny_model, long, ["0.0"], out=tmp_path / "api")
    assert not (tmp_path / "api").exists()


def test_e14_needle_longer_than_the_context(cli, tmp_path):
    run = cli("detect", "--model", "tiny", "--lengths", "20", *ONE[2:], "--out", tmp_path / "r")
    assert_error(run, 2, r"cannot build trial \(.*length=20.*target length must be at least \d+")
    assert not (tmp_path / "r").exists()


def test_e15_depth_out_of_range(cli, tmp_path):
    run = cli(
        "detect", "--model", "tiny", "--lengths", "150", "--depths", "150", "--out", tmp_path / "r"
    )
    assert_error(run, 2, r"depth_percent must be within 0..100, got 150.0")


def custom(cli, tmp_path, *, needles, haystack=None) -> Run:
    extra = ["--haystack", haystack] if haystack is not None else []
    return cli(
        "detect", "--model", "tiny", "--lengths", "150", "--n-depths", "2",
        "--n-distractors", "0", "--needles", needles, *extra, "--out", tmp_path / "r",
    )  # fmt: skip


def test_e16_empty_haystack(cli, tmp_path, needles_file):
    for name, text in (("empty.txt", ""), ("blank.txt", "  \n\n \t\n")):
        (tmp_path / name).write_text(text)
        run = custom(cli, tmp_path, needles=needles_file, haystack=tmp_path / name)
        assert_error(run, 2, rf"haystack='path:{name}'\): the haystack is empty \(no text\)")
    assert not (tmp_path / "r").exists()


def test_e17_binary_haystack(cli, tmp_path, needles_file):
    (tmp_path / "hay").mkdir()
    (tmp_path / "hay" / "blob.txt").write_bytes(bytes(range(256)) * 8)
    run = custom(cli, tmp_path, needles=needles_file, haystack=tmp_path / "hay")
    assert_error(run, 2, r"haystack file '.*blob.txt': not UTF-8 text \(it holds byte 0x80")
    assert not (tmp_path / "r").exists()


def test_e18_haystack_missing_or_without_text(cli, tmp_path, needles_file):
    run = custom(cli, tmp_path, needles=needles_file, haystack=tmp_path / "nope.txt")
    assert_error(run, 2, r"haystack path '.*nope.txt' does not exist")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("not a haystack")
    run = custom(cli, tmp_path, needles=needles_file, haystack=tmp_path / "notes")
    assert_error(run, 2, r"haystack directory '.*notes' has no .txt files")


def test_e19_answer_not_in_needle(cli, tmp_path, needles_file):
    first = json.loads(needles_file.read_text().splitlines()[0])
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps({**first, "answer": "zzz"}) + "\n")
    run = custom(cli, tmp_path, needles=path)
    assert_error(run, 2, r"n.jsonl:1: needle '.*': answer 'zzz' is not a substring of its text")


def test_e20_malformed_needles_jsonl(cli, tmp_path, needles_file):
    first = needles_file.read_text().splitlines()[0]
    cases = {
        first + "\n{not json\n": r"n.jsonl:2: not valid JSON",
        '{"id": "x", "needle": "y"}\n': r"n.jsonl:1: needle is missing field\(s\) \['question',",
        f"{first}\n\n{first}\n": r"n.jsonl:3: needle id '.*' already used on line 1",
        "[1, 2]\n": r"n.jsonl:1: expected a JSON object, got list",
        json.dumps({**json.loads(first), "answer": 7}) + "\n": r"field 'answer' must be a string",
    }
    path = tmp_path / "n.jsonl"
    for text, pattern in cases.items():
        path.write_text(text)
        assert_error(custom(cli, tmp_path, needles=path), 2, pattern)
    assert not (tmp_path / "r").exists()


def test_e21_needles_file_empty_binary_or_missing(cli, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    run = custom(cli, tmp_path, needles=tmp_path / "empty.jsonl")
    assert_error(run, 2, r"needles file .*empty.jsonl holds no needles")
    (tmp_path / "blob.jsonl").write_bytes(bytes(range(256)))
    run = custom(cli, tmp_path, needles=tmp_path / "blob.jsonl")
    assert_error(run, 2, r"blob.jsonl: not UTF-8 text")
    run = custom(cli, tmp_path, needles=tmp_path / "nope.jsonl")
    assert_error(run, 2, r"No such file or directory: '.*nope.jsonl'")
    assert not (tmp_path / "r").exists()


def test_e22_malformed_option_value(cli, tmp_path, capsys):
    for option, value, pattern in (
        ("--lengths", "150,x", r"expected comma-separated integers, got '150,x'"),
        ("--depths", "0,half", r"expected comma-separated numbers, got '0,half'"),
        ("--seed", "one", r"invalid int value: 'one'"),
    ):
        with pytest.raises(SystemExit) as info:
            cli("detect", "--model", "tiny", option, value, "--out", tmp_path / "r")
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and re.search(pattern, err), err
    assert not (tmp_path / "r").exists()


# ---- the catalogue: heads and ablations -------------------------------------------------------


def test_e23_malformed_head_label(tmp_path, tiny_model, trials):
    from retrieval_heads import causal
    from retrieval_heads.heads import Head, parse_heads

    for label in ("3:5", "L3", "3.5.1", "", "-1.2"):
        with pytest.raises(ValueError, match="malformed head label"):
            Head.parse(label)
    with pytest.raises(ValueError, match=r"malformed head label '3:5'.*'L\.H'"):
        parse_heads("0.1,3:5")
    with pytest.raises(ValueError, match="malformed head label"):
        tiny_model.check_head((1, -2))
    with pytest.raises(ValueError, match="malformed head label '3:5'"):
        causal.ablate_grid(tiny_model, trials, "0.1,3:5", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_e24_head_label_out_of_range(tmp_path, tiny_model, trials):
    from retrieval_heads import causal
    from retrieval_heads.interventions import Ablation

    with pytest.raises(ValueError, match=r"head 9.0 is out of range: the model has layers 0-7"):
        tiny_model.check_head("9.0")
    with pytest.raises(ValueError, match=r"head 0.8 is out of range"):
        Ablation(["0.8"], "zero", model=tiny_model)
    with pytest.raises(ValueError, match=r"head 9.0 is out of range"):
        causal.ablate_grid(tiny_model, trials, ["1.1", "9.0"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before the results directory is made


def test_e25_k_larger_than_the_number_of_heads(cli, tmp_path, finished):
    from retrieval_heads import selection

    _, scores, _ = load_results(finished)
    with pytest.raises(ValueError, match=r"k=100 exceeds the model's 64 heads"):
        selection.random_heads(scores, 100, seed=0, draw=0)
    with pytest.raises(ValueError, match=r"k=65 exceeds"):
        selection.matched_layer_heads(scores, 65, seed=0, draw=0)
    # the command line clips K (its default K list must work on small models), warns and
    # records it; every trial fails with all 64 heads ablated, and that is a result
    out = tmp_path / "ablate"
    with pytest.warns(UserWarning, match="K=100 clipped to the model's 64 heads"):
        run = cli("ablate", "--scores", finished, *ONE, "--top-k", "100", "--out", out)
    assert run.code == 0, run.err
    meta = json.loads((out / "meta.json").read_text())
    assert "K=100 clipped to the model's 64 heads" in meta["config"]["notes"]
    assert meta["config"]["ks"] == [64]
    assert json.loads((out / "head_scores.json").read_text())["n_passed"] == 0


def test_e26_negative_k_or_no_draws(cli, tmp_path, finished):
    before = snapshot(finished)
    run = cli("ablate", "--scores", finished, *ONE, "--top-k", "-1", "--out", tmp_path / "a")
    assert_error(run, 2, r"every K must be a non-negative integer, got -1")
    run = cli("ablate", "--scores", finished, *ONE, "--random", "0", "--out", tmp_path / "a")
    assert_error(run, 2, r"draws must be >= 1, got 0")
    assert not (tmp_path / "a").exists() and snapshot(finished) == before


def test_e27_unknown_ablation_mode(cli, tmp_path, finished):
    out = tmp_path / "ablate"
    argv = ["ablate", "--scores", finished, *ONE, "--top-k", "0", "--out", out]
    run = cli(*argv, "--mode", "bogus")
    assert_error(run, 2, r"unknown ablation mode 'bogus'; the modes are uniform, zero, mean")
    assert not out.exists()  # so the corrected command can use the same --out
    assert cli(*argv, "--mode", "zero").code == 0


def test_e28_mode_without_what_it_needs(tmp_path, tiny_model, trials):
    from retrieval_heads import causal

    with pytest.raises(ValueError, match="no other trial with another needle to resample from"):
        causal.ablate_grid(tiny_model, trials[:1], ["1.1"], mode="resample", out=tmp_path / "o")
    with pytest.raises(ValueError, match="unknown phase 'prefill'"):
        causal.ablate_grid(tiny_model, trials, ["1.1"], phase="prefill", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ---- the catalogue: results directories and score files ----------------------------------------


def test_e29_results_dir_from_another_model(cli, run_dir):
    edit_json(run_dir / "meta.json", model="other-model")
    before = snapshot(run_dir)
    run = cli("detect", "--model", "tiny", *GRID, "--out", run_dir)
    assert_error(run, 2, r"was made for another run \(model: 'other-model' there, 'tiny' now\)")
    assert snapshot(run_dir) == before


def test_e30_results_dir_from_another_config(cli, run_dir):
    before = snapshot(run_dir)
    argv = ["detect", "--model", "tiny", "--lengths", "200", *GRID[2:], "--seed", "1"]
    run = cli(*argv, "--out", run_dir)
    message = assert_error(run, 2, r"made for another run \(seed: 0 there, 1 now")
    assert "lengths: [150] -> [200]" in message
    assert snapshot(run_dir) == before


def test_e31_incompatible_schema_version(cli, run_dir, tmp_path):
    scores = tmp_path / "head_scores.json"
    shutil.copy(run_dir / "head_scores.json", scores)
    edit_json(scores, schema_version=99)
    run = cli("compare", scores, run_dir)
    assert_error(run, 2, r"schema version 99; this version of retrieval-heads reads version 1")
    edit_json(run_dir / "meta.json", schema_version=99)
    before = snapshot(run_dir)
    run = cli("detect", "--model", "tiny", *GRID, "--out", run_dir)
    assert_error(run, 2, r"written with schema version 99; .* writes version 1")
    edit_json(run_dir / "meta.json", schema_version=1, schema="someone-else/results")
    before = snapshot(run_dir)
    run = cli("detect", "--model", "tiny", *GRID, "--out", run_dir)
    assert_error(run, 2, r"meta.json is not a retrieval-heads results file")
    assert snapshot(run_dir) == before


def test_e32_trials_without_meta(cli, run_dir):
    (run_dir / "meta.json").unlink()
    before = snapshot(run_dir)
    run = cli("detect", "--model", "tiny", *GRID, "--out", run_dir)
    assert_error(run, 2, r"has trials but no meta.json, so what made them is unknown")
    assert snapshot(run_dir) == before


def test_e33_truncated_or_corrupt_json(cli, finished, tmp_path):
    def copy(name):
        return Path(shutil.copytree(finished, tmp_path / name))

    # a truncated meta.json in --out
    run_dir = copy("meta")
    text = (run_dir / "meta.json").read_text()
    (run_dir / "meta.json").write_text(text[: len(text) // 2])
    before = snapshot(run_dir)
    run = cli("detect", "--model", "tiny", *GRID, "--out", run_dir)
    assert_error(run, 2, r"results metadata .*meta.json: not valid JSON .* truncated or corrupt")
    assert snapshot(run_dir) == before
    # a corrupt line of trials.jsonl in --out: refused before meta.json is touched
    run_dir = copy("jsonl")
    lines = (run_dir / "trials.jsonl").read_text().splitlines()
    (run_dir / "trials.jsonl").write_text(lines[0] + "\n" + lines[1][:40] + "\n")
    before = snapshot(run_dir)
    run = cli("detect", "--model", "tiny", *GRID, "--out", run_dir)
    assert_error(run, 2, r"trials file .*trials.jsonl, line 2: not a trial record")
    assert snapshot(run_dir) == before
    # a truncated or binary head_scores.json read by ablate, compare and export
    for name, damage in (("trunc", lambda b: b[: len(b) // 3]), ("binary", lambda b: b"\xff" + b)):
        scores_dir = copy(name)
        path = scores_dir / "head_scores.json"
        path.write_bytes(damage(path.read_bytes()))
        before = snapshot(scores_dir)
        pattern = r"head-scores file .*head_scores.json: (not valid JSON|not UTF-8 text)"
        out = tmp_path / f"ablate-{name}"
        run = cli("ablate", "--scores", scores_dir, *ONE, "--top-k", "0", "--out", out)
        assert_error(run, 2, pattern)
        assert_error(cli("compare", scores_dir, finished), 2, pattern)
        assert_error(cli("export", scores_dir, "--out", tmp_path / "p.json"), 2, pattern)
        assert snapshot(scores_dir) == before and not out.exists()
        assert not (tmp_path / "p.json").exists()


def test_e34_published_file_with_non_numeric_scores(cli, tmp_path, finished):
    path = tmp_path / "published.json"
    path.write_text('{"0-0": [0.5, 0.25], "0-1": [0.1, "high"]}')
    run = cli("compare", path, finished)
    assert_error(
        run, 2, r"published scores .*published.json: key '0-1', trial 1: score 'high' is not a"
    )
    path.write_text('{"0-0": [0.5], "zero-one": [0.1]}')
    run = cli("compare", path, finished)
    assert_error(run, 2, r"key 'zero-one' is not a head label like '14-7'")


def test_e35_scores_of_another_model_shape(cli, tmp_path):
    path = tmp_path / "published.json"
    path.write_text('{"0-0": [0.5], "1-1": [0.25]}')
    out = tmp_path / "ablate"
    run = cli("ablate", "--scores", path, *ONE, "--top-k", "0", "--out", out)
    assert_error(run, 2, r"holds scores for 2 x 2 heads but tiny has 8 x 8: detect on this model")
    assert not out.exists()


def test_e36_scores_missing_or_empty(cli, tmp_path):
    out = tmp_path / "ablate"
    run = cli("ablate", "--scores", tmp_path / "nowhere", *ONE, "--out", out)
    assert_error(run, 2, r"no results at .*nowhere")
    (tmp_path / "empty").mkdir()
    run = cli("ablate", "--scores", tmp_path / "empty", *ONE, "--out", out)
    assert_error(run, 2, r"results directory .*empty holds no trials and no head_scores.json")
    assert not out.exists()


def hold(run_dir: Path) -> ResultsDir:
    """Open ``run_dir`` for writing as what made it (so this process holds its lock)."""
    meta = json.loads((run_dir / "meta.json").read_text())
    return ResultsDir(
        run_dir, model=meta["model"], config=meta["config"], kind=meta["kind"], seed=meta["seed"]
    )


def test_e37_results_dir_in_use(cli, run_dir):
    with hold(run_dir):
        before = snapshot(run_dir)
        run = cli("detect", "--model", "tiny", *GRID, "--out", run_dir)
        pattern = rf"results directory .* is in use by pid {os.getpid()} on .* wait for it"
        assert_error(run, 2, pattern)
        assert snapshot(run_dir) == before


# ---- the catalogue: writing --------------------------------------------------------------------


def test_e38_read_only_output_directory(cli, tmp_path, monkeypatch, finished):
    locked = tmp_path / "read-only"
    locked.mkdir()
    if os.geteuid() != 0:  # root ignores permission bits: simulate below in every case
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            run = cli("detect", "--model", "tiny", *GRID, "--out", locked / "run")
            assert_error(run, 2, r"Permission denied: '.*read-only/run'")
        finally:
            locked.chmod(stat.S_IRWXU)
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(locked)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    before = snapshot(locked, finished)
    run = cli("detect", "--model", "tiny", *GRID, "--out", locked / "run")
    assert_error(run, 2, r"Permission denied: '.*read-only/run'")
    run = cli("ablate", "--scores", finished, *ONE, "--top-k", "0", "--out", locked / "ab")
    assert_error(run, 2, r"Permission denied: '.*read-only/ab'")
    assert snapshot(locked, finished) == before


def fail_fsync(monkeypatch, when, watch: Path):
    """Make ``os.fsync`` fail with ENOSPC on the first file for which ``when(path)`` holds.

    Returns a dict that then holds the ``path`` of that file and a ``snapshot`` of ``watch``
    taken just before the failure; ``restore()`` puts the real ``os.fsync`` back."""
    real = os.fsync
    seen: dict = {}

    def fsync(fd):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if "path" not in seen and when(path):
            seen.update(path=path, snapshot=snapshot(watch))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    seen["restore"] = lambda: monkeypatch.setattr(os, "fsync", real)
    return seen


def settled(snap: dict) -> dict:
    """A snapshot without the lock and temp files (what outlives the writing process)."""
    return {k: v for k, v in snap.items() if not k.endswith((".lock", ".tmp"))}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the fd")
def test_e39_disk_full_while_writing(cli, tmp_path, monkeypatch, finished):
    out = tmp_path / "run"
    argv = ["detect", "--model", "tiny", *GRID, "--out", out]
    # 1. the disk fills up while the second trial is written
    trial_temps: list[str] = []

    def second_trial(path: str) -> bool:
        if "/trials/." in path and path.endswith(".tmp"):
            trial_temps.append(path)
            return len(trial_temps) == 2
        return False

    fault = fail_fsync(monkeypatch, second_trial, out)
    run = cli(*argv)
    assert_error(run, 1, r"error: \[Errno 28\] No space left on device: '.*/trials/.*\.json'")
    fault["restore"]()
    after = snapshot(out)
    meta_file = str(out / "meta.json")
    without_meta = {k: v for k, v in settled(after).items() if k != meta_file}
    assert without_meta == {  # nothing that was there changed ...
        k: v for k, v in settled(fault["snapshot"]).items() if k != meta_file
    }
    meta = json.loads((out / "meta.json").read_text())  # ... but meta.json says what stopped it
    assert meta["status"] == "failed" and "No space left on device" in meta["failure"]
    assert not [k for k in after if k.endswith((".tmp", ".lock"))]  # no partial file, no lock
    (first,) = (out / "trials").iterdir()
    record = json.loads(first.read_text())
    assert cli(*argv).code == 0  # the rerun resumes and completes ...
    assert (out / "head_scores.json").read_bytes() == (finished / "head_scores.json").read_bytes()
    lines = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert record in lines  # ... keeping the trial written before the disk filled up
    # 2. the disk is full from the start: the first meta.json cannot be written
    out2 = tmp_path / "run2"
    fault = fail_fsync(monkeypatch, lambda path: "/.meta.json." in path, out2)
    run = cli("detect", "--model", "tiny", *GRID, "--out", out2)
    assert_error(run, 1, r"No space left on device: '.*run2/meta.json'")
    fault["restore"]()
    assert not (out2 / "meta.json").exists() and not list(out2.rglob("*.tmp"))
    assert cli("detect", "--model", "tiny", *GRID, "--out", out2).code == 0  # not blocked


def test_e40_output_file_is_a_directory(cli, tmp_path, finished):
    before = snapshot(tmp_path, finished)
    run = cli("export", finished, "--out", tmp_path)
    assert_error(run, 2, r"--out .* is a directory: give a file name inside it")
    run = cli("report", finished, "--out", tmp_path)
    assert_error(run, 2, r"--out .* is a directory: give a file name inside it")
    assert snapshot(tmp_path, finished) == before


def test_e41_no_trial_passes(cli, tmp_path):
    out = tmp_path / "run"
    run = cli("detect", "--model", "tiny", *GRID, "--max-new-tokens", "1", "--out", out)
    message = assert_error(run, 1, r"no trial passed grading \(2 trials\)", lines=10)
    assert "expected 'zero four eight', got '" in message
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "failed" and "no trial passed" in meta["failure"]


# ---- the catalogue: shards and devices ---------------------------------------------------------


def shard(cli, out: Path, which: str, *extra) -> None:
    assert cli("detect", "--model", "tiny", *GRID, *extra, "--shard", which, "--out", out).code == 0


def test_e42_mismatched_shard_sets_at_merge(cli, tmp_path):
    out = tmp_path / "run"
    for which in ("0/2", "1/2", "0/3"):
        shard(cli, out, which)
    before = snapshot(out)
    run = cli("merge", out)
    assert_error(run, 2, r"mismatched shard sets in .*/run/shards \(0-of-2, 0-of-3, 1-of-2\)")
    assert snapshot(out) == before
    other = tmp_path / "other"
    shard(cli, other, "0/2")
    shard(cli, other, "1/2", "--seed", "1")
    before = snapshot(other)
    run = cli("merge", other)
    assert_error(run, 2, r"shards in .* are not from one run: seed 0 in 0-of-2, 1 in 1-of-2")
    assert snapshot(other) == before


def test_e43_shard_missing_or_unfinished_at_merge(cli, tmp_path, monkeypatch):
    from retrieval_heads import scoring

    out = tmp_path / "run"
    run = cli("merge", out)
    assert_error(run, 2, r"no shards in .*/run/shards: write them first \(with --shard I/N")
    assert not out.exists()
    shard(cli, out, "0/2")
    before = snapshot(out)
    run = cli("merge", out)
    assert_error(run, 2, r"shard 1/2 is missing \(no .*1-of-2 with a meta.json\): rerun the "
                         r"command that wrote the other shards with --shard 1/2, then merge again")  # fmt: skip
    assert snapshot(out) == before

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # Ctrl-C on the shard's first trial
        patch.setattr(scoring, "score_trial", interrupted)
        assert cli("detect", "--model", "tiny", *GRID, "--shard", "1/2", "--out", out).code == 130
    before = snapshot(out)
    run = cli("merge", out)
    assert_error(run, 2, r"shard 1/2 is unfinished \(0 of 1 trials in .*1-of-2, status "
                         r"'interrupted'\): .*--shard 1/2 to complete it")  # fmt: skip
    assert snapshot(out) == before
    shard(cli, out, "1/2")  # finishing it makes the merge work
    assert cli("merge", out).code == 0


def test_e44_malformed_shard_or_shard_under_torchrun(cli, tmp_path, capsys, monkeypatch):
    for value, pattern in (
        ("1-2", r"argument --shard: malformed shard '1-2': write I/N, shard I \(counting from 0\)"),
        ("2/2", r"argument --shard: shard 2/2 does not exist: the shards of 2 are 0/2 to 1/2"),
        ("0/0", r"argument --shard: a sweep splits into at least 1 shard, got 0"),
    ):
        with pytest.raises(SystemExit) as info:
            cli("detect", "--model", "tiny", *GRID, "--shard", value, "--out", tmp_path / "r")
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and re.search(pattern, err), err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    run = cli("detect", "--model", "tiny", *GRID, "--shard", "0/2", "--out", tmp_path / "r")
    assert_error(run, 2, r"--shard and torchrun both split the sweep: .* drop --shard")
    assert not (tmp_path / "r").exists()


def test_e45_bad_device_map_or_memory_budget(cli, tmp_path, capsys):
    import torch

    out = tmp_path / "r"
    for option, value, pattern in (
        ("--device-map", "everywhere", r"expected auto, .* a JSON file; got 'everywhere'"),
        ("--device-map", "{model: cpu}", r"'\{model: cpu\}' is not valid JSON"),
        ("--device-map", "[1]", r"got '\[1\]'"),
        ("--max-memory", "0:70GiB", r"expected DEVICE=SIZE pairs like 0=70GiB,1=70GiB"),
        ("--n-devices", "two", r"invalid int value: 'two'"),
    ):
        with pytest.raises(SystemExit) as info:
            cli("detect", "--model", "tiny", *GRID, option, value, "--out", out)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and re.search(pattern, err), err
    for argv, pattern in (
        (["--device-map", '{"model.layers.0": 1.5}'], r"entry 'model.layers.0': 1.5 should map"),
        (["--max-memory", "0=1GiB"], r"max_memory caps devices of a split model: pass device_map"),
        (["--device", "cpu", "--device-map", "auto"], r"pass device, or device_map / n_devices"),
        (["--n-devices", "0"], r"n_devices must be a positive integer, got 0"),
    ):
        assert_error(cli("detect", "--model", "tiny", *GRID, *argv, "--out", out), 2, pattern)
    if torch.cuda.device_count() < 64:
        run = cli("detect", "--model", "tiny", *GRID, "--n-devices", "64", "--out", out)
        assert_error(run, 2, r"n_devices=64 asked for, but this machine has \d+ CUDA device")
    assert not out.exists()


def test_e46_kv_sim_scores_of_another_model(cli, tmp_path):
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"0-0": [0.5], "0-1": [0.1], "1-0": [0.0], "1-1": [0.2]}))
    before = snapshot(tmp_path)
    run = cli("kv-sim", "--model", "tiny", *ONE, "--scores", scores, "--out", tmp_path / "kv")
    assert_error(run, 2, r"holds scores for 2 x 2 heads but tiny has 8 x 8: detect on this model")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("option", "pattern"),
    [
        (["--window", "0"], r"window must be an integer >= 1, got 0"),
        (["--sink", "-1"], r"sink must be an integer >= 0, got -1"),
        (["--top-k", "0,40"], r"K must be an integer from 0 to the model's 32 KV heads, got 40"),
        (["--random", "-1"], r"draws must be >= 0, got -1"),
    ],
)
def test_e47_kv_sim_bad_window_sink_or_k(cli, tmp_path, finished, option, pattern):
    before = snapshot(tmp_path, finished)
    out = tmp_path / "kv"
    run = cli("kv-sim", "--model", "tiny", *ONE, "--scores", finished, "--out", out, *option)
    assert_error(run, 2, pattern)
    assert snapshot(tmp_path, finished) == before and not out.exists()


# ---- the catalogue: GGUF files and the real models ------------------------------------------


@pytest.fixture
def gguf_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("RETRIEVAL_HEADS_CACHE", str(cache))
    return cache


def test_e48_gguf_file_foreign_or_truncated(cli, tmp_path, gguf_cache):
    foreign = tmp_path / "model.gguf"
    foreign.write_bytes(b"PK\x03\x04 not a gguf file at all")
    run = cli("detect", "--model", foreign, "--out", tmp_path / "r")
    assert_error(run, 2, r"model.gguf is not a GGUF file \(it does not start with the GGUF magic")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(7))  # a header cut short
    run = cli("detect", "--model", truncated, "--out", tmp_path / "r")
    assert_error(run, 2, r"cut.gguf is truncated or corrupt \(.*\): download it again")
    assert not (tmp_path / "r").exists()
    # nothing half-written is left where a later call would look
    left = list((gguf_cache / "gguf").iterdir()) if (gguf_cache / "gguf").exists() else []
    assert left == []


def test_e49_gguf_package_missing(cli, tmp_path, gguf_cache, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    monkeypatch.setitem(sys.modules, "gguf", None)  # what an environment without it imports
    run = cli("detect", "--model", path, "--out", tmp_path / "r")
    assert_error(run, 2, r"reading a .gguf file needs the gguf package: pip install gguf")
    assert not gguf_cache.exists() or not any(gguf_cache.rglob("*"))


def test_e50_real_model_not_installed(cli, tmp_path, monkeypatch):
    entry = registry.MODELS["smollm2-135m-instruct"]
    gone = registry.PackagedGguf("no-such-dist-for-tests", entry.gguf.file, entry.gguf.install)
    monkeypatch.setitem(
        registry.MODELS, "smollm2-135m-instruct", registry.RegistryEntry("x", gguf=gone, chat=True)
    )
    run = cli("detect", "--model", "smollm2-135m-instruct", "--out", tmp_path / "r")
    assert_error(run, 2, r"'smollm2-135m-instruct' is not installed .*`make real-models`")
    assert not (tmp_path / "r").exists()
    assert registry.state("smollm2-135m-instruct").startswith("not installed")


def test_e51_chat_on_the_embedded_model(cli, tmp_path):
    run = cli("detect", "--model", "tiny", *GRID, "--chat", "--out", tmp_path / "r")
    assert_error(run, 2, r"tiny speaks its own synthetic language and has no chat template")
    assert not (tmp_path / "r").exists()


def test_e52_patch_outside_the_embedded_world(cli, tmp_path, tiny_llama_dir):
    for model in (tiny_llama_dir, "smollm2-135m-instruct"):
        run = cli("patch", "--model", model, "--out", tmp_path / "p")
        assert_error(run, 2, r"patch builds its clean/corrupt needle pairs in the embedded model")
    run = cli("patch", "--model", "tiny", "--pairs", "0", "--out", tmp_path / "p")
    assert_error(run, 2, r"--pairs must be at least 1, got 0")
    assert not (tmp_path / "p").exists()


def test_e53_scores_without_a_passing_trial(cli, tmp_path):
    """A detection where nothing passed ranks no head: a "top-K" over it would mask nothing."""
    failed = tmp_path / "failed"
    run = cli("detect", "--model", "tiny", *GRID, "--max-new-tokens", "1", "--out", failed)
    assert run.code == 1
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({f"{la}-{h}": [] for la in range(8) for h in range(8)}))
    before = snapshot(tmp_path)
    for scores in (failed, empty):
        for command in ("ablate", "kv-sim"):
            run = cli(command, "--model", "tiny", *ONE, "--scores", scores, "--out", tmp_path / "o")
            assert_error(run, 2, r"holds no passing trial \(every score is empty or NaN\)")
    assert snapshot(tmp_path) == before


def test_e54_needle_answer_with_a_line_break(cli, tmp_path, needles_file):
    first = json.loads(needles_file.read_text().splitlines()[0])
    text = first["needle"].replace(first["answer"], first["answer"] + "\nmore")
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps({**first, "needle": text, "answer": first["answer"] + "\nmore"}))
    run = custom(cli, tmp_path, needles=path)
    assert_error(run, 2, r"holds a line break, but decoding stops at the first newline")
    assert not (tmp_path / "r").exists()


def test_e55_option_value_of_the_wrong_sign_type_emptiness_or_range(tmp_path, capsys):
    """Refused by the parser (exit 2, before anything loads); tests/unit/test_fuzz_cli.py
    covers every option."""
    out = tmp_path / "r"
    for argv, pattern in (
        (["detect", "--n-depths", "0"], r"argument --n-depths: expected an integer >= 1, got '0'"),
        (["detect", "--lengths", ","], r"argument --lengths: expected comma-separated integers, got ','"),
        (["kv-sim", "--scores", out, "--tolerance", "2"], r"argument --tolerance: expected a number from 0 to 1, got '2'"),
        (["patch", "--seed", "-1"], r"argument --seed: expected an integer >= 0, got '-1'"),
        (["patch", "--batch-size", "0"], r"argument --batch-size: invalid batch size: '0' \(expected 'auto' or an integer >= 1\)"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as info:
            cli_module.main([str(a) for a in (*argv, "--out", out)])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and re.search(pattern, err), err
    assert not out.exists()


def test_e56_output_onto_a_results_folders_files(cli, run_dir, tmp_path, tiny_model):
    """No command writes over a results folder's files, its own run's or another's."""
    import numpy as np

    from retrieval_heads.published import write_published
    from retrieval_heads.views.attention import attention_view
    from retrieval_heads.views.report import build_report

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    (run_dir / "notes.txt").write_text("mine")
    before = snapshot(run_dir, other)
    landing = r"would land on {}, (its own file|a name that folder owns), in the results folder"
    for target, name in (
        (run_dir / "head_scores.json", "head_scores.json"),
        (other / "meta.json", "meta.json"),
        (run_dir / "trials.jsonl", "trials.jsonl"),
        (run_dir / "trials" / "x.json", "trials/x.json"),
        (run_dir / "notes.txt", "notes.txt"),  # a user's file in the folder
    ):
        for argv in (("report", run_dir, "--out", target), ("export", run_dir, "--out", target)):
            assert_error(cli(*argv), 2, landing.format(re.escape(name)))
    with pytest.raises(ValueError, match=landing.format("head_scores.json")):
        write_published(load_results(run_dir)[1], other / "head_scores.json")
    with pytest.raises(ValueError, match=landing.format("meta.json")):
        build_report([run_dir], other / "meta.json")
    with pytest.raises(ValueError, match=landing.format("head_scores.json")):
        load_results(run_dir)[1].save(other / "head_scores.json")  # the API's own writers
    view = attention_view(["a", "b"], np.ones((1, 1, 2)) / 2, ["0.0"], [1], title="t")
    for target, name in (
        (other / "trials.jsonl", "trials.jsonl"),
        (run_dir / "notes.txt", "notes.txt"),
    ):
        with pytest.raises(ValueError, match=landing.format(name)):
            view.save(target)
    view.save(run_dir / "view.html")
    view.save(run_dir / "view.html")  # a view may replace the view it saved
    (run_dir / "view.html").unlink()
    # a results folder's --out: not a file, not inside another run's own files (before loading)
    for command in ("detect", "ablate", "kv-sim"):
        extra = () if command == "detect" else ("--scores", run_dir)
        run = cli(command, "--model", "tiny", *ONE, *extra, "--out", run_dir / "notes.txt")
        assert_error(run, 2, r"--out .*notes.txt is a file, not a folder")
        run = cli(command, "--model", "tiny", *ONE, *extra, "--out", other / "trials")
        assert_error(
            run, 2, r"--out .* lies in trials/ of the results folder .*which that run owns"
        )
    run = cli("patch", "--model", "tiny", "--pairs", "1", "--out", other / "trials")
    assert_error(run, 2, r"lies in trials/ of the results folder")
    assert snapshot(run_dir, other) == before
    # what a command owns it may write, and write again
    for _ in range(2):
        assert cli("report", run_dir, "--out", run_dir / "report.html").code == 0
        assert cli("export", run_dir, "--out", run_dir / "published.json").code == 0
    assert np.allclose(load_results(run_dir)[1].mean, load_results(other)[1].mean, equal_nan=True)
    assert {p: h for p, h in snapshot(other).items()} == {
        p: h for p, h in before.items() if p.startswith(str(other))
    }


def test_e57_uniform_ablation_on_alibi(cli, tmp_path, tiny_bloom_dir):
    """A zeroed query keeps ALiBi's position bias: 'uniform' would not be uniform, so it is
    refused before any trial runs (and the API refuses the Ablation too)."""
    from retrieval_heads import load_model
    from retrieval_heads.interventions import Ablation

    bloom = load_model(tiny_bloom_dir)
    assert bloom.score_bias == "alibi"
    with pytest.raises(ValueError, match=r"adds ALiBi position biases"):
        Ablation(["0.1"], "uniform", model=bloom)
    # what it would have done: on Bloom the zeroed query's row is far from uniform
    import torch

    rows = {}

    def keep(pattern, hook):
        rows["row"] = pattern[0, 1, -1].detach().clone()

    unchecked = Ablation(["0.1"], "uniform")  # no model given: hooks built by hand below
    state = bloom.prefill(torch.arange(4, 23)[None])
    hooks = [*unchecked._hooks(bloom, "decode"), ("blocks.0.attn.hook_pattern", keep)]
    bloom.step(state, torch.tensor([23]), fwd_hooks=hooks)
    assert rows["row"].max() / rows["row"].min() > 2
    scores = tmp_path / "bloom-scores.json"  # published format, Bloom's 2 x 4 heads
    scores.write_text(json.dumps({f"{la}-{h}": [0.1 * h] for la in range(2) for h in range(4)}))
    run = cli(
        "ablate", "--model", tiny_bloom_dir, "--lengths", "60", "--n-depths", "1",
        "--n-needles", "1", "--scores", scores, "--out", tmp_path / "o",
    )  # fmt: skip
    assert_error(run, 2, r"adds ALiBi position biases .* use --mode zero or mean")
    assert not (tmp_path / "o").exists()


def test_e58_model_folder_without_a_tokenizer(cli, tmp_path):
    path = model_dir(tmp_path, "config.json", "model.safetensors")
    run = cli("detect", "--model", path, "--out", tmp_path / "r")
    assert_error(run, 2, r"no usable tokenizer in .*save one there with tokenizer.save_pretrained")
    assert not (tmp_path / "r").exists()


def test_e59_tokenizer_larger_than_the_vocabulary(cli, tmp_path):
    """Ids past the embedding used to fail as an IndexError mid-run, leaving a run "running"."""
    from gguf_writer import build_bpe_tokenizer

    path = model_dir(tmp_path, "config.json", "model.safetensors")
    build_bpe_tokenizer(300).save_pretrained(path)  # another model's, 300 tokens
    run = cli("detect", "--model", path, "--out", tmp_path / "r")
    assert_error(run, 2, r"has 300 tokens but the model's embedding has 174 rows.*not this model's")
    assert not (tmp_path / "r").exists()


def test_e60_config_and_weights_disagree(cli, tmp_path):
    path = Path(shutil.copytree(TINY_DIR, tmp_path / "model"))
    edit_json(path / "config.json", hidden_size=384)
    run = cli("detect", "--model", path, "--out", tmp_path / "r")
    assert_error(
        run, 2,
        r"weights of .* do not fit its config.json: model.embed_tokens.weight is \[174, 192\] in "
        r"the weights, \[174, 384\] by the config; .* \(and \d+ more\); the config and the "
        r"weights come from different models",
    )  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_e61_falcon_new_decoder_architecture(cli, tmp_path):
    """TransformerLens' Falcon adapter splits fused QKV the Falcon-7B way: refused up front."""
    from transformers import FalconConfig

    config = FalconConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True,
    )  # fmt: skip
    config.architectures = ["FalconForCausalLM"]
    config.save_pretrained(tmp_path / "falcon")
    run = cli("detect", "--model", tmp_path / "falcon", "--out", tmp_path / "r")
    assert_error(run, 2, r"Falcon's new_decoder_architecture layout .* is not supported")
    assert not (tmp_path / "r").exists()


def test_e62_run_stopped_by_an_error_says_so(cli, tmp_path, monkeypatch):
    """An error mid-run leaves meta.json saying "failed" and why, not "running"; a rerun
    resumes and finishes."""
    from retrieval_heads import scoring

    real, calls = scoring.score_trial, {"n": 0}

    def breaks_on_the_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError("a bad trial")
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "score_trial", breaks_on_the_second)
    out = tmp_path / "r"
    assert_error(cli("detect", "--model", "tiny", *GRID, "--out", out), 2, r"a bad trial")
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["status"], meta["failure"]) == ("failed", "ValueError: a bad trial")
    assert len(list((out / "trials").glob("*.json"))) == 1
    monkeypatch.setattr(scoring, "score_trial", real)
    assert cli("detect", "--model", "tiny", *GRID, "--out", out).code == 0
    assert json.loads((out / "meta.json").read_text())["status"] == "finished"


def test_e63_needle_and_answer_in_other_unicode_forms(tmp_path):
    """'Zoë' typed with a combining diaeresis is the answer in a needle typed with 'ë'."""
    import unicodedata

    from retrieval_heads.trials.needles import load_needles

    nfc, nfd = "Zo\u00eb", unicodedata.normalize("NFD", "Zo\u00eb")
    assert nfc != nfd
    path = tmp_path / "n.jsonl"
    line = {"id": "cat", "needle": f"The cat is called {nfc}.", "question": "Who?", "answer": nfd}
    path.write_text(json.dumps(line) + "\n", encoding="utf-8")
    (needle,) = load_needles(path)
    assert needle.answer == nfc and needle.answer in needle.text


def test_e64_trial_of_another_models_tokenizer(tiny_model, llama_model):
    """Ids from another tokenizer mean other words: refused before any decoding."""
    from retrieval_heads.scoring import score_trial
    from retrieval_heads.trials import make_trials
    from retrieval_heads.trials.base import TrialError

    (trial,) = make_trials(tiny_model, lengths=[150], depths=[50], n_needles=1)
    with pytest.raises(TrialError, match=r"was not tokenized for .*make_trials\(model, \.\.\.\)"):
        score_trial(llama_model, trial)
    past = dataclasses.replace(trial, input_ids=(*trial.input_ids[:-1], tiny_model.d_vocab))
    with pytest.raises(TrialError, match=rf"token id {tiny_model.d_vocab} where"):
        score_trial(tiny_model, past)  # an added token past the embedding
    assert score_trial(tiny_model, trial).passed


def test_e65_scores_that_are_not_a_finished_detection(cli, tmp_path, run_dir, capsys):
    """--scores must rank heads as detected: not an ablation's scores, not half a detection.
    Another model of the same shape is used, with a warning."""
    ablated = tmp_path / "ablated"
    assert cli("ablate", "--model", "tiny", *ONE, "--scores", run_dir, "--top-k", "1",
               "--random", "1", "--out", ablated).code == 0  # fmt: skip
    half = tmp_path / "half"
    shutil.copytree(run_dir, half)
    edit_json(half / "meta.json", status="running")
    before = snapshot(tmp_path)
    run = cli("ablate", "--model", "tiny", *ONE, "--scores", ablated, "--out", tmp_path / "o")
    assert_error(run, 2, r"is an ablate run, .*pass the folder `retrieval-heads detect` wrote")
    run = cli("kv-sim", "--model", "tiny", *ONE, "--scores", half, "--out", tmp_path / "o")
    assert_error(run, 2, r"is an unfinished detection \(running\): rerun the same detect")
    assert snapshot(tmp_path) == before
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    edit_json(other / "meta.json", model="tiny-other-checkpoint")
    run = cli("ablate", "--model", "tiny", *ONE, "--scores", other, "--top-k", "0",
              "--out", tmp_path / "o2")  # fmt: skip
    assert run.code == 0
    assert re.search(r"warning: .* was detected on 'tiny-other-checkpoint', not 'tiny'", run.err)


def test_e66_more_needles_than_there_are(cli, tmp_path, needles_file, llama_model, tiny_model):
    """--n-needles means the first N targets, of the built-in needles or of --needles; asking
    for more than there are is refused (it used to be silently fewer, or ignored for a file)."""
    from retrieval_heads.trials import make_trials
    from retrieval_heads.trials.base import TrialError

    with pytest.raises(TrialError, match=r"--n-needles 9: there are only 5 needles: write more"):
        make_trials(llama_model, lengths=[100], depths=[0], n_needles=9)
    grid = dict(lengths=[150], depths=[50], n_distractors=0, needles=needles_file)
    assert len(make_trials(tiny_model, n_needles=1, **grid)) == 1
    assert len(make_trials(tiny_model, **grid)) == 2  # the whole file by default
    run = cli("detect", "--model", "tiny", "--lengths", "150", "--n-depths", "1",
              "--n-distractors", "0", "--needles", needles_file, "--n-needles", "3",
              "--out", tmp_path / "r")  # fmt: skip
    assert_error(run, 2, r"--n-needles 3: the needles file .* holds only 2 needles")
    assert not (tmp_path / "r").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_e67_kv_sim_export_on_sliding_window_layers(gemma3_gqa_model, word_tokenizer, tmp_path):
    """A "full" KV head of a sliding-window layer still keeps only its layer's window: the export
    lists the layer windows and those heads, so a serving stack does not read them as whole."""
    from integration.test_lean_decode import gqa_trial

    from retrieval_heads import kvcache
    from retrieval_heads.cli import print_kv_sim
    from retrieval_heads.scoring import DecodeConfig
    from retrieval_heads.store import read_meta

    model = gemma3_gqa_model
    windows = model.layer_windows()
    assert any(w is None for w in windows) and any(w is not None for w in windows)
    table = np.arange(model.n_layers * model.n_heads, dtype=float).reshape(model.n_layers, -1)
    out = tmp_path / "sim"
    config = DecodeConfig(max_new_tokens=4, stop_at_eos=False, stop_strings=())
    every = model.n_layers * model.n_kv_heads
    sweep = kvcache.simulate(
        model, [gqa_trial(word_tokenizer)], table / table.max(), ks=[every], draws=0,
        sink=1, window=4, out=out, config=config,
    )  # fmt: skip
    meta = read_meta(out)
    assert meta["extra"]["model_info"]["layer_windows"] == windows
    print_kv_sim(out, sweep.records, meta, tolerance=1.0)
    listing = json.loads((out / "full_attention_heads.json").read_text())
    assert listing["layer_windows"] == windows
    sliding = {(layer, kv) for layer, kv, _ in listing["full_heads_in_sliding_layers"]}
    chosen = {tuple(h) for h in listing["full_attention_heads"]}
    assert len(chosen) == every and sliding  # K = every head: the sliding layers' ones included
    assert sliding == {(layer, kv) for layer, kv in chosen if windows[layer] is not None}
    assert all(w == windows[layer] for layer, _, w in listing["full_heads_in_sliding_layers"])


def test_e68_kv_sim_with_no_sufficient_k(tiny_model, tmp_path, capsys):
    """When no K measured keeps accuracy within the tolerance, the largest K is exported, and
    the command and the listing say so instead of printing it as if it were sufficient."""
    from retrieval_heads import kvcache
    from retrieval_heads.cli import print_kv_sim
    from retrieval_heads.store import read_meta
    from retrieval_heads.tiny.trials import tiny_grid

    trials = tiny_grid(tiny_model.tokenizer, lengths=[300], depths=[50], n_needles=1)
    table = np.zeros((tiny_model.n_layers, tiny_model.n_heads))
    out = tmp_path / "sim"
    sweep = kvcache.simulate(tiny_model, trials, table, ks=[0], draws=0, sink=1, window=2, out=out)
    base = next(p for p in sweep.curve() if p.selection == "none")
    top0 = next(p for p in sweep.curve() if p.selection == "top")
    assert base.accuracy == 1.0 and top0.accuracy == 0.0  # a 1+2 window cannot see the needle
    print_kv_sim(out, sweep.records, read_meta(out))
    said = capsys.readouterr().out
    assert re.search(
        r"warning: no K measured keeps accuracy within 0.05 of the full cache's 1.000", said
    )
    listing = json.loads((out / "full_attention_heads.json").read_text())
    assert listing["within_tolerance"] is False and listing["baseline_accuracy"] == 1.0
    # and when one is sufficient, no warning: the full cache's own point, K = every KV head
    every = tiny_model.n_layers * tiny_model.n_kv_heads
    sweep = kvcache.simulate(tiny_model, trials, table, ks=[every], draws=0, sink=1, window=2,
                             out=tmp_path / "sim2")  # fmt: skip
    print_kv_sim(tmp_path / "sim2", sweep.records, read_meta(tmp_path / "sim2"))
    assert "warning" not in capsys.readouterr().out
    assert json.loads((tmp_path / "sim2" / "full_attention_heads.json").read_text())[
        "within_tolerance"
    ]


def test_catalogue_rows_have_tests():
    """docs/errors.md and this module agree: every row names a test here (planned rows aside)."""
    rows = [line for line in DOC.read_text().splitlines() if re.match(r"\| E\d\d ", line)]
    assert len(rows) >= 25
    names = {
        node.name for node in ast.parse(Path(__file__).read_text()).body if hasattr(node, "name")
    }
    for row in rows:
        test = re.search(r"`(test_e\d\d_\w+)`", row)
        if test is None:
            assert "planned" in row, row
            continue
        assert test.group(1) in names, row
        assert test.group(1).startswith(f"test_{row[2:5].lower()}_"), row
    assert len([n for n in names if re.match(r"test_e\d\d_", n)]) >= 25


# ---- a few rows as real processes --------------------------------------------------------------


def cli_process(*argv, cwd: Path) -> subprocess.CompletedProcess:
    env = subprocess_env()
    return subprocess.run(
        [sys.executable, "-m", "retrieval_heads", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


class TestRealProcess:
    """``python -m retrieval_heads``: the exit code, and no traceback on stderr."""

    @staticmethod
    def check(proc, code: int, command: str, pattern: str) -> None:
        assert proc.returncode == code, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        run = Run(proc.returncode, proc.stdout, proc.stderr, command)
        assert_error(run, code, pattern)

    @pytest.mark.slow  # the in-process row covers the message; this one only the exit code
    def test_e01_unknown_model(self, tmp_path):
        proc = cli_process("detect", "--model", "no-such-model", "--out", "r", cwd=tmp_path)
        self.check(
            proc,
            2,
            "detect",
            r"'no-such-model'.*registered names: gemma-3-270m, smollm2-135m-instruct, tiny, tiny-short",
        )

    def test_e06_corrupt_weights(self, tmp_path):
        path = model_dir(tmp_path, "config.json", *TOKENIZER_FILES)
        (path / "model.safetensors").write_bytes(
            (TINY_DIR / "model.safetensors").read_bytes()[:999]
        )
        proc = cli_process("detect", "--model", path, "--out", "r", cwd=tmp_path)
        self.check(proc, 2, "detect", r"cannot load the weights of .*corrupt or truncated")

    def test_e37_results_dir_in_use(self, run_dir, tmp_path):
        with hold(run_dir):
            before = snapshot(run_dir)
            proc = cli_process("detect", "--model", "tiny", *GRID, "--out", run_dir, cwd=tmp_path)
            self.check(proc, 2, "detect", rf"is in use by pid {os.getpid()} on ")
            assert snapshot(run_dir) == before


# ---- untrusted files ---------------------------------------------------------------------------


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


UNPICKLERS = ("pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "joblib", "cloudpickle")


def test_package_never_unpickles_or_evaluates():
    """No pickle-style load (pickle, marshal, shelve, dill ...), no eval/exec, numpy.load without
    pickles, and every torch.load with weights_only=True (there is none today)."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        where = f"{path.relative_to(REPO)}:"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
                loads = [a.name for a in node.names if a.name in ("load", "loads", "Unpickler")]
                if loads:
                    problems.append(f"{where}{node.lineno} imports {node.module}.{loads}")
        for call in _calls(tree):
            name = _name(call.func)
            module, _, attr = name.rpartition(".")
            keywords = {k.arg: k.value for k in call.keywords}
            if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                problems.append(f"{where}{call.lineno} calls {name}")
            if module.split(".")[-1] in UNPICKLERS and attr in (
                "load",
                "loads",
                "Unpickler",
                "open",
            ):
                problems.append(f"{where}{call.lineno} calls {name}")
            if name == "torch.load":
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}{call.lineno} torch.load without weights_only=True")
            if name in ("np.load", "numpy.load"):
                flag = keywords.get("allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and not flag.value):
                    problems.append(f"{where}{call.lineno} numpy.load with allow_pickle")
    assert not problems, problems


def test_the_source_scan_sees_what_it_looks_for(tmp_path, monkeypatch):
    """The scan above would catch each pattern (it is not vacuous)."""
    bad = tmp_path / "pkg"
    bad.mkdir()
    (bad / "m.py").write_text(
        "import pickle, torch, numpy as np\nfrom marshal import loads\n"
        "pickle.loads(b'')\ntorch.load('w.bin')\ntorch.load('w', weights_only=False)\n"
        "np.load('a.npy', allow_pickle=True)\neval('1')\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", bad)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    with pytest.raises(AssertionError) as info:
        test_package_never_unpickles_or_evaluates()
    for what in ("marshal", "pickle.loads", "torch.load without", "allow_pickle", "eval"):
        assert what in str(info.value)
    assert "m.py:4 torch.load without" in str(info.value)
    assert "m.py:5 torch.load without" in str(info.value)


def test_results_are_json_only(tmp_path, run_dir):
    """A pickle where a results file should be is refused, never unpickled."""
    marker = tmp_path / "EXECUTED"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    blob = pickle.dumps(Payload())
    (tmp_path / "scores.pkl").write_bytes(blob)
    with pytest.raises(ResultsError, match="not UTF-8 text|not valid JSON"):
        load_results(tmp_path / "scores.pkl")
    (run_dir / "head_scores.json").write_bytes(blob)
    with pytest.raises(ResultsError, match="head-scores file .*: not UTF-8 text|not valid JSON"):
        load_results(run_dir)
    (run_dir / "head_scores.json").unlink()
    (run_dir / "trials.jsonl").write_bytes(blob)
    with pytest.raises(ResultsError, match="trials file"):
        load_results(run_dir)
    assert not marker.exists()


def test_trust_remote_code_is_off_unless_asked():
    import inspect

    from retrieval_heads.model import load_model

    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    args = cli_module.build_parser().parse_args(["detect", "--out", "x"])
    assert args.trust_remote_code is False
    # a config with auto_map is refused, its code never imported: test_e08


class _Parser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "script":
            self._in_script = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


EVIL = "</script><script>alert(1)</script>"
EVIL_TAG = '<img src=x onerror="alert(2)">'


def test_report_escapes_a_hostile_results_directory(tmp_path, finished):
    """What test_views.py does not cover: the directory name, run config values, generated
    text, failure reasons, scorer names and params of a real run, all carrying markup."""
    from retrieval_heads.views.report import build_report

    hostile = Path(shutil.copytree(finished, tmp_path / f"run {EVIL_TAG}"))
    meta = json.loads((hostile / "meta.json").read_text())
    meta["config"]["haystack"] = EVIL
    meta["config"]["needles"] = EVIL_TAG
    (hostile / "meta.json").write_text(json.dumps(meta))
    lines = []
    for line in (hostile / "trials.jsonl").read_text().splitlines():
        record = json.loads(line)
        record["generated_text"] = f"{EVIL} {EVIL_TAG}"
        record["passed"], record["reason"] = False, EVIL
        record["params"]["haystack"] = EVIL
        record["scores"][EVIL] = record["scores"]["retrieval"]
        lines.append(json.dumps(record))
    (hostile / "trials.jsonl").write_text("\n".join(lines) + "\n")
    (hostile / "head_scores.json").unlink()
    out = build_report([hostile], tmp_path / "report.html")
    html = out.read_text()
    parsed = _Parser()
    parsed.feed(html)
    assert "img" not in parsed.tags
    assert not any("alert(" in script and len(script) < 1000 for script in parsed.scripts)
    assert EVIL not in html and EVIL_TAG not in html


def test_e69_unknown_or_misplaced_scorers(cli, tiny_model, tmp_path, capsys):
    from retrieval_heads.interventions import UniformAblation
    from retrieval_heads.scoring import detect
    from retrieval_heads.tiny.trials import tiny_grid

    with pytest.raises(SystemExit) as info:
        cli("detect", "--model", "tiny", "--scorers", "telepathy", "--out", tmp_path / "r")
    assert info.value.code == 2 and not (tmp_path / "r").exists()
    said = capsys.readouterr().err
    assert "unknown scorer 'telepathy': the scorers are write, query_focused" in said
    trials = tiny_grid(tiny_model.tokenizer, lengths=[150], depths=[50], n_needles=1)
    with pytest.raises(ValueError, match="unknown scorer"):
        detect(tiny_model, trials, scorers=["telepathy"])
    with pytest.raises(ValueError, match="measures the unchanged model"):
        detect(tiny_model, trials, scorers=["write"], intervention=UniformAblation(["2.0"]))


def test_e70_a_condition_from_a_newer_version(tmp_path):
    from retrieval_heads.conditions import CONDITION_VERSION
    from retrieval_heads.files import ResultsError
    from retrieval_heads.store import load_records

    v1 = Path(__file__).parent.parent / "fixtures" / "results_v1" / "ablate"
    record = load_records(v1)[0].to_dict()
    for change, said in (
        ({"version": CONDITION_VERSION + 1}, "read the file with the retrieval-heads that wrote"),
        ({"type": "telepathy"}, "unknown condition type 'telepathy'"),
    ):
        folder = tmp_path / str(len(said))
        folder.mkdir()
        bad = {**record, "condition": {**record["condition"], **change}}
        (folder / "trials.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(ResultsError, match=said):
            load_records(folder)
