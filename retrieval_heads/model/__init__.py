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

The package's modules (``loading`` imports ``hooked``, which imports ``decoding``, which
imports ``bridged`` and ``twin``):

- :mod:`~retrieval_heads.model.twin`: the SDPA twin (built on the bridged model's own tensors)
  and the lean step's attention function, :data:`RowSink`;
- :mod:`~retrieval_heads.model.bridged`: ``BridgedModel``, what the bridge says without
  running (shape, head helpers, tokens, hook names, the ``hooks`` context manager);
- :mod:`~retrieval_heads.model.decoding`: ``DecodingModel`` (a ``BridgedModel`` plus the fast
  path, prefill, decode steps and the lean step), :class:`DecodeState`,
  :class:`ContextLengthError`;
- :mod:`~retrieval_heads.model.hooked`: :class:`HookedModel` (a ``DecodingModel`` plus the
  per-position reads: attention rows, head outputs);
- :mod:`~retrieval_heads.model.loading`: :func:`load_model` and its checks,
  :func:`supported_architectures`.

This module only re-exports their public names: ``from retrieval_heads.model import X`` works
for each of them.
"""

from __future__ import annotations

from retrieval_heads.model.hooked import DEFAULT_CHUNK_SIZE as DEFAULT_CHUNK_SIZE
from retrieval_heads.model.hooked import ContextLengthError, DecodeState, HookedModel
from retrieval_heads.model.hooked import FwdHooks as FwdHooks
from retrieval_heads.model.hooked import HookFn as HookFn
from retrieval_heads.model.loading import DEVICE_MAP_DIRECTIVES as DEVICE_MAP_DIRECTIVES
from retrieval_heads.model.loading import load_model, supported_architectures
from retrieval_heads.model.twin import RowSink as RowSink
from retrieval_heads.registry import ModelLoadError

__all__ = [
    "ContextLengthError",
    "DecodeState",
    "HookedModel",
    "ModelLoadError",
    "load_model",
    "supported_architectures",
]
