"""retrieval-heads: find, test and show the attention heads a model uses to retrieve from context.

Importing the package is cheap: only ``Head`` (torch-free) is imported eagerly; every other
public name is imported from its module on first use (see ``_LAZY``), so
``import retrieval_heads`` does not import torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from retrieval_heads.heads import Head, parse_heads

__version__ = "0.1.0"

# Public name -> (module defining it, name there) or module (same name). Adding a lazily
# imported name is one line here. The short surface a notebook needs, in the order of a session:
_LAZY: dict[str, str | tuple[str, str]] = {
    # load a model
    "load_model": "retrieval_heads.model",
    "HookedModel": "retrieval_heads.model",
    "DecodeState": "retrieval_heads.model",
    "ContextLengthError": "retrieval_heads.model",
    "supported_architectures": "retrieval_heads.model",
    "ModelLoadError": "retrieval_heads.registry",
    "get_act_name": "retrieval_heads.hooknames",
    # make trials
    "make_trials": "retrieval_heads.trials",
    # detect
    "detect": "retrieval_heads.scoring",
    "score_trial": "retrieval_heads.scoring",
    "score_batch": "retrieval_heads.batched",
    "DecodeConfig": "retrieval_heads.scoring",
    "write_scores": "retrieval_heads.logit_attribution",
    "query_focused_scores": "retrieval_heads.detectors",
    "pattern_scores": "retrieval_heads.detectors",
    "compare_detectors": "retrieval_heads.detector_comparison",
    # choose heads
    "top_heads": "retrieval_heads.selection",
    "random_heads": "retrieval_heads.selection",
    "matched_layer_heads": "retrieval_heads.selection",
    # ablate / intervene
    "ablate": "retrieval_heads.interventions",
    "Ablation": "retrieval_heads.interventions",
    "UniformAblation": "retrieval_heads.interventions",
    "ZeroAblation": "retrieval_heads.interventions",
    "MeanAblation": "retrieval_heads.interventions",
    "ResampleAblation": "retrieval_heads.interventions",
    "KnockoutAblation": "retrieval_heads.interventions",
    "Intervention": "retrieval_heads.intervention",
    "UserIntervention": "retrieval_heads.intervention",
    "compose": "retrieval_heads.intervention",
    "KVPolicy": "retrieval_heads.kvcache",
    # sweep
    "k_sweep": "retrieval_heads.causal",
    "summarise_k_sweep": "retrieval_heads.analysis",
    "kv_simulate": ("retrieval_heads.kvcache", "simulate"),
    "run_sweep": "retrieval_heads.runner",
    "Unit": "retrieval_heads.runner",
    # load results
    "load_results": "retrieval_heads.store",
    "load_run": "retrieval_heads.store",
    "HeadAblation": "retrieval_heads.conditions",
    "KVWindow": "retrieval_heads.conditions",
    "HeadScores": "retrieval_heads.scores",
    "TrialRecord": "retrieval_heads.records",
    "import_published": "retrieval_heads.published",
    # draw
    "build_report": "retrieval_heads.views.report",
    "score_heatmap": "retrieval_heads.views.figures",
    "score_histogram": "retrieval_heads.views.figures",
    "niah_heatmap": "retrieval_heads.views.figures",
    "k_sweep_figure": "retrieval_heads.views.figures",
    "score_vs_effect": "retrieval_heads.views.figures",
    "effect_heatmap": "retrieval_heads.views.figures",
}


def _module(name: str) -> str:
    target = _LAZY[name]
    return target if isinstance(target, str) else target[0]


# Names whose module is not written yet stay out of __all__, so `import *` keeps working.
__all__ = [
    "Head",
    "parse_heads",
    "__version__",
    *(name for name in _LAZY if importlib.util.find_spec(_module(name)) is not None),
]

if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from retrieval_heads.analysis import summarise_k_sweep as summarise_k_sweep
    from retrieval_heads.batched import score_batch as score_batch
    from retrieval_heads.causal import k_sweep as k_sweep
    from retrieval_heads.conditions import HeadAblation as HeadAblation
    from retrieval_heads.conditions import KVWindow as KVWindow
    from retrieval_heads.detector_comparison import compare_detectors as compare_detectors
    from retrieval_heads.detectors import pattern_scores as pattern_scores
    from retrieval_heads.detectors import query_focused_scores as query_focused_scores
    from retrieval_heads.hooknames import get_act_name as get_act_name
    from retrieval_heads.intervention import Intervention as Intervention
    from retrieval_heads.intervention import UserIntervention as UserIntervention
    from retrieval_heads.intervention import compose as compose
    from retrieval_heads.interventions import Ablation as Ablation
    from retrieval_heads.interventions import KnockoutAblation as KnockoutAblation
    from retrieval_heads.interventions import MeanAblation as MeanAblation
    from retrieval_heads.interventions import ResampleAblation as ResampleAblation
    from retrieval_heads.interventions import UniformAblation as UniformAblation
    from retrieval_heads.interventions import ZeroAblation as ZeroAblation
    from retrieval_heads.interventions import ablate as ablate
    from retrieval_heads.kvcache import KVPolicy as KVPolicy
    from retrieval_heads.kvcache import simulate as kv_simulate  # noqa: F401
    from retrieval_heads.logit_attribution import write_scores as write_scores
    from retrieval_heads.model import ContextLengthError as ContextLengthError
    from retrieval_heads.model import DecodeState as DecodeState
    from retrieval_heads.model import HookedModel as HookedModel
    from retrieval_heads.model import load_model as load_model
    from retrieval_heads.model import supported_architectures as supported_architectures
    from retrieval_heads.published import import_published as import_published
    from retrieval_heads.records import TrialRecord as TrialRecord
    from retrieval_heads.registry import ModelLoadError as ModelLoadError
    from retrieval_heads.runner import Unit as Unit
    from retrieval_heads.runner import run_sweep as run_sweep
    from retrieval_heads.scores import HeadScores as HeadScores
    from retrieval_heads.scoring import DecodeConfig as DecodeConfig
    from retrieval_heads.scoring import detect as detect
    from retrieval_heads.scoring import score_trial as score_trial
    from retrieval_heads.selection import matched_layer_heads as matched_layer_heads
    from retrieval_heads.selection import random_heads as random_heads
    from retrieval_heads.selection import top_heads as top_heads
    from retrieval_heads.store import load_results as load_results
    from retrieval_heads.store import load_run as load_run
    from retrieval_heads.trials import make_trials as make_trials
    from retrieval_heads.views.figures import effect_heatmap as effect_heatmap
    from retrieval_heads.views.figures import k_sweep_figure as k_sweep_figure
    from retrieval_heads.views.figures import niah_heatmap as niah_heatmap
    from retrieval_heads.views.figures import score_heatmap as score_heatmap
    from retrieval_heads.views.figures import score_histogram as score_histogram
    from retrieval_heads.views.figures import score_vs_effect as score_vs_effect
    from retrieval_heads.views.report import build_report as build_report


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'retrieval_heads' has no attribute {name!r}")
    module_name, attr = (target, name) if isinstance(target, str) else target
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
