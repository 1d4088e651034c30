"""Loading a model as a :class:`~retrieval_heads.model.hooked.HookedModel`: :func:`load_model`.

It owns resolving what the user named (a registry name, a ``.gguf`` file, a local HF-format
folder, a hub id or a loaded ``transformers`` model), every check made before and after
TransformerLens boots the bridge (dtype, device and multi-device placement, architecture and
layout, config, tokenizer and vocabulary, weights, ``n_ctx``), the plain-words
:class:`~retrieval_heads.registry.ModelLoadError` each failure raises, and the list of
architectures TransformerLens supports.

It never runs a model: past loading, everything is :class:`HookedModel`'s.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from retrieval_heads import gguf, registry
from retrieval_heads.model.hooked import HookedModel
from retrieval_heads.registry import ModelLoadError

__all__ = ["DEVICE_MAP_DIRECTIVES", "load_model", "supported_architectures"]


def supported_architectures() -> list[str]:
    """HF architecture class names TransformerLens' bridge supports (e.g. ``LlamaForCausalLM``)."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return sorted(SUPPORTED_ARCHITECTURES)


_LIST_HINT = (
    'list the supported ones with `python -c "from retrieval_heads.model import '
    'supported_architectures as s; print(s())"`'
)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    try:
        return names[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16") from None


def _check_architecture(hf_config: Any, where: str) -> str:
    from transformer_lens.model_bridge.sources._hf_format import (
        determine_architecture_from_hf_config,
    )

    try:
        return determine_architecture_from_hf_config(hf_config)
    except ValueError:
        archs = list(getattr(hf_config, "architectures", None) or [])
        arch = archs[0] if archs else getattr(hf_config, "model_type", "unknown")
        raise ModelLoadError(
            f"{where}: TransformerLens does not support architecture {arch!r}; {_LIST_HINT}"
        ) from None


def _check_layout(hf_config: Any, where: str) -> None:
    """Layouts an architecture's TransformerLens adapter reads wrongly: refused, not mis-split."""
    if getattr(hf_config, "model_type", None) == "falcon" and getattr(
        hf_config, "new_decoder_architecture", False
    ):
        raise ModelLoadError(
            f"{where}: Falcon's new_decoder_architecture layout (Falcon-40B and -180B: grouped "
            "query/key/value blocks) is not one TransformerLens' Falcon adapter can split, so "
            "it is not supported; the Falcon-7B/RW layout is"
        )


def _check_vocab(tokenizer: Any, bridge: Any, where: str) -> None:
    """A tokenizer whose vocabulary is larger than the embedding would index past it: another
    model's tokenizer. (Added tokens past the embedding, as GGUF conversion can leave, are
    refused only where a trial holds one: ``haystack.check_trial_tokens``.)"""
    rows = int(bridge.cfg.d_vocab)
    size = getattr(tokenizer, "vocab_size", None) if tokenizer is not None else None
    if isinstance(size, int) and size > rows:
        raise ModelLoadError(
            f"the tokenizer of {where} has {size} tokens but the model's embedding has {rows} "
            f"rows, so token ids from {rows} on have no embedding: it is not this model's "
            "tokenizer; put the model's own tokenizer files in the folder"
        )


def _mismatch_text(path: Path, hf_config: Any) -> str:
    """Which weights do not have the shape ``config.json`` gives them (the first two)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            expected = AutoModelForCausalLM.from_config(hf_config).state_dict()
        found: dict[str, list[int]] = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                found.update({k: list(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
    except Exception:  # the mismatch stands; naming it is a courtesy
        return "some weights do not have the shapes config.json gives them"
    wrong = [
        f"{k} is {found[k]} in the weights, {list(v.shape)} by the config"
        for k, v in expected.items()
        if k in found and found[k] != list(v.shape)
    ]
    more = f" (and {len(wrong) - 2} more)" if len(wrong) > 2 else ""
    return "; ".join(wrong[:2]) + more if wrong else "the shapes do not match"


def _load_config(source: str, trust_remote_code: bool, *, local: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise ModelLoadError(
                f"{source} ships its own model code: pass trust_remote_code=True if you trust it"
            ) from None
        if local:
            try:
                model_type = json.loads((Path(source) / "config.json").read_text())["model_type"]
            except (OSError, ValueError, KeyError):
                model_type = "?"
            raise ModelLoadError(
                f"{source}/config.json has model_type {model_type!r}, which this transformers "
                "does not know: upgrade transformers, or pass trust_remote_code=True if the "
                "model ships its own code"
            ) from None
        raise ModelLoadError(f"cannot read the config of {source!r}: {text}") from None
    except OSError as exc:
        if local:
            raise ModelLoadError(f"cannot read {source}/config.json: {exc}") from None
        from huggingface_hub import constants

        # A bare name (no "org/") is more likely a mistyped registry name than a hub id.
        known = "" if "/" in source else f"; registered names: {', '.join(registry.names())}"
        if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            raise ModelLoadError(
                f"model {source!r} is not in the local Hugging Face cache and the hub is "
                "offline (HF_HUB_OFFLINE): download it once with network access, or pass a "
                f"local directory{known}"
            ) from None
        raise ModelLoadError(
            f"cannot fetch {source!r} from the Hugging Face hub ({type(exc).__name__}): check "
            f"the name, your network and, for gated models, `huggingface-cli login`{known}"
        ) from None


def _load_local_tokenizer(path: Path, trust_remote_code: bool) -> Any:
    """The tokenizer saved in ``path``.

    A tokenizer saved as a generic fast tokenizer is loaded as exactly that:
    ``AutoTokenizer`` would swap in a model-specific class for some model types (Qwen2 among
    them, in transformers 5) and mis-tokenize a custom vocabulary.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = path / "tokenizer_config.json"
    try:
        tok_class = json.loads(config_file.read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        tok_class = None
    try:
        if (
            tok_class in ("PreTrainedTokenizerFast", "TokenizersBackend")
            and (path / "tokenizer.json").is_file()
        ):
            return PreTrainedTokenizerFast.from_pretrained(str(path))
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(
            f"no usable tokenizer in {path} ({type(exc).__name__}): save one there with "
            "tokenizer.save_pretrained(DIR), or pass tokenizer="
        ) from None


def _tokenizer_with_bos(tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` that prepends BOS itself, as TransformerLens expects.

    Given a tokenizer that does not, TransformerLens re-loads it from ``name_or_path`` with
    ``AutoTokenizer(add_bos_token=True)``, which loses a tokenizer that was built in memory
    and, for some model types, swaps in another tokenizer class. Setting the flag on a
    copy avoids the reload.
    """
    if tokenizer is None or getattr(tokenizer, "bos_token", None) is None:
        return tokenizer
    patched = copy.deepcopy(tokenizer)
    # TransformerLens reads init_kwargs["name_or_path"] unconditionally (KeyError for a
    # tokenizer built in memory).
    patched.init_kwargs.setdefault("name_or_path", getattr(tokenizer, "name_or_path", ""))
    if getattr(tokenizer, "add_bos_token", False):
        return patched
    try:
        patched.add_bos_token = True
        if patched.encode("a")[:1] == [patched.bos_token_id]:
            return patched
    except Exception:  # a tokenizer class without a settable flag: leave it to TransformerLens
        pass
    return tokenizer


def _check_device(device: str | torch.device | None) -> None:
    """Refuse a device torch does not know, or one this machine does not have, in plain words."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(
            f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {str(device)!r} asked for, but CUDA is not available here "
                "(torch.cuda.is_available() is False): use device 'cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {str(device)!r} asked for, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {str(device)!r} asked for, but MPS is not available here")


def _is_weights_error(exc: BaseException) -> bool:
    """A weights file that cannot be deserialised (corrupt, truncated, or a pickle that
    ``torch.load(weights_only=True)`` refuses because it would run code)."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        return True
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors ships with transformers
        return False
    return isinstance(exc, SafetensorError)


def _weights_error_text(exc: BaseException) -> str:
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        return (
            "the checkpoint is a pickle that torch.load(weights_only=True) refuses (it holds "
            "more than tensors and could run code when loaded); get safetensors weights from "
            "a source you trust"
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"the weights file is corrupt or truncated ({first}); download it again"


def _looks_like_path(text: str) -> bool:
    if text.startswith(("/", "./", "../", "~", "\\")) or text.count("/") > 1:
        return True
    return os.sep != "/" and os.sep in text


def _check_n_ctx(bridge: Any, n_ctx: int | None) -> None:
    if n_ctx is None:
        return
    if n_ctx <= 0:
        raise ModelLoadError(f"n_ctx must be positive, got {n_ctx}")
    model_ctx = int(bridge.cfg.n_ctx)
    if n_ctx > model_ctx:
        if getattr(bridge.cfg, "positional_embedding_type", None) in ("standard", "learned"):
            raise ModelLoadError(
                f"n_ctx={n_ctx} exceeds this model's {model_ctx} learned positions: "
                f"use n_ctx <= {model_ctx}"
            )
        warnings.warn(
            f"n_ctx={n_ctx} is beyond the model's configured context ({model_ctx}); "
            "results past it may be unreliable",
            stacklevel=3,
        )


DEVICE_MAP_DIRECTIVES = ("auto", "balanced", "balanced_low_0", "sequential")


def _check_placement(
    device: Any, device_map: Any, n_devices: int | None, max_memory: dict | None
) -> dict[str, Any]:
    """Check the multi-device options; return the ones to pass on besides ``device_map``."""
    if isinstance(device_map, str) and device_map not in DEVICE_MAP_DIRECTIVES:
        raise ModelLoadError(
            f"unknown device map {device_map!r}: use {', '.join(DEVICE_MAP_DIRECTIVES)}, or a "
            "{module name: device} mapping"
        )
    if device_map is not None and not isinstance(device_map, (str, dict)):
        raise ModelLoadError(f"device_map must be a string or a mapping, got {device_map!r}")
    if isinstance(device_map, dict):
        for module, target in device_map.items():
            good = isinstance(target, (int, str)) and not isinstance(target, bool)
            if not isinstance(module, str) or not good:
                raise ModelLoadError(
                    f"device map entry {module!r}: {target!r} should map a module name to a "
                    "device (a GPU index, 'cuda:N', 'cpu' or 'disk')"
                )
    if n_devices is not None:
        if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
            raise ModelLoadError(f"n_devices must be a positive integer, got {n_devices!r}")
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_devices > 1 and have < n_devices:
            raise ModelLoadError(
                f"n_devices={n_devices} asked for, but this machine has {have} CUDA device(s): "
                f"use at most {have}, or device_map"
            )
    split = device_map is not None or (n_devices or 1) > 1
    if device is not None and split:
        raise ModelLoadError("pass device, or device_map / n_devices to split the model; not both")
    if max_memory is not None:
        if not isinstance(max_memory, dict) or not max_memory:
            raise ModelLoadError(f"max_memory must be a non-empty mapping, got {max_memory!r}")
        if not split:
            raise ModelLoadError(
                "max_memory caps devices of a split model: pass device_map or n_devices with it"
            )
    out: dict[str, Any] = {}
    if n_devices is not None and n_devices > 1:
        out["n_devices"] = n_devices
    if max_memory is not None:
        out["max_memory"] = max_memory
    return out


def load_model(
    name_or_path: str | os.PathLike | Any,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    n_ctx: int | None = None,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
    n_devices: int | None = None,
    max_memory: dict | None = None,
) -> HookedModel:
    """Load a model as a :class:`HookedModel`.

    ``name_or_path`` is one of:

    * a registry name (``"tiny"``, ``"tiny-short"``, and the real ``"smollm2-135m-instruct"``
      and ``"gemma-3-270m"`` once ``make real-models`` installed them; see
      ``retrieval_heads.registry``);
    * a ``.gguf`` file, converted once into a cached HF-format folder
      (:func:`retrieval_heads.gguf.convert`, keyed by the file's SHA-256);
    * a local Hugging Face-format directory (with ``config.json``, weights and a tokenizer),
      loaded without any network access;
    * a hub id (``"org/model"``), loaded through ``TransformerBridge.boot_transformers``
      (uses the local cache when ``HF_HUB_OFFLINE=1``);
    * an already-loaded ``transformers`` causal-LM model, with ``tokenizer=``. The bridge
      rewires that model in place (its submodules become hooked wrappers).

    ``device`` defaults to CUDA when available; ``dtype`` to float32 (for a loaded model:
    its own); ``n_ctx`` caps the sequence length ``prefill``/``step`` accept (default: the
    model's context); ``trust_remote_code`` stays off unless asked.

    One model over several GPUs (exclusive with ``device``), passed to TransformerLens'
    ``boot_transformers``, which hands them to ``from_pretrained`` (accelerate dispatch):
    ``device_map`` is Hugging Face's (``"auto"``, ``"balanced"``, ``"balanced_low_0"``,
    ``"sequential"`` or ``{module name: device}``); ``n_devices=N`` splits the layers evenly
    over the first N GPUs (``"balanced"``); ``max_memory`` caps each device
    (``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``). A model spread over several devices
    prefills through the bridge in chunks (the SDPA twin has no dispatch hooks; see
    :attr:`HookedModel.fast_prefill_reason`). Failures raise :class:`ModelLoadError`.
    """
    from transformer_lens.model_bridge import TransformerBridge

    torch_dtype = _resolve_dtype(dtype)
    placement = _check_placement(device, device_map, n_devices, max_memory)
    _check_device(device)

    if isinstance(name_or_path, torch.nn.Module):
        if placement:
            raise ModelLoadError(
                "device_map, n_devices and max_memory apply when loading from a name or a "
                "directory; for a loaded model pass device_map to from_pretrained instead"
            )
        return _load_object(name_or_path, device, torch_dtype, n_ctx, tokenizer)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelLoadError(
            f"cannot load a {type(name_or_path).__name__}: pass a model name, a directory "
            "or a transformers model"
        )

    source: str | Path = os.fspath(name_or_path)
    name, world = str(source), None
    entry = registry.lookup(source) if isinstance(source, str) else None
    if entry is not None:
        world = entry.world
        source = registry.resolve(name)
    elif gguf.is_gguf(source):
        source = gguf.convert(source)  # cached after the first call

    boot_kwargs: dict[str, Any] = {
        "device": device,
        "device_map": device_map,
        "dtype": torch_dtype or torch.float32,
        "trust_remote_code": trust_remote_code,
        **placement,
    }
    path = Path(source).expanduser()
    if isinstance(source, Path) or path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is not a directory: pass an HF-format model directory")
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} has no config.json: point at an HF-format model directory "
                "(what save_pretrained writes)"
            )
        hf_config = _load_config(str(path), trust_remote_code, local=True)
        _check_architecture(hf_config, str(path))
        _check_layout(hf_config, str(path))
        if tokenizer is None:
            tokenizer = _load_local_tokenizer(path, trust_remote_code)
        boot_source = str(path)
    elif _looks_like_path(str(source)):
        raise ModelLoadError(f"no such directory: {source}")
    else:
        hf_config = _load_config(str(source), trust_remote_code, local=False)
        _check_architecture(hf_config, str(source))
        _check_layout(hf_config, str(source))
        boot_source = str(source)

    tokenizer = _tokenizer_with_bos(tokenizer)
    try:
        bridge = TransformerBridge.boot_transformers(
            boot_source, tokenizer=tokenizer, **boot_kwargs
        )
    except OSError as exc:
        raise ModelLoadError(f"cannot load {boot_source}: {exc}") from None
    except Exception as exc:
        if "ignore_mismatched_sizes" in str(exc) and path.is_dir():
            raise ModelLoadError(
                f"the weights of {path} do not fit its config.json: "
                f"{_mismatch_text(path, hf_config)}; the config and the weights come from "
                "different models"
            ) from None
        if not _is_weights_error(exc):
            raise
        raise ModelLoadError(
            f"cannot load the weights of {boot_source}: {_weights_error_text(exc)}"
        ) from None
    _check_vocab(tokenizer, bridge, boot_source)
    _check_n_ctx(bridge, n_ctx)
    return HookedModel(bridge, n_ctx=n_ctx, name=name, world=world)


def _load_object(
    hf_model: Any,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    n_ctx: int | None,
    tokenizer: Any,
) -> HookedModel:
    from transformer_lens.model_bridge import TransformerBridge

    config = getattr(hf_model, "config", None)
    if config is None:
        raise ModelLoadError(
            f"a {type(hf_model).__name__} is not a transformers model: pass a "
            "PreTrainedModel (e.g. from AutoModelForCausalLM.from_pretrained)"
        )
    name = getattr(config, "_name_or_path", "") or type(hf_model).__name__
    _check_architecture(config, name)
    _check_layout(config, name)
    if tokenizer is None:
        if name and Path(name).is_dir():
            tokenizer = _load_local_tokenizer(Path(name), False)
        else:
            raise ModelLoadError("pass tokenizer= with a loaded model")
    tokenizer = _tokenizer_with_bos(tokenizer)
    if dtype is not None:
        hf_model.to(dtype)
    if device is not None:
        hf_model.to(device)
    hf_model.eval()
    param = next(hf_model.parameters())
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=param.device, dtype=param.dtype
    )
    _check_vocab(tokenizer, bridge, name)
    _check_n_ctx(bridge, n_ctx)
    return HookedModel(bridge, n_ctx=n_ctx, name=name)
