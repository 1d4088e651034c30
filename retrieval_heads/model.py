"""The hooked-model wrapper: TransformerLens' ``TransformerBridge`` plus fast, KV-cached decoding.

Why two forward paths
---------------------
The bridge forces eager attention and re-implements it so that every TransformerLens hook
(``hook_q`` ... ``hook_pattern`` ... ``hook_z``) fires. Eager attention materialises a
``[query, key]`` matrix per head, which makes a long prompt slow and memory-hungry (an 8K
prompt on a 4-layer toy: ~47 s and ~4.9 GB, against ~4.7 s and ~0.64 GB for plain SDPA).

A KV cache filled by one path continues exactly in the other, so:

* ``prefill(ids)`` with no hooks runs a *twin* of the Hugging Face model that uses SDPA
  attention and shares every parameter tensor with the bridged model (no copy), and returns
  its ``DynamicCache``;
* ``step(state, token)`` runs one token through the bridge with that cache, so every hook
  fires with query length 1 and O(context) memory;
* ``step_rows(state, token, sink)`` runs one token through the twin instead, with an attention
  function (``_rows_attention``) that hands each layer's attention row of the new query to
  ``sink``: what the scorer needs, at about the cost of plain decoding (no bridge, and no
  copy of the KV cache per query head as in eager attention);
* ``prefill(ids, fwd_hooks=...)``, ``attention_rows`` and ``head_outputs`` run the bridge in
  chunks of ``chunk_size`` tokens over the cache, so hooks fire with memory bounded by
  chunk x context.

The twin is checked against the bridge on a short probe when the model is loaded; if they
disagree, or the weights are later replaced (``enable_compatibility_mode`` folds weights
into new tensors), or the model is spread over several devices, the fast path is switched
off and prefill falls back to the chunked bridge (same numbers, slower). ``step_rows`` is
checked the same way (its rows and logits against the bridge's) the first time it is asked
for; where it cannot run (``lean_decode`` is False), callers use ``step`` with pattern hooks.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from retrieval_heads import gguf, registry
from retrieval_heads.heads import Head
from retrieval_heads.registry import ModelLoadError

__all__ = [
    "ContextLengthError",
    "DecodeState",
    "HookedModel",
    "ModelLoadError",
    "load_model",
    "supported_architectures",
]

log = logging.getLogger(__name__)

# A TransformerLens forward hook: fn(activation, hook=HookPoint) -> activation | None.
HookFn = Callable[..., Any]
FwdHooks = Iterable[tuple[str | Callable[[str], bool], HookFn]]
# What step_rows hands each layer's attention row of the new query to: sink(layer, row).
RowSink = Callable[[int, Float[Tensor, "batch head key"]], None]

DEFAULT_CHUNK_SIZE = 512
# Chosen positions closer than this are run through the bridge as one segment.
_SEGMENT_GAP = 32
# Fast-path chunk once the cache is non-empty (SDPA then needs an explicit [q, k] bool mask).
_FAST_CHUNK_SIZE = 4096


class ContextLengthError(ValueError):
    """A sequence is longer than the model's ``n_ctx``."""


@dataclass
class DecodeState:
    """Where an incremental decode stands.

    ``cache`` is the Hugging Face KV cache (a ``transformers.DynamicCache``) holding keys and
    values for positions ``0 .. position - 1``; ``position`` is the index the next token will
    take; ``last_logits`` are the logits predicting that next token. ``HookedModel.step``
    updates all three in place.
    """

    cache: Any
    position: int
    last_logits: Float[Tensor, "batch vocab"]


def supported_architectures() -> list[str]:
    """HF architecture class names TransformerLens' bridge supports (e.g. ``LlamaForCausalLM``)."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return sorted(SUPPORTED_ARCHITECTURES)


_LIST_HINT = (
    'list the supported ones with `python -c "from retrieval_heads.model import '
    'supported_architectures as s; print(s())"`'
)


# --------------------------------------------------------------------------------------------
# The fast twin


class _FastPathUnavailable(Exception):
    pass


def _normalise(name: str) -> str:
    """Strip the bridge's wrapper segments: ``a._original_component.b`` -> ``a.b``."""
    name = name.replace("._original_component", "")
    if name.startswith("_original_component"):
        name = name[len("_original_component") :].lstrip(".")
    return name


