"""The trials package's shape: ``retrieval_heads.haystack`` still answers with every name it
exported, and only the one seam (``retrieval_heads.trials.world_trials``) reaches into the
embedded model's world."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import retrieval_heads
import retrieval_heads.haystack as old
from retrieval_heads import trials
from retrieval_heads.tiny import trials as tiny_trials

ROOT = Path(retrieval_heads.__file__).parent
# Modules outside tiny/ that may import retrieval_heads.tiny: the seam make_trials dispatches
# through, and the registry (it names the embedded models). The tiny-world controls live in
# tiny/controls.py; patching.py reaches the world's prompts through the seam.
ALLOWED = {"trials/__init__.py", "registry.py"}


def test_the_haystack_module_keeps_its_names():
    for name in old.__all__:
        owner = tiny_trials if name.startswith("tiny_") else trials
        assert getattr(old, name) is getattr(owner, name), name
    assert old.tiny_grid is tiny_trials.tiny_grid
    assert old.check_trial_tokens is trials.check_trial_tokens
    assert old.DATA_DIR == ROOT / "data" and old.FILLER_PATH.is_file()
    names: dict = {}
    exec("from retrieval_heads.haystack import *", names)
    assert set(old.__all__) <= set(names)


def test_trial_modules_load_without_the_tiny_world():
    code = (
        "import sys, retrieval_heads.haystack, retrieval_heads.trials\n"
        "print(sorted(m for m in sys.modules if m.startswith('retrieval_heads.tiny')))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def test_only_the_seam_imports_the_tiny_world():
    importers = set()
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("tiny/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            if any(
                m == "retrieval_heads.tiny" or m.startswith("retrieval_heads.tiny.")
                for m in modules
            ):
                importers.add(rel)
    assert importers <= ALLOWED, importers - ALLOWED
    assert "trials/__init__.py" in importers
