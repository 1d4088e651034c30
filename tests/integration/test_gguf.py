"""GGUF files as model inputs: conversion, its cache, its failures, and split-file assembly.

Every GGUF here is written by ``tests/gguf_writer.py`` from a config-built tiny Llama (2 layers,
4 heads sharing 2 KV heads) and a byte-level BPE trained in memory: no network, no download.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from gguf_writer import SENTENCES, build_bpe_tokenizer, build_tiny_llama, write_llama_gguf
from support import subprocess_env

from retrieval_heads import gguf as rgguf
from retrieval_heads import registry
from retrieval_heads.model import load_model
from retrieval_heads.registry import ModelLoadError, PackagedGguf

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-4  # float32 in, float32 out: only summation order may differ
TEXTS = [
    SENTENCES[1],
    "where is the key? 12345, said the fox.",
    "unseen wörds and symbols ~ ∑ ok",  # bytes the merges never saw
    f"{SENTENCES[0]}<|eos|>",  # a special token stays one id
]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The model and tokenizer a GGUF is written from, and that file (never modified)."""
    tokenizer = build_bpe_tokenizer()
    model = build_tiny_llama(len(tokenizer), seed=7)
    path = write_llama_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf-src") / "tiny.gguf")
    return SimpleNamespace(model=model, tokenizer=tokenizer, path=path)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("RETRIEVAL_HEADS_CACHE", str(root))
    return root


def leftovers(root: Path) -> list[str]:
    """Everything under the cache root except the (possibly created) empty ``gguf/`` parent."""
    if not root.exists():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p != root / "gguf")


def temporaries(root: Path) -> list[Path]:
    return sorted((root / "gguf").glob(".tmp-*")) if (root / "gguf").exists() else []


# ---- a good file ----------------------------------------------------------------------------


def test_gguf_loads_with_the_logits_and_tokenizer_it_was_written_from(source, cache):
    model = load_model(source.path, device="cpu")

    folder = rgguf.converted_dir(rgguf.sha256_file(source.path))
    info = json.loads((folder / rgguf.SOURCE_FILE).read_text())
    assert info["sha256"] == rgguf.sha256_file(source.path) and info["file"] == "tiny.gguf"
    assert (folder / "model.safetensors").is_file()
    assert [p.name for p in (cache / "gguf").iterdir()] == [folder.name]  # no temporary left

    cfg = model.hf_model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 4, 2)
    assert not cfg.tie_word_embeddings  # the file has output.weight

    ids = torch.tensor([source.tokenizer(SENTENCES[0]).input_ids])
    with torch.no_grad():
        want = source.model(ids).logits
        got = model.logits(ids)
    assert got.shape == want.shape == (1, ids.shape[1], len(source.tokenizer))
    diff = (got - want).abs().max().item()
    assert diff < ATOL, f"logits differ by {diff} (q/k permutation or a tensor name is off)"

    for text in TEXTS:
        want_ids = source.tokenizer(text).input_ids
        assert model.tokenizer(text, add_special_tokens=False).input_ids == want_ids, text
        assert model.tokenizer.decode(want_ids) == text
        # the bridge's tokens: the file's BOS, then the same ids
        assert model.to_tokens(text)[0].tolist() == [source.tokenizer.bos_token_id, *want_ids]


def test_conversion_is_cached_by_content(source, cache, tmp_path, monkeypatch):
    first = rgguf.convert(source.path)
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*")}

    def refuse(src, out):
        raise AssertionError(f"converted {src} again")

    monkeypatch.setattr(rgguf, "_convert_into", refuse)
    assert rgguf.convert(source.path) == first
    # the key is the bytes, not the name
    renamed = shutil.copy(source.path, tmp_path / "other-name.gguf")
    assert rgguf.convert(renamed) == first
    model = load_model(renamed, device="cpu")  # load_model goes through the same cache
    assert model.hf_model.config.vocab_size == len(source.tokenizer)
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == stamps
    assert temporaries(cache) == []


# ---- bad files ------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.5, 0.004], ids=["tensor-data", "metadata"])
def test_truncated_file_is_a_clear_error_and_leaves_nothing(source, cache, tmp_path, keep):
    data = source.path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as err:
        load_model(cut, device="cpu")
    assert str(cut) in str(err.value) and "download it again" in str(err.value)
    assert leftovers(cache) == []


def test_foreign_file_named_gguf_is_refused_before_anything_is_written(cache, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b'{"__metadata__": {}}' + bytes(1000))  # e.g. a safetensors header
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(fake, device="cpu")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        rgguf.convert(fake)
    assert leftovers(cache) == []


