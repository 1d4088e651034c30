"""Write scores: what each head writes towards the answer the model generated (direct logit
attribution, DLA, per head).

For a prompt ``x`` (a trial's ``input_ids``) and the tokens the model generated for it,
``t_0 .. t_{n-1}``, the model is run on ``x + t_0 .. t_{n-2}``: answer step ``s`` is the query
position ``q_s = len(x) - 1 + s``, the one whose logits produced ``t_s`` (the last prompt token
for ``s = 0``, then the previous generated token). At each ``q_s``, for layer ``l`` and head
``h`` (GQA: every query head; its ``z`` is its own),

    r[l, h]  = z[l, q_s, h] @ W_O[l, h]                         (the head's output, ``hook_z``)
    r'[l, h] = r[l, h] * g_post[l] / sigma_post[l, q_s]          (only with a post-attention norm)
    a[s, l, h] = (C(r'[l, h]) * g_final / sigma_final[q_s]) . d(t_s)

and the write score is ``mean_s a[s, l, h]``, a ``[layer, head]`` table in logit units.

- ``sigma_final[q_s]`` is the final norm's scale measured on the real residual stream at
  ``q_s`` (``ln_final.hook_scale`` of the same forward pass: RMS for RMSNorm, the standard
  deviation for LayerNorm, ``eps`` included), held fixed: the standard DLA approximation,
  which makes the map from a head's output to the logits linear. ``g_final`` is the norm's
  gain: its ``weight``, or ``1 + weight`` where the norm stores an offset (Gemma).
  ``C`` centres over ``d_model`` for a LayerNorm and is the identity for an RMSNorm. The
  norm's bias and the unembedding bias belong to no head and are left out.
- A post-attention norm (Gemma 2/3's ``post_attention_layernorm``, the bridge's ``ln1_post``)
  stands between ``o_proj`` and the residual stream; it is frozen the same way, at its own
  measured scale ``sigma_post[l, q_s]``. Through frozen scales the heads' terms sum exactly
  to the attention block's write (with its output bias, a term of no head).
- ``d(t) = W_U[:, t] - mean_v W_U[:, v]`` with ``center=True`` (the default): the head's
  contribution to the logit of ``t_s`` *minus the mean logit over the vocabulary*, which a
  softmax ignores, so a head that lifts every logit alike scores 0. ``center=False`` gives
  ``d(t) = W_U[:, t]``, the contribution to the raw logit.
- Final logit soft-capping (Gemma 2, Gemma 3 where configured: ``c * tanh(logit / c)``) is
  not applied: scores are in pre-cap logit units, the space in which the attribution is
  linear (the cap is monotone per token, so the ranking of tokens is the same).

Direct only: a head's effect through later layers (the MLP of its own layer included) is not
counted, and the scales are those of the real run (removing a head would change them).

The run: the prompt up to ``q_0`` is prefilled (the fast path), then each ``q_s`` is fed as
one bridge decode step with hooks on every layer's ``hook_z`` and the norms' ``hook_scale``,
so a trial costs about what decoding its answer through the bridge costs. Hooks attached to
the model (``model.hooks(...)``) stay in force: the scores are then those of the changed run.

It never decodes (pass what a decode generated, e.g. a ``TrialRecord``) nor aggregates over
trials (``HeadScores`` does); wiring it into ``detect`` as a scorer is the caller's part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from retrieval_heads.model import HookedModel
    from retrieval_heads.records import TrialRecord
    from retrieval_heads.trials.trial import Trial

__all__ = ["write_attributions", "write_scores"]

_FINAL_SCALE = "ln_final.hook_scale"


def _post_scale(layer: int) -> str:
    return f"blocks.{layer}.ln1_post.hook_scale"


def _gain(norm: Any) -> Float[Tensor, " d_model"] | None:
    """A norm's gain: ``weight`` (``1 + weight`` for an offset norm), or ``None`` if it has none."""
    weight = getattr(getattr(norm, "original_component", None), "weight", None)
    if weight is None:
        return None
    weight = weight.detach().float()
    return 1.0 + weight if getattr(norm, "uses_weight_offset", False) else weight


