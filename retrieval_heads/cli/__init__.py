"""The ``retrieval-heads`` command: parse, call the library, print. No logic the library lacks.

Subcommands: ``detect``, ``ablate``, ``compare-detectors``, ``patch``, ``kv-sim``, ``report``, ``compare``, ``export``,
``merge``, ``models``. ``detect``, ``ablate`` and ``kv-sim`` run a share of the sweep with
``--shard i/N`` or under ``torchrun`` (``retrieval_heads.sharding``).

Errors a user can fix (bad input, a model that is not there, results from another run) print one
short message and exit 2; nothing already written is touched. A failure of the machine (a full
disk, an I/O error) prints one line and exits 1, as does a run that produced no result
(no trial passed). The catalogue of errors is in ``docs/errors.md``.

This package: :mod:`.options` (what each option's text may be), :mod:`.parser` (the option
groups and one subparser per command), :mod:`.inputs` (the model, the trial grid and the
``--scores`` a run starts from), :mod:`.commands` (each command); here, ``main`` runs one and
turns its errors into exit codes. The names the single ``cli.py`` module had are importable
from here as before, but for ``load``: patch ``retrieval_heads.cli.inputs.load``, which every
command calls.
"""

from __future__ import annotations

import sys

from retrieval_heads.cli.commands import cmd_ablate as cmd_ablate
from retrieval_heads.cli.commands import cmd_compare as cmd_compare
from retrieval_heads.cli.commands import cmd_compare_detectors as cmd_compare_detectors
from retrieval_heads.cli.commands import cmd_detect as cmd_detect
from retrieval_heads.cli.commands import cmd_export as cmd_export
from retrieval_heads.cli.commands import cmd_kv_sim as cmd_kv_sim
from retrieval_heads.cli.commands import cmd_merge as cmd_merge
from retrieval_heads.cli.commands import cmd_models as cmd_models
from retrieval_heads.cli.commands import cmd_patch as cmd_patch
from retrieval_heads.cli.commands import cmd_report as cmd_report
from retrieval_heads.cli.commands import print_kv_sim as print_kv_sim
from retrieval_heads.cli.commands import print_merged as print_merged
from retrieval_heads.cli.commands import print_top as print_top
from retrieval_heads.cli.commands import sharded as sharded
from retrieval_heads.cli.inputs import model_and_scores as model_and_scores
from retrieval_heads.cli.inputs import run_config as run_config
from retrieval_heads.cli.inputs import trials_for as trials_for
from retrieval_heads.cli.options import _INT as _INT
from retrieval_heads.cli.options import _NUMBER as _NUMBER
from retrieval_heads.cli.options import _any_int as _any_int
from retrieval_heads.cli.options import _batch_size as _batch_size
from retrieval_heads.cli.options import _device_map as _device_map
from retrieval_heads.cli.options import _floats as _floats
from retrieval_heads.cli.options import _fraction as _fraction
from retrieval_heads.cli.options import _int_list as _int_list
from retrieval_heads.cli.options import _integer as _integer
from retrieval_heads.cli.options import _ints as _ints
from retrieval_heads.cli.options import _Listed as _Listed
from retrieval_heads.cli.options import _max_memory as _max_memory
from retrieval_heads.cli.options import _model_name as _model_name
from retrieval_heads.cli.options import _non_negative_int as _non_negative_int
from retrieval_heads.cli.options import _path as _path
from retrieval_heads.cli.options import _positive_int as _positive_int
from retrieval_heads.cli.options import _positive_ints as _positive_ints
from retrieval_heads.cli.options import _scorer_names as _scorer_names
from retrieval_heads.cli.options import _shard as _shard
from retrieval_heads.cli.parser import SHARD_HELP as SHARD_HELP
from retrieval_heads.cli.parser import _add_model_args as _add_model_args
from retrieval_heads.cli.parser import _add_trial_args as _add_trial_args
from retrieval_heads.cli.parser import build_parser as build_parser

USER_ERRORS = (ValueError, KeyError, FileNotFoundError, PermissionError, IsADirectoryError)


COMMANDS = {
    "detect": sharded(cmd_detect),
    "ablate": sharded(cmd_ablate),
    "compare-detectors": cmd_compare_detectors,
    "patch": cmd_patch,
    "kv-sim": sharded(cmd_kv_sim),
    "report": cmd_report,
    "compare": cmd_compare,
    "export": cmd_export,
    "merge": cmd_merge,
    "models": cmd_models,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished trials are saved; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"retrieval-heads {args.command}: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # DetectionError and friends: a result, not a crash
        print(f"retrieval-heads {args.command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the machine, not the input: a full disk, an I/O error
        print(f"retrieval-heads {args.command}: error: {exc}", file=sys.stderr)
        return 1
