"""The bridged model's static side: :class:`BridgedModel`, what a TransformerLens bridge says
without running a forward pass.

It owns the model's shape (layers, query and kv heads, ``d_head``, ``n_ctx``, sliding windows)
and head helpers (``heads()``, ``kv_head_of``, ``expand_kv``), tokens (``to_tokens``,
``to_string``), and hooks (``hook_name`` checked against the bridge, the ``hooks`` context
manager). :class:`~retrieval_heads.model.decoding.DecodingModel` adds the forward passes on top
of it, and :class:`~retrieval_heads.model.hooked.HookedModel` the per-position reads.

It never runs the model, and never loads one (:mod:`.loading` does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from retrieval_heads.heads import Head
from retrieval_heads.registry import ModelLoadError

__all__ = ["BridgedModel", "FwdHooks", "HookFn"]

# A TransformerLens forward hook: fn(activation, hook=HookPoint) -> activation | None.
HookFn = Callable[..., Any]
FwdHooks = Iterable[tuple[str | Callable[[str], bool], HookFn]]

_Model = TypeVar("_Model", bound="BridgedModel")


class BridgedModel:
    """A TransformerLens ``TransformerBridge`` with its shape, heads, tokens and hook names
    (the base of :class:`~retrieval_heads.model.hooked.HookedModel`, which documents the
    public attributes)."""

    def __init__(
        self,
        bridge: Any,
        *,
        n_ctx: int | None = None,
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
        self._hook_names = frozenset(bridge.hook_dict)

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
    def hooks(self: _Model, fwd_hooks: FwdHooks = ()) -> Iterator[_Model]:
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