def _centres(norm: Any) -> bool:
    """Whether the norm subtracts the mean over ``d_model`` (a LayerNorm, not an RMSNorm)."""
    return not getattr(norm, "uses_rms_norm", True)


def _ids(trial: Trial | Sequence[int]) -> list[int]:
    ids = cast("Sequence[int]", getattr(trial, "input_ids", trial))
    return [int(i) for i in ids]


def _generated(generated: Sequence[int] | TrialRecord) -> list[int]:
    ids = cast("Sequence[int]", getattr(generated, "generated_ids", generated))
    return [int(i) for i in ids]


def _post_norms(model: HookedModel, hook_names: set[str]) -> list[Any] | None:
    """Every layer's post-attention norm (``ln1_post``), or ``None`` if the model has none."""
    blocks = model.bridge.blocks
    norms = [getattr(block, "ln1_post", None) for block in blocks]
    if all(norm is None for norm in norms):
        return None
    if any(norm is None for norm in norms) or not all(
        _post_scale(layer) in hook_names for layer in range(model.n_layers)
    ):
        raise ValueError("write scores need ln1_post.hook_scale on every layer or on none")
    return norms


def _capture(
    model: HookedModel, ids: list[int], n_steps: int, with_post: bool
) -> tuple[
    Float[Tensor, "step layer head d_head"], Float[Tensor, " step"], Float[Tensor, "step layer"]
]:
    """Run ``ids`` and keep, at each of its last ``n_steps`` positions, every head's ``z``, the
    final norm's scale and (``with_post``) each layer's post-attention norm scale."""
    n_layers, device = model.n_layers, model.device
    z: list[list[Tensor]] = [[] for _ in range(n_steps)]
    final: list[Tensor] = []
    post: list[list[Tensor]] = [[] for _ in range(n_steps)]
    step = [0]

    def keep_z(act: Tensor, hook: Any) -> None:  # [1, 1, head, d_head]
        z[step[0]].append(act[0, -1].detach().float().to(device))

    def keep_final(act: Tensor, hook: Any) -> None:  # [1, 1, 1]
        final.append(act[0, -1, 0].detach().float().to(device))

    def keep_post(act: Tensor, hook: Any) -> None:
        post[step[0]].append(act[0, -1, 0].detach().float().to(device))

    hooks: list[tuple[str, Any]] = [
        (model.hook_name(layer, "z"), keep_z) for layer in range(n_layers)
    ]
    hooks.append((_FINAL_SCALE, keep_final))
    if with_post:
        hooks += [(_post_scale(layer), keep_post) for layer in range(n_layers)]

    first = len(ids) - n_steps  # q_0
    tokens = torch.tensor([ids], device=device)
    if first == 0:  # a one-token prompt: nothing to prefill, the first query runs with hooks
        state = model.prefill(tokens[:, :1], fwd_hooks=hooks)
    else:
        state = model.prefill(tokens[:, :first])
        model.step(state, tokens[:, first], fwd_hooks=hooks)
    for s in range(1, n_steps):
        step[0] = s
        model.step(state, tokens[:, first + s], fwd_hooks=hooks)

    # Blocks run in order, so the hooks fired layer 0 first.
    if len(final) != n_steps or any(len(row) != n_layers for row in z):
        raise RuntimeError("the hooks did not fire once per layer and step")
    post_scales = (
        torch.stack([torch.stack(row) for row in post])
        if with_post
        else torch.ones(n_steps, n_layers, device=device)
    )
    return torch.stack([torch.stack(row) for row in z]), torch.stack(final), post_scales


