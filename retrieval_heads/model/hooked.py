"""The hooked model: :class:`HookedModel`, a TransformerLens bridge with KV-cached decoding.

:class:`HookedModel` is built in three layers, one module each:

- :class:`~retrieval_heads.model.bridged.BridgedModel` (:mod:`.bridged`): the model's shape and
  head helpers, tokens, hook names and the ``hooks`` context manager;
- :class:`~retrieval_heads.model.decoding.DecodingModel` (:mod:`.decoding`): prefill and decode
  steps (the bridge's, chunked, and the fast ones through the SDPA twin of :mod:`.twin`, which
  it sets up and checks against the bridge), and the values a decode passes around
  (:class:`DecodeState`, :class:`ContextLengthError`);
- :class:`HookedModel` (here): per-position reads (attention rows, head outputs, the heads'
  output projections).

The names of the first two are re-exported: ``from retrieval_heads.model.hooked import
DecodeState`` keeps working.

It never loads a model or checks what a user asked to load (:mod:`.loading` does), and builds
neither the twin nor its attention kernel itself (:mod:`.twin`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from retrieval_heads.model.bridged import FwdHooks as FwdHooks
from retrieval_heads.model.bridged import HookFn as HookFn
from retrieval_heads.model.decoding import DEFAULT_CHUNK_SIZE as DEFAULT_CHUNK_SIZE
from retrieval_heads.model.decoding import ContextLengthError, DecodeState, DecodingModel
from retrieval_heads.model.twin import RowSink as RowSink

__all__ = ["ContextLengthError", "DecodeState", "HookedModel"]

# Chosen positions closer than this are run through the bridge as one segment.
_SEGMENT_GAP = 32


def _segments(positions: Sequence[int], gap: int) -> list[tuple[int, int]]:
    """Group sorted positions into ``[start, end)`` runs, merging runs closer than ``gap``."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and p - runs[-1][1] < gap:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


class HookedModel(DecodingModel):
    """A TransformerLens ``TransformerBridge`` with KV-cached decoding and hook helpers.

    Build one with :func:`load_model`. Public attributes: ``bridge`` (the
    ``TransformerBridge``), ``hf_model`` (the wrapped Hugging Face model; note that the
    bridge replaced its submodules by hooked wrappers in place), ``tokenizer``,
    ``chunk_size`` (tokens per bridge forward when hooks must fire over a long prompt),
    ``position_offset`` (absolute position of the first query of the forward pass now
    running, for hooks that need absolute positions).

    Sequences are ``[batch, pos]`` token ids without padding (all rows the same length).
    """

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
