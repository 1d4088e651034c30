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

# Public name -> module defining it. Adding a lazily imported name is one line here.
_LAZY: dict[str, str] = {
    "load_model": "retrieval_heads.model",
    "HookedModel": "retrieval_heads.model",
    "DecodeState": "retrieval_heads.model",
    "ContextLengthError": "retrieval_heads.model",
    "supported_architectures": "retrieval_heads.model",
    "ModelLoadError": "retrieval_heads.registry",
    "make_trials": "retrieval_heads.trials",
    "detect": "retrieval_heads.scoring",
    "ablate": "retrieval_heads.interventions",
}

# Names whose module is not written yet stay out of __all__, so `import *` keeps working.
__all__ = [
    "Head",
    "parse_heads",
    "__version__",
    *(name for name, mod in _LAZY.items() if importlib.util.find_spec(mod) is not None),
]

if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from retrieval_heads.model import ContextLengthError as ContextLengthError
    from retrieval_heads.model import DecodeState as DecodeState
    from retrieval_heads.model import HookedModel as HookedModel
    from retrieval_heads.model import load_model as load_model
    from retrieval_heads.model import supported_architectures as supported_architectures
    from retrieval_heads.registry import ModelLoadError as ModelLoadError
    from retrieval_heads.trials import make_trials as make_trials


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'retrieval_heads' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
