"""A KV cache whose full-attention layers grow in place instead of by concatenation.

transformers' ``DynamicLayer`` appends each decode step's key and value with ``torch.cat``,
which copies the whole cache of every layer at every step: O(context) bytes moved per token
before any attention is computed. At a batch of 8 trials of 1K tokens on SmolLM2 that copy was
a sixth of a decode step (measured: docs/benchmarks.md). :class:`GrowingLayer` keeps the keys
and values in a buffer with room to spare and writes each step into it; ``keys`` and
``values`` are views of the filled part, so attention sees the same numbers as before (the
tests check logits and rows against ``DynamicLayer``'s). Room grows by ``GROW_BY`` positions
at a time, so a buffer holds at most that many unused positions.

Sliding-window layers keep transformers' own class: their cache is bounded by the window.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["GROW_BY", "GrowingLayer", "growing_cache"]

#: Positions of room added whenever a buffer is full (a decode of up to this many steps after a
#: prefill copies the cache once, at the prefill).
GROW_BY = 256


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer written in place into a buffer with spare room."""

    def __init__(self) -> None:
        super().__init__()
        self._key_buffer: Tensor | None = None
        self._value_buffer: Tensor | None = None

    def _adopted(self) -> bool:
        """Whether ``keys`` is still the filled part of the buffer (``crop`` and the batch
        methods of ``DynamicLayer`` replace it with a new tensor: then the buffer is dropped)."""
        buffer, keys = self._key_buffer, self.keys
        return (
            buffer is not None
            and keys is not None
            and keys.data_ptr() == buffer.data_ptr()
            and keys.shape[:2] == buffer.shape[:2]
        )

    def update(
        self,
        key_states: Float[Tensor, "batch kv_head new d"],
        value_states: Float[Tensor, "batch kv_head new d_v"],
        *args: Any,
        **kwargs: Any,
    ) -> tuple[Float[Tensor, "batch kv_head key d"], Float[Tensor, "batch kv_head key d_v"]]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        filled = self.get_seq_length()
        if filled and not self._adopted():  # keys replaced from outside: start a buffer anew
            self._key_buffer = self._value_buffer = None
        new = key_states.shape[-2]
        buffer = self._key_buffer
        if buffer is None or filled + new > buffer.shape[-2]:
            room = filled + new + GROW_BY
            self._key_buffer = self._grow(self.keys if filled else None, key_states, room)
            self._value_buffer = self._grow(self.values if filled else None, value_states, room)
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[..., filled : filled + new, :] = key_states
        self._value_buffer[..., filled : filled + new, :] = value_states
        self.keys = self._key_buffer[..., : filled + new, :]
        self.values = self._value_buffer[..., : filled + new, :]
        return self.keys, self.values

    @staticmethod
    def _grow(old: Tensor | None, like: Tensor, room: int) -> Tensor:
        shape = (*like.shape[:-2], room, like.shape[-1])
        buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
        if old is not None:
            buffer[..., : old.shape[-2], :] = old
        return buffer

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def growing_cache(config: Any) -> DynamicCache:
    """transformers' ``DynamicCache`` for ``config``, its full-attention layers
    :class:`GrowingLayer`."""
    cache = DynamicCache(config=config)
    cache.layers = [
        GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    if cache.layer_class_to_replicate is DynamicLayer:  # no layer types known: made lazily
        cache.layer_class_to_replicate = GrowingLayer
    return cache