def _build_sdpa_twin(hf_model: torch.nn.Module) -> tuple[torch.nn.Module, list[tuple]]:
    """An SDPA copy of ``hf_model``'s architecture whose tensors ARE ``hf_model``'s tensors.

    The bridge replaced ``hf_model``'s submodules in place by wrappers, but the original
    modules (and their parameters) live on inside them as ``_original_component``. The twin
    is built on the meta device and each of its parameters, buffers and tensor attributes is
    pointed at the original module's, so nothing is copied. Returns the twin and the list
    of ties (to check later that the weights were not replaced).
    """
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    originals: dict[str, torch.nn.Module] = {}
    for name, module in hf_model.named_modules(remove_duplicate=False):
        if isinstance(module, GeneralizedComponent):
            continue
        originals.setdefault(_normalise(name), module)

    config = copy.deepcopy(hf_model.config)
    config.output_attentions = False
    dtype = next(hf_model.parameters()).dtype
    try:
        with torch.device("meta"):
            twin = type(hf_model)._from_config(config, attn_implementation="sdpa", dtype=dtype)
    except Exception as exc:  # architectures without an SDPA kernel, exotic constructors
        raise _FastPathUnavailable(f"cannot build an SDPA twin: {exc}") from exc

    ties: list[tuple] = []
    for name, module in twin.named_modules(remove_duplicate=False):
        own = [k for k, v in module._parameters.items() if v is not None]
        own += [k for k, v in module._buffers.items() if v is not None]
        meta_attrs = [
            k for k, v in vars(module).items() if isinstance(v, Tensor) and v.device.type == "meta"
        ]
        if not own and not meta_attrs:
            continue
        orig = originals.get(name)
        if orig is None or type(orig) is not type(module):
            raise _FastPathUnavailable(f"no original module for twin module {name!r}")
        for store in ("_parameters", "_buffers"):
            for key, value in getattr(module, store).items():
                if value is None:
                    continue
                source = getattr(orig, store).get(key)
                if source is None or source.shape != value.shape:
                    raise _FastPathUnavailable(f"cannot tie {name}.{key}")
                getattr(module, store)[key] = source
                ties.append((orig, module, store, key))
        for key in meta_attrs:
            source = vars(orig).get(key)
            if not isinstance(source, Tensor):
                raise _FastPathUnavailable(f"cannot tie tensor attribute {name}.{key}")
            setattr(module, key, source)
    leftovers = [
        n for n, t in [*twin.named_parameters(), *twin.named_buffers()] if t.device.type == "meta"
    ]
    if leftovers:
        raise _FastPathUnavailable(f"twin tensors left on meta: {leftovers[:3]}")
    twin.eval()
    return twin, ties