def test_missing_gguf_package_gives_the_install_hint(source, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(ModelLoadError, match="pip install gguf"):
        rgguf.convert(source.path)
    assert leftovers(cache) == []


def test_architecture_transformers_cannot_read_is_a_clear_error(source, cache, tmp_path):
    odd = write_llama_gguf(
        source.model, source.tokenizer, tmp_path / "odd.gguf", architecture="zzz"
    )
    with pytest.raises(ModelLoadError, match="cannot read this GGUF architecture") as err:
        rgguf.convert(odd)
    assert "zzz" in str(err.value)
    assert leftovers(cache) == []


# ---- a killed conversion --------------------------------------------------------------------

# Converts, then stops between writing the temporary folder and renaming it into place.
SLOW_CONVERT = """
import sys, time
import retrieval_heads.gguf as g
real = g._convert_into
def held(src, out):
    info = real(src, out)
    print("converted", out, flush=True)
    time.sleep(600)
    return info
g._convert_into = held
g.convert(sys.argv[1])
"""


def test_kill_during_conversion_leaves_no_folder_and_is_swept(source, cache, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERT, str(source.path)],
        env=subprocess_env(RETRIEVAL_HEADS_CACHE=str(cache)),
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "stderr").open("w"),
        text=True,
    )
    line = ""
    try:
        deadline = time.monotonic() + 240
        while not line and proc.poll() is None and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 1)[0]:
                line = proc.stdout.readline()
        assert line.startswith("converted"), (tmp_path / "stderr").read_text()[-2000:]
    finally:
        proc.kill()
        proc.wait()  # reaped, so its pid is gone for the sweep's liveness check

    target = rgguf.converted_dir(rgguf.sha256_file(source.path))
    assert not target.exists()
    assert rgguf.cached(rgguf.sha256_file(source.path)) is None
    (stale,) = temporaries(cache)
    assert f"-{proc.pid}-" in stale.name and (stale / "model.safetensors").is_file()
    # a temporary whose process is alive (this one) is someone's conversion in flight: kept
    alive = cache / "gguf" / f".tmp-000000000000-{os.getpid()}-x"
    alive.mkdir()

    assert rgguf.convert(source.path) == target
    assert (target / rgguf.SOURCE_FILE).is_file()
    assert not stale.exists()
    assert temporaries(cache) == [alive]


# ---- a GGUF split into chunk packages -------------------------------------------------------


@pytest.fixture
def chunks(source, tmp_path, monkeypatch):
    """The test GGUF cut into three ``.partNN`` files that ``registry.part_files`` returns."""
    data = source.path.read_bytes()
    third = len(data) // 3
    paths = []
    for i, piece in enumerate([data[:third], data[third : 2 * third], data[2 * third :]]):
        path = tmp_path / "parts" / f"tiny.gguf.part{i:02d}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(piece)
        paths.append(path)
    monkeypatch.setattr(registry, "part_files", lambda name, src: paths)
    entry = PackagedGguf(dist="x-sums", file="tiny.gguf", install="-", parts=("a", "b", "c"))
    return SimpleNamespace(entry=entry, data=data, sha=hashlib.sha256(data).hexdigest())


def test_assemble_writes_the_concatenation_when_the_sha_matches(chunks, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    path = registry.assemble("tiny", chunks.entry, out, chunks.sha)
    assert path == out / "tiny.gguf"
    assert path.read_bytes() == chunks.data
    assert sorted(p.name for p in out.iterdir()) == ["tiny.gguf"]


def test_assemble_refuses_a_mismatch_and_writes_nothing(chunks, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(ModelLoadError, match="do not add up to the shipped SHA-256"):
        registry.assemble("tiny", chunks.entry, out, wrong)
    assert list(out.iterdir()) == []


def test_a_killed_assembly_is_swept(tmp_path):
    """What a SIGKILL during a split model's assembly leaves (``.assemble-<pid>-*``, a whole
    GGUF file in it) goes at the next sweep; a live process's folder stays."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f".assemble-{dead.pid}-x1y2"
    left.mkdir()
    (left / "model.gguf").write_bytes(b"GGUF" + bytes(100))
    alive = tmp_path / f".assemble-{os.getpid()}-a1b2"
    alive.mkdir()
    rgguf.sweep_stale(tmp_path, ".assemble-*")
    assert not left.exists() and alive.exists()
