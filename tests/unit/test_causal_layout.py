"""The causal experiments' shape: head selection (``selection``), an ablation's hooks per trial
(``ablation_hooks``), one trial answered and graded (``answering``), the ablation runner
(``causal``), activation patching (``patching``) and the embedded world's controls
(``tiny.controls``); the names users call as ``causal.<name>`` still answer there, and none of
the generic modules loads the embedded world on import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from retrieval_heads import ablation_hooks, answering, causal, patching, selection
from retrieval_heads.tiny import controls


def test_causal_keeps_the_names_users_call():
    for name in ("top_heads", "random_heads", "matched_layer_heads", "plan_conditions"):
        assert getattr(causal, name) is getattr(selection, name), name
        assert name in causal.__all__
    for name in ("patching_map", "patching_vs_scores"):
        assert getattr(causal, name) is getattr(patching, name), name
        assert name in causal.__all__
    assert causal.Condition is selection.Condition and causal.SELECTIONS is selection.SELECTIONS


def test_causal_keeps_the_names_of_its_split():
    """What ``ablation_hooks.py`` (an ablation's hooks per trial) and ``answering.py`` (one trial
    answered and graded) took over from ``causal`` still answers there, as the same object."""
    owners = {
        ablation_hooks: "ablation_hooks resample_sources _Recordings _check_mode _needle_key "
        "_haystack_key",
        answering: "TASKS answer_trial _run_trial _task _hops _grade _budget _context_text",
    }
    for owner, names in owners.items():
        for name in names.split():
            assert getattr(causal, name) is getattr(owner, name), name
    for name in ("ablation_hooks", "resample_sources", "answer_trial", "TASKS"):
        assert name in causal.__all__


@pytest.mark.parametrize("name", ["control_sweep", "ControlSweep", "fact_trials", "chain_trials"])
def test_the_tiny_controls_say_where_they_went(name):
    assert hasattr(controls, name)
    with pytest.raises(AttributeError, match=rf"causal\.{name} moved to retrieval_heads\.tiny"):
        getattr(causal, name)
    assert name not in causal.__all__


def test_causal_modules_load_without_the_tiny_world():
    code = (
        "import sys, retrieval_heads.selection, retrieval_heads.causal, retrieval_heads.patching\n"
        "import retrieval_heads.ablation_hooks, retrieval_heads.answering\n"
        "print(sorted(m for m in sys.modules if m.startswith('retrieval_heads.tiny')))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def test_selection_never_imports_torch():
    code = "import sys, retrieval_heads.selection\nprint('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"
