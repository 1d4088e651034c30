"""The bridged model's forward passes: :class:`DecodingModel`, prefill and decode steps.

Two paths fill and extend one KV cache (the package docstring says why): the bridge, run in
chunks of ``chunk_size`` tokens so that every TransformerLens hook fires, and the SDPA twin of
:mod:`.twin`, which this module sets up, checks against the bridge on a short probe, and
switches off where it cannot stand in (weights replaced, several devices, a failed probe).

- ``prefill(ids, fwd_hooks=())`` — the prompt, through the twin when no hook is asked for;
- ``step(state, token, fwd_hooks=())`` — one token through the bridge, every hook firing;
- ``step_rows(state, token, sink)`` — the lean step: one token through the twin, every layer's
  attention row handed to ``sink`` (checked against the bridge once, on first use);
- :class:`DecodeState`, what a decode passes around, and :class:`ContextLengthError`.

It never loads a model (:mod:`.loading`), builds neither the twin nor its attention kernel
itself (:mod:`.twin`), and reads no chosen positions (:mod:`.hooked`'s per-position reads do).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from retrieval_heads.model.bridged import BridgedModel, FwdHooks, HookFn
from retrieval_heads.model.twin import (
    _ROW_SINK,
    _ROWS_ATTENTION,
    RowSink,
    _build_sdpa_twin,
    _FastPathUnavailable,
    _forward_accepts,
    _register_rows_attention,
)

__all__ = ["DEFAULT_CHUNK_SIZE", "ContextLengthError", "DecodeState", "DecodingModel"]

# The name it had when HookedModel was one module, so that logging filters on it still apply.
log = logging.getLogger("retrieval_heads.model.hooked")

DEFAULT_CHUNK_SIZE = 512
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


class DecodingModel(BridgedModel):
    """A :class:`~retrieval_heads.model.bridged.BridgedModel` that runs: prefill and decode
    steps over a KV cache, through the bridge or its SDPA twin (the base of
    :class:`~retrieval_heads.model.hooked.HookedModel`, which documents the public
    attributes)."""

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
        super().__init__(bridge, n_ctx=n_ctx, name=name, world=world)
        self.chunk_size = int(chunk_size)
        self.position_offset = 0
        self._fast: torch.nn.Module | None = None
        self._fast_ties: list[tuple] = []
        self.fast_prefill_reason: str | None = "disabled by the caller"
        if fast_prefill:
            self._setup_fast_path()
        # Why step_rows cannot run (None: it can); probed against the bridge on first use.
        self.lean_decode_reason: str | None = None
        self._lean_checked = False

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
        from retrieval_heads.model.cache import growing_cache

        return growing_cache(self.hf_model.config)

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
