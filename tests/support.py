"""Shared by tests that start the real CLI as a subprocess (tests/ is on sys.path via conftest)."""

import os

# Offline, quiet and one thread: on shared cores, spinning OpenMP threads make the tiny model many
# times slower, and the results are the same bytes either way.
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment with ``QUIET_ENV`` and ``extra`` on top."""
    return {**os.environ, **QUIET_ENV, **extra}
