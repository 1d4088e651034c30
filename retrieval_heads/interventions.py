"""Head interventions: ablations as TransformerLens hooks, and activation patching per head.

The module callers import from (``from retrieval_heads.interventions import X``); the code lives
in four modules, one concept each, and is re-exported here:

- :mod:`retrieval_heads.ablation` — the ablation modes, one class per mode implementing the
  :class:`~retrieval_heads.intervention.Intervention` protocol (:class:`UniformAblation`,
  :class:`ZeroAblation`, :class:`MeanAblation`, :class:`ResampleAblation`,
  :class:`KnockoutAblation`), ``Ablation(heads, mode, ...)`` and :func:`ablate` building them
  from the mode's name (:data:`MODES`), and :func:`check_uniform` (the base class, with
  ``trial_independent`` and ``Ablation.stack`` for batches, in
  :mod:`retrieval_heads.ablation_base`);
- :mod:`retrieval_heads.head_hooks` — the hooks they are made of (zeroing queries or ``z``,
  replacing ``z``, replaying a recorded run, blocking keys), :func:`window_hooks` and
  :func:`window_mask` (a sink + recent-window view of the cache, the KV-cache what-if's),
  :func:`kv_group`, :data:`PHASES`;
- :mod:`retrieval_heads.head_z` — recording heads' ``z`` (:class:`ZRecorder`,
  :class:`RecordedZ` and ``RecordedZ.stack``, :func:`record_z`: a ``resample`` ablation's
  source) and :func:`mean_head_z` (a ``mean`` ablation's data);
- :mod:`retrieval_heads.head_patching` — activation patching per head (:func:`patch_heads`,
  :func:`patched_logits`, :class:`PatchedLogits`; several pairs of one length at once:
  :func:`patch_heads_batch`, :func:`patched_logits_batch`).

None of them decides *which* heads to touch: callers pass them (top-K retrieval heads, random
heads of the same count, ...). Everything is a list of ``(hook_name, fn)`` pairs that
``HookedModel.prefill(ids, fwd_hooks=...)`` and ``HookedModel.step(state, tok,
fwd_hooks=...)`` accept, so an intervention plugs into any decode loop unchanged.
"""

from __future__ import annotations

from retrieval_heads.ablation import (
    MODE_CLASSES,
    MODES,
    Ablation,
    KnockoutAblation,
    MeanAblation,
    Mode,
    ResampleAblation,
    UniformAblation,
    ZeroAblation,
    ablate,
)
from retrieval_heads.ablation import check_uniform as check_uniform
from retrieval_heads.head_hooks import PHASES, Phase, kv_group, window_hooks, window_mask
from retrieval_heads.head_hooks import HeadLabels as HeadLabels
from retrieval_heads.head_hooks import Hooks as Hooks
from retrieval_heads.head_hooks import first_key as first_key
from retrieval_heads.head_patching import (
    PatchedLogits,
    patch_heads,
    patch_heads_batch,
    patched_logits,
    patched_logits_batch,
)
from retrieval_heads.head_z import RecordedZ, ZRecorder, mean_head_z, record_z

__all__ = [
    "MODES",
    "MODE_CLASSES",
    "PHASES",
    "Ablation",
    "KnockoutAblation",
    "MeanAblation",
    "Mode",
    "PatchedLogits",
    "Phase",
    "RecordedZ",
    "ResampleAblation",
    "UniformAblation",
    "ZRecorder",
    "ZeroAblation",
    "ablate",
    "kv_group",
    "mean_head_z",
    "patch_heads",
    "patch_heads_batch",
    "patched_logits",
    "patched_logits_batch",
    "record_z",
    "window_hooks",
    "window_mask",
]
