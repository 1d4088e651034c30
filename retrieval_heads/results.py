"""Results: the names ``results.py`` used to define, kept for ``from retrieval_heads.results import``.

This module once held the trial record, the head-score table, the results directory and the
published format. Each now has its own module, and this one only re-exports their public names,
so existing imports keep working; new code imports from the owner:

- :mod:`retrieval_heads.records` — :class:`TrialRecord`, one decoded trial: its parameters, what
  was generated, the grade, the per-scorer ``[layer][head]`` scores and the copy events
  ``(step, layer, head, key_position)``.
- :mod:`retrieval_heads.scores` — :class:`HeadScores`, one scorer's scores of every head over
  many trials, with statistics (the mean over *passing* trials, std, n, a bootstrap 95% CI, the
  mean over all trials, the per-trial scores), and ``MAX_RESAMPLES``.
- :mod:`retrieval_heads.published` — the published ``{"<layer>-<head>": [...]}`` format:
  :func:`import_published`, :func:`export_published`, :func:`dumps_published`,
  :func:`write_published`.
- :mod:`retrieval_heads.store` — the results directory on disk: :class:`ResultsDir` (written so
  that a killed run can be resumed), :func:`load_records`, :func:`read_meta`,
  :func:`load_results`; its lock is :mod:`retrieval_heads.lock`.
- :mod:`retrieval_heads.files` — what they all stand on: ``SCHEMA_VERSION``,
  ``HEAD_SCORES_SCHEMA``, ``RESULTS_SCHEMA``, the file names (``META_FILE``, ...),
  :class:`ResultsError`, :class:`ResultsLocked`, :func:`atomic_write_text`, :func:`provenance`,
  and the output guard (``OWNED_NAMES``, :func:`results_folder_of`, :func:`check_output_file`,
  :func:`check_output_folder`).

Nothing here computes attention or touches a model (no torch, no transformers).
"""

from __future__ import annotations

# Public names outside __all__ are imported "as" themselves: re-exported, as they were before.
from retrieval_heads.files import (
    HEAD_SCORES_SCHEMA,
    RESULTS_SCHEMA,
    SCHEMA_VERSION,
    ResultsError,
    ResultsLocked,
    atomic_write_text,
    check_output_file,
    check_output_folder,
    provenance,
)
from retrieval_heads.files import LOCK_FILE as LOCK_FILE
from retrieval_heads.files import META_FILE as META_FILE
from retrieval_heads.files import OWNED_NAMES as OWNED_NAMES
from retrieval_heads.files import SCORES_FILE as SCORES_FILE
from retrieval_heads.files import TRIALS_DIR as TRIALS_DIR
from retrieval_heads.files import TRIALS_FILE as TRIALS_FILE
from retrieval_heads.files import results_folder_of as results_folder_of
from retrieval_heads.published import (
    dumps_published,
    export_published,
    import_published,
    write_published,
)
from retrieval_heads.records import TrialRecord
from retrieval_heads.scores import MAX_RESAMPLES as MAX_RESAMPLES
from retrieval_heads.scores import HeadScores
from retrieval_heads.store import ResultsDir, load_records, load_results, read_meta

# The same list as before the split, so `from retrieval_heads.results import *` is unchanged.
__all__ = [
    "SCHEMA_VERSION",
    "HEAD_SCORES_SCHEMA",
    "RESULTS_SCHEMA",
    "ResultsError",
    "ResultsLocked",
    "TrialRecord",
    "HeadScores",
    "ResultsDir",
    "import_published",
    "export_published",
    "dumps_published",
    "write_published",
    "load_results",
    "load_records",
    "read_meta",
    "provenance",
    "atomic_write_text",
    "check_output_file",
    "check_output_folder",
]
