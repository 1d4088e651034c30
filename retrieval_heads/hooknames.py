"""TransformerLens hook names: ``get_act_name("pattern", 3)`` -> ``"blocks.3.attn.hook_pattern"``.

A thin wrapper over TransformerLens' own ``get_act_name`` (same arguments, same strings), so a
notebook can write ``rh.get_act_name("z", layer)`` as it would ``utils.get_act_name`` in
TransformerLens. :meth:`HookedModel.hook_name(layer, name) <retrieval_heads.model.HookedModel.hook_name>`
gives the same string for the attention hooks this project uses (``q``, ``k``, ``v``,
``attn_scores``, ``pattern``, ``z``) and also checks that the loaded model has that hook.
"""

from __future__ import annotations

__all__ = ["get_act_name"]


def get_act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """The full TransformerLens hook name for ``name`` in ``layer`` (TransformerLens' order).

    ``get_act_name("pattern", 3) == "blocks.3.attn.hook_pattern"``,
    ``get_act_name("resid_pre", 0) == "blocks.0.hook_resid_pre"``; aliases and shorthands
    (``"attn"`` for ``"pattern"``, ``"k6"``) are TransformerLens' own.
    """
    from transformer_lens.utilities.components_utils import get_act_name as tl_get_act_name

    return str(tl_get_act_name(name, layer, layer_type))