@torch.no_grad()
def write_attributions(
    model: HookedModel,
    trial: Trial | Sequence[int],
    generated_ids: Sequence[int] | TrialRecord,
    *,
    center: bool = True,
) -> Float[np.ndarray, "step layer head"]:
    """Each head's direct logit attribution ``a[s, l, h]`` to the token generated at answer
    step ``s`` (see the module docstring for the formula and how the norms are handled).

    ``trial`` is a ``Trial`` (or its prompt ids), ``generated_ids`` the tokens the model
    generated for it (or a ``TrialRecord`` holding them). With ``center`` the target is the
    logit of ``t_s`` minus the mean logit over the vocabulary, else the raw logit; pre-cap
    logit units either way. An empty answer gives a ``[0, layer, head]`` array.
    """
    prompt, answer = _ids(trial), _generated(generated_ids)
    if not prompt:
        raise ValueError("the prompt is empty")
    n_layers, n_heads = model.n_layers, model.n_heads
    if not answer:
        return np.zeros((0, n_layers, n_heads))
    bridge = model.bridge
    d_vocab = bridge.W_U.shape[1]
    if not all(0 <= t < d_vocab for t in answer):
        raise ValueError(f"generated ids must lie in 0-{d_vocab - 1}")
    hook_names = set(bridge.hook_dict)
    if _FINAL_SCALE not in hook_names:
        raise ValueError(f"the model has no {_FINAL_SCALE}: write scores need the final norm")
    post_norms = _post_norms(model, hook_names)

    z, final_scale, post_scale = _capture(
        model, prompt + answer[:-1], len(answer), post_norms is not None
    )
    return _attribute(
        model, z, final_scale, post_scale, torch.tensor(answer), post_norms, center=center
    )


def _attribute(
    model: HookedModel,
    z: Float[Tensor, "step layer head d_head"],
    final_scale: Float[Tensor, " step"],
    post_scale: Float[Tensor, "step layer"],
    tokens: Int[Tensor, " step"],
    post_norms: list[Any] | None,
    *,
    center: bool,
) -> Float[np.ndarray, "step layer head"]:
    """The formula of the module docstring, from the captured activations."""
    bridge = model.bridge
    device = z.device
    w_u = bridge.W_U.detach()  # [d_model, vocab], never copied whole
    direction = w_u[:, tokens.to(w_u.device)].float().T.to(device)  # [step, d_model]
    if center:
        direction = direction - w_u.mean(dim=1, dtype=torch.float32).to(device)

    # u[s] . x is the (centred) logit a residual write x makes through the frozen final norm;
    # centring x over d_model (LayerNorm) is centring u: (x - mean x) . u = x . (u - mean u).
    u = direction / final_scale[:, None]
    gain = _gain(bridge.ln_final)
    if gain is not None:
        u = u * gain.to(device)
    if _centres(bridge.ln_final):
        u = u - u.mean(dim=-1, keepdim=True)

    v = u[:, None, :].expand(-1, model.n_layers, -1) / post_scale[:, :, None]  # [step, layer, m]
    if post_norms is not None:
        for layer, norm in enumerate(post_norms):
            post_gain = _gain(norm)
            if post_gain is not None:
                v[:, layer] = v[:, layer] * post_gain.to(device)
            if _centres(norm):
                v[:, layer] = v[:, layer] - v[:, layer].mean(dim=-1, keepdim=True)

    w_o = model.W_O.to(device=device, dtype=torch.float32)  # [layer, head, d_head, d_model]
    read = torch.einsum("lhdm,slm->slhd", w_o, v)  # what z must hold to write d(t) directly
    scores = torch.einsum("slhd,slhd->slh", z, read)
    return scores.double().cpu().numpy()


def write_scores(
    model: HookedModel,
    trial: Trial | Sequence[int],
    generated_ids: Sequence[int] | TrialRecord,
    *,
    center: bool = True,
) -> Float[np.ndarray, "layer head"]:
    """Each head's write score on one trial: :func:`write_attributions` averaged over the
    answer steps (pre-cap logit units; ``center`` as there). All NaN for an empty answer."""
    per_step = write_attributions(model, trial, generated_ids, center=center)
    if per_step.shape[0] == 0:
        return np.full(per_step.shape[1:], np.nan)
    return per_step.mean(axis=0)
