"""GGUF files as model inputs: converted once into a cached Hugging Face folder, then loaded as one.

``transformers`` reads a GGUF file (with the ``gguf`` package) and dequantises it to float, but a
model loaded that way refuses ``save_pretrained``. So :func:`convert` builds the same class from
the file's config, loads the dequantised state dict into it and saves that (safetensors) with the
tokenizer, into ``CACHE/gguf/<sha256 of the file>/``. The next call with the same bytes finds the
folder and converts nothing.

The folder appears whole or not at all: the conversion writes a temporary sibling and renames it
into place, so a failure or a kill leaves no half-written model where a later call would look.
Temporaries of dead processes are swept on the next conversion.

Torch-free at import, like :mod:`retrieval_heads.registry`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from retrieval_heads.registry import ModelLoadError

MAGIC = b"GGUF"
INSTALL_HINT = "pip install gguf (or: pip install 'retrieval-heads-lens[real-models]')"
SOURCE_FILE = "gguf_source.json"  # provenance of a converted folder: which file, which versions


def cache_root() -> Path:
    """Where converted and assembled models are kept: ``$RETRIEVAL_HEADS_CACHE`` or
    ``~/.cache/retrieval-heads``."""
    env = os.environ.get("RETRIEVAL_HEADS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "retrieval-heads"


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a GGUF file (by its extension)."""
    return str(path).lower().endswith(".gguf")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError(f"no such GGUF file: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise ModelLoadError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes): pass a "
            ".gguf model file, or an HF-format directory"
        )


def sweep_stale(parent: Path, pattern: str = ".tmp-*") -> None:
    """Remove temporaries (``<prefix>-<pid>-<random>``) whose process is gone (killed, crashed)."""
    for tmp in parent.glob(pattern):
        try:
            pid = int(tmp.name.split("-")[-2])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def converted_dir(sha256: str) -> Path:
    """The cache folder of the GGUF file with this SHA-256 (it may not exist yet)."""
    return cache_root() / "gguf" / sha256[:32]


def cached(sha256: str) -> Path | None:
    """The converted folder for these bytes, when a finished conversion is in the cache."""
    folder = converted_dir(sha256)
    return folder if (folder / SOURCE_FILE).is_file() else None


def convert(path: str | os.PathLike, *, sha256: str | None = None) -> Path:
    """The HF-format folder of the GGUF file ``path``, converting it on the first call.

    ``sha256`` may be given when the caller already knows it (a registry entry that checked it).
    Raises :class:`ModelLoadError` for a missing ``gguf`` package, a file that is not GGUF or is
    truncated, or an architecture that ``transformers`` cannot read from GGUF.
    """
    src = Path(path).expanduser()
    _check_file(src)
    digest = sha256 or sha256_file(src)
    done = cached(digest)
    if done is not None:
        return done
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            f"reading a .gguf file needs the gguf package: {INSTALL_HINT}"
        ) from None

    target = converted_dir(digest)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{digest[:12]}-{os.getpid()}-", dir=target.parent))
    try:
        info = _convert_into(src, tmp)
        info.update(file=src.name, sha256=digest, size=src.stat().st_size)
        (tmp / SOURCE_FILE).write_text(json.dumps(info, indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as shareable as its parent
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same conversion first
            if cached(digest) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _read_error(src: Path, exc: BaseException) -> ModelLoadError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "architecture" in text and "not supported" in text:  # transformers' own wording
        return ModelLoadError(
            f"{src}: transformers cannot read this GGUF architecture ({text}); convert the "
            "original model to an HF-format folder instead"
        )
    return ModelLoadError(
        f"{src} is truncated or corrupt ({type(exc).__name__}: {text}): download it again"
    )


def _convert_into(src: Path, out: Path) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(src.parent), src.name
    # The GGUF reader fails on a damaged file with whatever its parser hit first (ValueError,
    # IndexError, struct.error, a numpy error...): any of them means the same to the user.
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as exc:
        raise _read_error(src, exc) from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from retrieval_heads.model.loading import _check_architecture

    # A GGUF config names no class; the one AutoModelForCausalLM would build is what the bridge
    # sees, so check that before dequantising anything.
    if not getattr(config, "architectures", None):
        causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        config.architectures = [causal_lm] if causal_lm else [config.model_type]
    _check_architecture(config, str(src))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:
        raise _read_error(src, exc) from None
    # A GGUF-loaded model refuses save_pretrained; the same class built from its config does not.
    config = loaded.config
    if hasattr(config, "quantization_config"):  # dequantised: the folder is a plain model
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    import gguf

    return {
        "architecture": model.config.architectures,
        "transformers": transformers.__version__,
        "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "dtype": "float32 (dequantised)",
    }


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