def _forward_accepts(module: torch.nn.Module, arg: str) -> bool:
    import inspect

    try:
        return arg in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _segments(positions: Sequence[int], gap: int) -> list[tuple[int, int]]:
    """Group sorted positions into ``[start, end)`` runs, merging runs closer than ``gap``."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and p - runs[-1][1] < gap:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


# --------------------------------------------------------------------------------------------
# The lean decode step: attention rows without the bridge

# The name the twin's config switches to for a lean step (registered with transformers'
# attention and mask interfaces on first use).
_ROWS_ATTENTION = "retrieval_heads_rows"
# The sink of the lean step now running. A context variable, not a forward kwarg: it reaches
# the attention function whatever a model's forward does with extra kwargs.
_ROW_SINK: contextvars.ContextVar[RowSink | None] = contextvars.ContextVar(
    "retrieval_heads_row_sink", default=None
)


def _rows_attention(
    module: torch.nn.Module,
    query: Float[Tensor, "batch head 1 d"],
    key: Float[Tensor, "batch kv_head key d"],
    value: Float[Tensor, "batch kv_head key d_v"],
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Float[Tensor, "batch 1 head d_v"], Float[Tensor, "batch head 1 key"]]:
    """Eager attention for one query, grouped by kv head, that hands its probabilities to the
    current row sink.

    Same arithmetic as transformers' eager attention (scale, softcap, mask, float32 softmax,
    probabilities @ values), but the query heads of a group are laid out against their shared
    kv head (``[batch, kv_head, group, d]``) instead of copying the keys and values to every
    query head (``repeat_kv``). The mask already holds causal and sliding-window masking
    (``sliding_window`` is only informative here); the cache of a sliding layer holds just
    the window, so such a row covers the last ``key`` positions only.
    """
    sink = _ROW_SINK.get()
    batch, n_heads, q_len, d = query.shape
    if sink is None or q_len != 1:
        raise RuntimeError("the lean attention runs one query inside HookedModel.step_rows")
    if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError("attention sinks and position biases are not supported")
    n_kv, n_keys = key.shape[1], key.shape[2]
    group = n_heads // n_kv
    q = query.reshape(batch, n_kv, group, d)  # [batch, kv_head, group, d]
    scale = d**-0.5 if scaling is None else scaling
    scores = torch.matmul(q, key.transpose(-1, -2)) * scale  # [batch, kv_head, group, key]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[:, :, -1, :n_keys]  # [batch, 1 or head, key]
        # Shared by all heads: broadcast; per head: the same grouping as the query.
        mask = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(batch, n_kv, group, -1)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    # float32 softmax, back to the model's dtype, as eager attention does
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value)  # [batch, kv_head, group, d_v]
    rows = probs.reshape(batch, n_heads, n_keys)  # query head h = kv_head * group + g
    sink(module.layer_idx, rows)
    return out.reshape(batch, 1, n_heads, -1), rows[:, :, None]


_rows_registered = False


def _register_rows_attention() -> None:
    """Make ``_ROWS_ATTENTION`` a valid ``config._attn_implementation``: the attention
    function, and SDPA's mask builder (a bool mask, or none for full attention at query length
    1; an unknown name would get no mask at all, losing the sliding windows)."""
    global _rows_registered
    if _rows_registered:
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(_ROWS_ATTENTION, _rows_attention)
    AttentionMaskInterface.register(_ROWS_ATTENTION, sdpa_mask)
    _rows_registered = True


# --------------------------------------------------------------------------------------------
# HookedModel


class HookedModel:
    """A TransformerLens ``TransformerBridge`` with KV-cached decoding and hook helpers.

    Build one with :func:`load_model`. Public attributes: ``bridge`` (the
    ``TransformerBridge``), ``hf_model`` (the wrapped Hugging Face model; note that the
    bridge replaced its submodules by hooked wrappers in place), ``tokenizer``,
    ``chunk_size`` (tokens per bridge forward when hooks must fire over a long prompt),
    ``position_offset`` (absolute position of the first query of the forward pass now
    running, for hooks that need absolute positions).

    Sequences are ``[batch, pos]`` token ids without padding (all rows the same length).
    """

    def __init__(
        self,
        bridge: Any,
        *,
        n_ctx: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        fast_prefill: bool = True,
        name: str | None = None,
        world: str | None = None,
    ) -> None:
        self.bridge = bridge
        # What the user called it (registry name, path or hub id): results record it.
        self.name = name or type(bridge.original_model).__name__
        # The synthetic world whose prompts the model was trained on ("tiny"), if any.
        self.world = world
        self.bridge.eval()
        self.hf_model = bridge.original_model
        self.tokenizer = bridge.tokenizer
        cfg = bridge.cfg
        self.n_layers: int = int(cfg.n_layers)
        self.n_heads: int = int(cfg.n_heads)
        self.n_kv_heads: int = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
        self.d_head: int = int(cfg.d_head)
        self.d_model: int = int(cfg.d_model)
        self.d_vocab: int = int(cfg.d_vocab)
        self.model_n_ctx: int = int(cfg.n_ctx)
        self.n_ctx: int = int(n_ctx) if n_ctx is not None else self.model_n_ctx
        if self.n_heads % self.n_kv_heads:
            raise ModelLoadError(
                f"{self.n_heads} query heads do not split evenly over {self.n_kv_heads} kv heads"
            )
        self.chunk_size = int(chunk_size)
        self.position_offset = 0
        self._hook_names = frozenset(bridge.hook_dict)
        self._fast: torch.nn.Module | None = None
        self._fast_ties: list[tuple] = []
        self.fast_prefill_reason: str | None = "disabled by the caller"
        if fast_prefill:
            self._setup_fast_path()
        # Why step_rows cannot run (None: it can); probed against the bridge on first use.
        self.lean_decode_reason: str | None = None
        self._lean_checked = False

    # ---- shape --------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where input ids go (the embedding's device)."""
        return torch.device(self.bridge.cfg.device)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def score_bias(self) -> str | None:
        """An additive bias on attention scores that a zero query keeps ("alibi"), or None.

        Bloom adds ALiBi always; Falcon and MPT when their config says so."""
        config = self.hf_model.config
        attn_config = getattr(config, "attn_config", None)
        if (
            getattr(config, "model_type", None) == "bloom"
            or getattr(config, "alibi", False)
            or getattr(attn_config, "alibi", False)
            or (isinstance(attn_config, dict) and attn_config.get("alibi"))
        ):
            return "alibi"
        return None

    @property
    def group_size(self) -> int:
        """Query heads per kv head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_head_of(self, head: int) -> int:
        """The kv head query head ``head`` reads (GQA: ``head // (n_heads // n_kv_heads)``)."""
        if not 0 <= head < self.n_heads:
            raise ValueError(
                f"head {head} is out of range: the model has heads 0-{self.n_heads - 1}"
            )
        return head // self.group_size

    def expand_kv(
        self, tensor: Float[Tensor, "... kv_head d"], head_dim: int = -2
    ) -> Float[Tensor, "... head d"]:
        """Repeat a per-kv-head tensor (``hook_k``/``hook_v``: ``[batch, pos, kv_head, d_head]``)
        so that index ``h`` on ``head_dim`` is what query head ``h`` reads."""
        if tensor.shape[head_dim] != self.n_kv_heads:
            raise ValueError(
                f"expected {self.n_kv_heads} kv heads on dim {head_dim}, "
                f"got shape {tuple(tensor.shape)}"
            )
        return tensor.repeat_interleave(self.group_size, dim=head_dim)

    def heads(self) -> list[Head]:
        """Every attention head, layer-major."""
        return [Head(layer, head) for layer in range(self.n_layers) for head in range(self.n_heads)]

    def check_head(self, label: str | Head | tuple[int, int]) -> Head:
        """Parse a head label and check that the head exists in this model."""
        return Head.parse(label).check(self.n_layers, self.n_heads)

    def layer_windows(self) -> list[int | None]:
        """Each layer's sliding attention window in tokens, ``None`` for full (global) attention.

        From the config's ``layer_types`` (Gemma 2/3, Qwen, ...): a sliding layer's query sees
        only the last ``sliding_window`` keys, so a retrieval head further from its needle than
        that must sit in a global layer."""
        cfg = self.hf_model.config
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        if not window or not types or len(types) != self.n_layers:
            return [None] * self.n_layers
        return [int(window) if t == "sliding_attention" else None for t in types]

    def describe(self) -> dict[str, Any]:
        """The model's shape, recorded in results (``meta["model_info"]``) for the views."""
        return {
            "architecture": self.bridge.cfg.architecture or type(self.hf_model).__name__,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "d_head": self.d_head,
            "n_ctx": self.model_n_ctx,
            "layer_windows": self.layer_windows(),
        }

    # ---- tokens -------------------------------------------------------------------------

    def to_tokens(
        self, text: str | list[str], prepend_bos: bool | None = None
    ) -> Int[Tensor, "batch pos"]:
        """Token ids on the model's device; BOS follows the bridge's default unless given."""
        return self.bridge.to_tokens(text, prepend_bos=prepend_bos)

    def to_string(self, ids: Int[Tensor, "... pos"] | Sequence[int]) -> str | list[str]:
        return self.bridge.to_string(ids)

    def to_str_tokens(self, ids: Int[Tensor, " pos"] | Sequence[int] | str) -> list[str]:
        if isinstance(ids, Tensor) and ids.ndim == 2:
            if ids.shape[0] != 1:
                raise ValueError("to_str_tokens takes one sequence; index the batch first")
            ids = ids[0]
        return self.bridge.to_str_tokens(ids)

    # ---- hooks --------------------------------------------------------------------------

    def hook_name(self, layer: int, name: str) -> str:
        """``hook_name(3, "pattern")`` -> ``"blocks.3.attn.hook_pattern"`` (checked to exist)."""
        short = name.removeprefix("hook_")
        full = f"blocks.{layer}.attn.hook_{short}"
        if full not in self._hook_names:
            known = sorted(
                n.removeprefix(f"blocks.{layer}.attn.")
                for n in self._hook_names
                if n.startswith(f"blocks.{layer}.attn.hook_")
            )
            raise ValueError(f"no hook {full!r} in this model; attention hooks: {', '.join(known)}")
        return full

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: FwdHooks = ()) -> Iterator[HookedModel]:
        """Add TransformerLens forward hooks for the duration of the block.

        ``fwd_hooks`` is a list of ``(name_or_filter, fn)`` pairs with the TransformerLens
        signature ``fn(activation, hook) -> activation | None``. They are removed on exit,
        also on error. A hook on ``...attn.hook_result`` switches the bridge's per-head
        result computation on for the block (it is off by default).
        """
        fwd_hooks = list(fwd_hooks)
        with contextlib.ExitStack() as stack:
            wants_result = any(
                isinstance(name, str) and name.endswith("attn.hook_result") for name, _ in fwd_hooks
            )
            if wants_result and not getattr(self.bridge.cfg, "use_attn_result", False):
                self.bridge.set_use_attn_result(True)
                stack.callback(self.bridge.set_use_attn_result, False)
            if fwd_hooks:
                stack.enter_context(self.bridge.hooks(fwd_hooks=fwd_hooks))
            yield self

    def _has_active_hooks(self) -> bool:
        return any(len(hp._forward_hooks) for hp in self.bridge.hook_points())

    # ---- the fast path ------------------------------------------------------------------

    def _setup_fast_path(self) -> None:
        reason = self._fast_path_blocker()
        if reason is None:
            try:
                self._fast, self._fast_ties = _build_sdpa_twin(self.hf_model)
                reason = self._probe_fast_path()
            except _FastPathUnavailable as exc:
                reason = str(exc)
        if reason is not None:
            self._fast, self._fast_ties = None, []
            log.info("fast prefill off: %s; prefill runs the bridge in chunks", reason)
        self.fast_prefill_reason = reason

    def _fast_path_blocker(self) -> str | None:
        device_map = getattr(self.hf_model, "hf_device_map", None)
        if device_map and len({str(v) for v in device_map.values()}) > 1:
            return "the model is spread over several devices"
        if getattr(self.bridge, "compatibility_mode", False):
            return "the bridge is in compatibility mode (processed weights)"
        if getattr(self.bridge.cfg, "is_stateful", False):
            return "stateful (SSM) architecture"
        return None

    @torch.no_grad()
    def _probe_fast_path(self) -> str | None:
        assert self._fast is not None
        n = min(8, self.n_ctx)
        ids = (torch.arange(1, n + 1, device=self.device) * 7919) % self.d_vocab
        ids = ids[None]
        fast, _ = self._fast_forward(ids, self._new_cache())
        slow = self.bridge(ids, return_type="logits")[:, -1]
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        scale = max(1.0, slow.abs().max().item())
        diff = (fast.float() - slow.float()).abs().max().item()
        if not diff <= tol * scale:
            return f"the SDPA twin disagrees with the bridge (max logit diff {diff:.3g})"
        return None

    @property
    def fast_prefill(self) -> bool:
        """Whether hook-free prefill can use the SDPA twin right now."""
        if self._fast is None:
            return False
        blocker = self._fast_path_blocker()
        if blocker is None and all(
            getattr(twin, store)[key] is getattr(orig, store).get(key)
            for orig, twin, store, key in self._fast_ties
        ):
            return True
        warnings.warn(
            f"fast prefill switched off: {blocker or 'the model weights were replaced'}; "
            "prefill now runs the bridge in chunks",
            RuntimeWarning,
            stacklevel=3,
        )
        self._fast, self._fast_ties = None, []
        self.fast_prefill_reason = blocker or "the model weights were replaced"
        return False

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.hf_model.config)

    def _fast_forward(
        self, input_ids: Int[Tensor, "batch pos"], cache: Any
    ) -> tuple[Float[Tensor, "batch vocab"], Any]:
        """Run the SDPA twin over ``input_ids`` extending ``cache``: last logits and cache."""
        assert self._fast is not None
        keep = {"logits_to_keep": 1} if _forward_accepts(self._fast, "logits_to_keep") else {}
        logits = None
        start = 0
        while start < input_ids.shape[1]:
            # Empty cache: one shot, SDPA's causal kernel needs no mask. Otherwise chunk, as
            # SDPA then takes an explicit [chunk, context] mask.
            size = input_ids.shape[1] if cache.get_seq_length() == 0 else _FAST_CHUNK_SIZE
            chunk = input_ids[:, start : start + size]
            out = self._fast(input_ids=chunk, past_key_values=cache, use_cache=True, **keep)
            logits, cache = out.logits[:, -1], out.past_key_values
            start += chunk.shape[1]
        assert logits is not None
        return logits, cache

    def _bridge_forward(
        self,
        input_ids: Int[Tensor, "batch pos"],
        cache: Any,
        start: int,
        fwd_hooks: FwdHooks = (),
    ) -> tuple[Float[Tensor, "batch vocab"], Any]:
        """Run the bridge over ``input_ids`` (absolute positions from ``start``) in chunks."""
        logits = None
        with self.hooks(fwd_hooks):
            for offset in range(0, input_ids.shape[1], self.chunk_size):
                chunk = input_ids[:, offset : offset + self.chunk_size]
                self.position_offset = start + offset
                cached = cache.get_seq_length()
                out, cache = self.bridge(
                    chunk, past_key_values=cache, return_type="logits_and_cache"
                )
                # transformers 5.24 silently drops the cache update (wrong logits follow).
                if cache is None or cache.get_seq_length() != cached + chunk.shape[1]:
                    raise RuntimeError(
                        "the bridge did not extend the KV cache: this transformers version "
                        "breaks TransformerLens' incremental decoding; use transformers<5.24"
                    )
                logits = out[:, -1]
        assert logits is not None
        return logits, cache

    def _extend(
        self, input_ids: Int[Tensor, "batch pos"], cache: Any, start: int
    ) -> tuple[Float[Tensor, "batch vocab"], Any]:
        """Extend ``cache`` by ``input_ids`` with no hooks: the twin when possible."""
        if self.fast_prefill and not self._has_active_hooks():
            return self._fast_forward(input_ids, cache)
        return self._bridge_forward(input_ids, cache, start)

    # ---- decoding -----------------------------------------------------------------------

    def _prepare_ids(self, input_ids: Int[Tensor, "batch pos"] | Sequence[int]) -> Tensor:
        ids = torch.as_tensor(input_ids, device=self.device)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0 or ids.is_floating_point():
            raise ValueError(f"expected integer token ids [batch, pos], got {tuple(ids.shape)}")
        if ids.shape[1] > self.n_ctx:
            raise ContextLengthError(
                f"the prompt has {ids.shape[1]} tokens but n_ctx is {self.n_ctx}: shorten it, or "
                f"load with load_model(..., n_ctx={ids.shape[1]}) if the model can take it"
            )
        return ids

    @torch.no_grad()
    def prefill(self, input_ids: Int[Tensor, "batch pos"], fwd_hooks: FwdHooks = ()) -> DecodeState:
        """Run the prompt and return a cache to decode from.

        Without hooks (none passed, none attached) this is the fast path: the SDPA twin, no
        attention pattern kept. With ``fwd_hooks`` the bridge runs the prompt in chunks of
        ``chunk_size`` tokens, so hooks see ``[batch, chunk, ...]`` activations (and
        ``hook_pattern`` ``[batch, head, chunk, keys so far]``); ``position_offset`` tells a
        hook where its chunk starts.
        """
        ids = self._prepare_ids(input_ids)
        cache = self._new_cache()
        fwd_hooks = list(fwd_hooks)
        if fwd_hooks:
            logits, cache = self._bridge_forward(ids, cache, 0, fwd_hooks)
        else:
            logits, cache = self._extend(ids, cache, 0)
        return DecodeState(cache=cache, position=ids.shape[1], last_logits=logits)

    def _step_token(self, state: DecodeState, token: Int[Tensor, " batch"]) -> Tensor:
        """``token`` as ``[batch]`` on the model's device, checked to fit in ``n_ctx``."""
        token = torch.as_tensor(token, device=self.device)
        if token.ndim == 0:
            token = token[None]
        if token.ndim != 1:
            raise ValueError(f"step takes one token per row, [batch], got {tuple(token.shape)}")
        if state.position + 1 > self.n_ctx:
            raise ContextLengthError(
                f"decoding past n_ctx={self.n_ctx}: stop earlier or load with a larger n_ctx"
            )
        return token

    @torch.no_grad()
    def step(
        self, state: DecodeState, token: Int[Tensor, " batch"], fwd_hooks: FwdHooks = ()
    ) -> Float[Tensor, "batch vocab"]:
        """Feed one token per row through the bridge; every hook fires with query length 1.

        Updates ``state`` in place and returns the new ``last_logits``. During the hooks,
        ``position_offset`` is the token's absolute position (``state.position`` before).
        """
        token = self._step_token(state, token)
        logits, state.cache = self._bridge_forward(
            token[:, None], state.cache, state.position, fwd_hooks
        )
        state.position += 1
        state.last_logits = logits
        return logits

    # ---- the lean decode step -----------------------------------------------------------

    @property
    def lean_decode(self) -> bool:
        """Whether :meth:`step_rows` can run now: the SDPA twin is up, no hook is attached to
        the bridge (it would not fire), and the lean step matched the bridge on a probe (run
        once, on first use; :attr:`lean_decode_reason` says why not)."""
        if not self.fast_prefill:
            self.lean_decode_reason = self.fast_prefill_reason
            return False
        if self._has_active_hooks():
            return False
        if not self._lean_checked:
            self._lean_checked = True
            self.lean_decode_reason = self._probe_lean()
            if self.lean_decode_reason is not None:
                log.info(
                    "lean decode off: %s; decode steps run the bridge", self.lean_decode_reason
                )
        return self.lean_decode_reason is None

    @torch.no_grad()
    def step_rows(
        self, state: DecodeState, token: Int[Tensor, " batch"], sink: RowSink
    ) -> Float[Tensor, "batch vocab"]:
        """Feed one token per row through the SDPA twin, handing every layer's attention row
        of that token to ``sink(layer, row)``, ``row: Float[Tensor, "batch head key"]``.

        The rows are what ``blocks.{layer}.attn.hook_pattern`` holds in :meth:`step`
        (``pattern[:, :, -1]``), computed at about the cost of the attention itself: no
        bridge, no TransformerLens hooks, no copy of the KV cache per query head. With
        ``p = state.position`` before the call (the token's position) and ``n = row.shape[-1]``,
        key ``j`` of a row is absolute position ``p - n + 1 + j``: the whole context for full
        attention, the last ``sliding_window`` positions in a sliding-window layer (its cache
        holds no more). Each row is a new tensor, free to keep.
        Updates ``state`` as :meth:`step` does.

        Hooks attached to the bridge do not fire here. Check :attr:`lean_decode` before a run
        of steps (it also says whether hooks are attached, and whether the weights were
        replaced): only the probe is checked on every step, as the full check costs about a
        millisecond a step. Raises ``RuntimeError`` where the probe failed (use :meth:`step`
        with ``hook_pattern`` hooks there).
        """
        probed = self._fast is not None and self._lean_checked
        if not (probed and self.lean_decode_reason is None) and not self.lean_decode:
            why = (
                "hooks are attached to the bridge (they would not fire)"
                if self._has_active_hooks()
                else self.lean_decode_reason
            )
            raise RuntimeError(f"step_rows cannot run: {why}; use step() with pattern hooks")
        return self._lean_step(state, token, sink)

    def _lean_step(
        self, state: DecodeState, token: Int[Tensor, " batch"], sink: RowSink
    ) -> Float[Tensor, "batch vocab"]:
        assert self._fast is not None
        token = self._step_token(state, token)
        _register_rows_attention()
        # Only the twin's own (deep-copied) config switches, and only for this step: prefill
        # stays SDPA, and the bridge's model never sees the lean attention.
        config = self._fast.config
        before = config._attn_implementation
        sink_token = _ROW_SINK.set(sink)
        config._attn_implementation = _ROWS_ATTENTION
        try:
            logits, state.cache = self._fast_forward(token[:, None], state.cache)
        finally:
            config._attn_implementation = before
            _ROW_SINK.reset(sink_token)
        state.position += 1
        state.last_logits = logits
        return logits

    @torch.no_grad()
    def _probe_lean(self) -> str | None:
        """Why the lean step cannot stand in for the bridge's (None: it can): one decode step
        on a short probe, rows and logits against the bridge's ``hook_pattern`` and logits."""
        n = min(8, self.n_ctx)
        if n < 2:
            return "the context is too short to check the lean step"
        ids = ((torch.arange(1, n + 1, device=self.device) * 7919) % self.d_vocab)[None]
        lean: dict[int, Tensor] = {}
        try:
            state = self.prefill(ids[:, :-1])
            fast = self._lean_step(
                state, ids[:, -1], lambda layer, row: lean.__setitem__(layer, row.clone())
            )
            expected: dict[int, Tensor] = {}

            def keep(layer: int) -> HookFn:
                def hook(pattern: Tensor, hook: Any) -> None:
                    expected[layer] = pattern[:, :, -1].clone()  # [batch, head, key]

                return hook

            hooks = [
                (self.hook_name(layer, "pattern"), keep(layer)) for layer in range(self.n_layers)
            ]
            state = self.prefill(ids[:, :-1])
            slow = self.step(state, ids[:, -1], fwd_hooks=hooks)
        except Exception as exc:  # an attention the lean function cannot stand in for
            return f"the lean decode step failed ({type(exc).__name__}: {exc})"
        if sorted(lean) != list(range(self.n_layers)):
            return f"the lean step saw the attention of layers {sorted(lean)} only"
        tol = 1e-4 if self.dtype == torch.float32 else 2e-2
        for layer, row in lean.items():
            want = expected.get(layer)
            if want is None or want.shape != row.shape:
                return f"layer {layer}: lean rows {tuple(row.shape)} against the bridge's pattern"
            diff = (row.float() - want.float()).abs().max().item()
            if not diff <= tol:
                return f"the lean rows disagree with the bridge's (layer {layer}: {diff:.3g})"
        scale = max(1.0, slow.abs().max().item())
        diff = (fast.float() - slow.float()).abs().max().item()
        if not diff <= 10 * tol * scale:
            return f"the lean step's logits disagree with the bridge's ({diff:.3g})"
        return None

    @torch.no_grad()
    def logits(self, input_ids: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]:
        """All-position logits from one full bridge forward (reference path; O(pos^2))."""
        return self.bridge(self._prepare_ids(input_ids), return_type="logits")

    # ---- per-position reads -------------------------------------------------------------

    def _sweep(
        self,
        input_ids: Int[Tensor, " pos"] | Int[Tensor, "1 pos"],
        positions: Sequence[int],
        make_hooks: Callable[[list[int], dict[int, int]], list],
    ) -> list[int]:
        """Run ``input_ids`` up to the last chosen position; the chosen positions go through
        the bridge with hooks from ``make_hooks(positions, index_of)``, the rest the fast
        path. Returns the sorted unique positions (the output order)."""
        ids = self._prepare_ids(input_ids)
        if ids.shape[0] != 1:
            raise ValueError("pass one sequence (batch of 1)")
        wanted = sorted({int(p) for p in positions})
        if not wanted:
            raise ValueError("no positions given")
        if wanted[0] < 0 or wanted[-1] >= ids.shape[1]:
            raise ValueError(f"positions must lie in 0-{ids.shape[1] - 1}, got {wanted}")
        index_of = {p: i for i, p in enumerate(wanted)}
        hooks = make_hooks(wanted, index_of)
        cache = self._new_cache()
        done = 0
        for start, end in _segments(wanted, _SEGMENT_GAP):
            if start > done:
                _, cache = self._extend(ids[:, done:start], cache, done)
            _, cache = self._bridge_forward(ids[:, start:end], cache, start, hooks)
            done = end
        return wanted

    def _rows_hook(self, layer: int, wanted: list[int], index_of: dict[int, int], sink, pos_dim):
        """A hook keeping the activation rows at ``wanted`` absolute positions into ``sink``."""

        def hook(activation: Tensor, hook: Any) -> None:
            start = self.position_offset
            n = activation.shape[pos_dim]
            rows = [p - start for p in wanted if start <= p < start + n]
            if rows:
                picked = activation.index_select(
                    pos_dim, torch.tensor(rows, device=activation.device)
                )
                # Patterns [batch, head, query, key]: the keys end at the chunk's last query.
                first_key = start + n - activation.shape[-1] if pos_dim == 2 else 0
                sink(layer, [index_of[start + r] for r in rows], picked, first_key)

        return hook

    @torch.no_grad()
    def attention_rows(
        self,
        input_ids: Int[Tensor, " pos"] | Int[Tensor, "1 pos"],
        query_positions: Sequence[int],
    ) -> Float[Tensor, "layer head query key"]:
        """Attention patterns of every layer and head at the chosen query positions.

        Rows come back in sorted position order (duplicates dropped); ``key`` spans the whole
        input (keys after a query are 0). Only the chosen rows are kept: positions before the
        first one run the fast path, the chosen ones run the bridge.
        """
        seq_len = torch.as_tensor(input_ids).shape[-1]
        out: Tensor | None = None
        wanted_holder: list[int] = []

        def sink(layer: int, idx: list[int], picked: Tensor, first_key: int) -> None:
            nonlocal out
            # picked: [1, head, rows, keys]; a sliding-window layer's cache holds only its last
            # keys, so key 0 of its rows is position first_key, not 0.
            if out is None:
                out = torch.zeros(
                    self.n_layers, self.n_heads, len(wanted_holder), seq_len, device=picked.device
                )
            n_keys = picked.shape[-1]
            out[layer][:, idx, first_key : first_key + n_keys] = picked[0].float()

        def make_hooks(wanted, index_of):
            wanted_holder.extend(wanted)
            return [
                (
                    self.hook_name(layer, "pattern"),
                    self._rows_hook(layer, wanted, index_of, sink, 2),
                )
                for layer in range(self.n_layers)
            ]

        self._sweep(input_ids, query_positions, make_hooks)
        assert out is not None
        return out

    @torch.no_grad()
    def head_outputs(
        self,
        input_ids: Int[Tensor, " pos"] | Int[Tensor, "1 pos"],
        positions: Sequence[int],
    ) -> tuple[Float[Tensor, "layer pos head d_head"], Float[Tensor, "layer pos head d_model"]]:
        """Each head's ``z`` (``hook_z``) and its write to the residual stream at ``positions``.

        ``result[l, p, h] = z[l, p, h] @ W_O[l, h]``; summed over heads, plus the attention
        output bias (``attn_output_bias()``), it is the attention block's output.
        Positions come back sorted, duplicates dropped.
        """
        z_out: Tensor | None = None
        n_pos: list[int] = []

        def sink(layer: int, idx: list[int], picked: Tensor, first_key: int) -> None:
            nonlocal z_out
            # picked: [1, rows, head, d_head]
            if z_out is None:
                z_out = picked.new_zeros(self.n_layers, len(n_pos), self.n_heads, self.d_head)
            z_out[layer][idx] = picked[0]

        def make_hooks(wanted, index_of):
            n_pos.extend(wanted)
            return [
                (self.hook_name(layer, "z"), self._rows_hook(layer, wanted, index_of, sink, 1))
                for layer in range(self.n_layers)
            ]

        self._sweep(input_ids, positions, make_hooks)
        assert z_out is not None
        w_o = self.W_O.to(z_out.device, z_out.dtype)  # [layer, head, d_head, d_model]
        result = torch.einsum("lphd,lhdm->lphm", z_out, w_o)
        return z_out, result

    @property
    def W_O(self) -> Float[Tensor, "layer head d_head d_model"]:
        """Per-head output projections, detached."""
        return self.bridge.W_O.detach()

    def attn_output_bias(self) -> Float[Tensor, "layer d_model"]:
        """The attention output bias ``b_O`` per layer (zeros for bias-free models)."""
        try:
            return self.bridge.b_O.detach()
        except AttributeError:
            return torch.zeros(self.n_layers, self.d_model, device=self.device, dtype=self.dtype)

    def __repr__(self) -> str:
        kv = f", kv_heads={self.n_kv_heads}" if self.n_kv_heads != self.n_heads else ""
        return (
            f"HookedModel({self.bridge.cfg.architecture or type(self.hf_model).__name__}: "
            f"layers={self.n_layers}, heads={self.n_heads}{kv}, d_head={self.d_head}, "
            f"d_model={self.d_model}, n_ctx={self.n_ctx}, device={self.device}, "
            f"dtype={self.dtype}, fast_prefill={self._fast is not None})"
        )


# --------------------------------------------------------------------------------------------
# Loading


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
    if isinstance(source, str) and registry.lookup(source) is not None:
        world = registry.lookup(source).world
        source = registry.resolve(source)
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
