"""The hooked model: :class:`HookedModel`, a TransformerLens bridge with KV-cached decoding.

It owns the model's shape and head helpers, tokens, hooks, prefill and decode steps (the
bridge's, chunked, and the fast ones through the SDPA twin of :mod:`.twin`, which it sets up
and checks against the bridge), per-position reads (attention rows, head outputs), and the
values a decode passes around (:class:`DecodeState`, :class:`ContextLengthError`).

It never loads a model or checks what a user asked to load (:mod:`.loading` does), and builds
neither the twin nor its attention kernel itself (:mod:`.twin`).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from retrieval_heads.heads import Head
from retrieval_heads.model.twin import (
    _ROW_SINK,
    _ROWS_ATTENTION,
    RowSink,
    _build_sdpa_twin,
    _FastPathUnavailable,
    _forward_accepts,
    _register_rows_attention,
)
from retrieval_heads.registry import ModelLoadError

__all__ = ["ContextLengthError", "DecodeState", "HookedModel"]

log = logging.getLogger(__name__)

# A TransformerLens forward hook: fn(activation, hook=HookPoint) -> activation | None.
HookFn = Callable[..., Any]
FwdHooks = Iterable[tuple[str | Callable[[str], bool], HookFn]]

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
        config: Any = self._fast.config
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
