"""The SDPA twin: the fast prefill's copy of the Hugging Face model, and the lean decode step's
attention function.

It owns building the twin (an SDPA copy of the model's architecture whose tensors are the
bridged model's own, :func:`_build_sdpa_twin`) and the attention kernel of a lean decode step
(:func:`_rows_attention`: one query, grouped by kv head, each layer's row handed to the
:data:`RowSink` of the step now running), with its registration under transformers'
attention and mask interfaces. :class:`~retrieval_heads.model.hooked.HookedModel` (its decoding
layer, :mod:`.decoding`) decides when either runs and checks them against the bridge.

It never runs the bridge, holds a model, or imports anything of the package.
"""

from __future__ import annotations

import contextvars
import copy
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

# What step_rows hands each layer's attention row of the new query to: sink(layer, row).
RowSink = Callable[[int, Float[Tensor, "batch head key"]], None]


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

    config: Any = copy.deepcopy(hf_model.config)
    config.output_attentions = False
    dtype = next(hf_model.parameters()).dtype
    try:
        with torch.device("meta"):
            twin = type(hf_model)._from_config(config, attn_implementation="sdpa", dtype=dtype)  # type: ignore[attr-defined]  # a PreTrainedModel
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
    sink(module.layer_idx, rows)  # type: ignore[arg-type]  # an int set by transformers
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
