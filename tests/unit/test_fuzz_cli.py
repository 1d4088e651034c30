"""Fuzzing the command line's parser: every option of every subcommand, given a value of the
wrong type, sign, emptiness or range, is refused with exit 2 and a message naming the option,
or means what it says.

``CASES`` holds, per subcommand and option (its ``dest``), values and what each must give:

* ``NO``: ``build_parser().parse_args`` exits with 2, and stderr says ``argument --option: ...``;
* ``Later(row, value)``: the parser passes ``value`` on, and a check after parsing refuses it
  with exit 2 and its own message: the row of the catalogue in ``docs/errors.md``, whose test
  is in ``tests/integration/test_errors.py`` (these run the command; here only the parser runs);
* anything else: the value the option parses to.

An option added to the parser without cases here fails ``test_every_option_has_fuzz_cases``,
and one whose cases lack a kind of bad value its type should refuse fails
``test_every_option_is_fuzzed_with_the_bad_values_of_its_kind``. Only the parser runs: no model
is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from retrieval_heads import cli
from retrieval_heads.sharding import Shard

REPO = Path(__file__).resolve().parents[2]
CATALOGUE = REPO / "docs" / "errors.md"
ERROR_TESTS = REPO / "tests" / "integration" / "test_errors.py"


class _Refused:
    def __repr__(self) -> str:
        return "NO"


NO = _Refused()


@dataclass(frozen=True)
class Later:
    """Passed on by the parser; refused after parsing by the check of catalogue row ``row``."""

    row: str
    value: Any


# ---- the cases ---------------------------------------------------------------------------------

NOT_AN_INT = ["x", "1.5", "1e3", "0x10", "1_000", "\u0663", "nan", "", " ", ",", "1,2"]


def ints(*meant: tuple[str, Any]) -> list[tuple[Any, Any]]:
    """An integer option: the values no integer option takes, then ``meant``."""
    return [*((v, NO) for v in NOT_AN_INT), *meant]


def positive() -> list[tuple[Any, Any]]:
    return ints(("0", NO), ("-1", NO), ("1", 1), (" 12 ", 12), ("+7", 7))


def non_negative() -> list[tuple[Any, Any]]:
    return ints(("-1", NO), ("0", 0), ("3", 3))


NOT_AN_INT_LIST = ["", " ", ",", " , ", "x", "1.5", "1,x", "1;2", "1 2", "nan", "1e3", "0x10"]


def int_list(*meant: tuple[Any, Any]) -> list[tuple[Any, Any]]:
    return [*((v, NO) for v in NOT_AN_INT_LIST), *meant]


def positive_list(option: str) -> list[tuple[Any, Any]]:
    return int_list(
        ("0", NO),
        ("-5", NO),
        ("10,-5", NO),
        ("10,0", NO),
        ([option, "-5,10"], NO),  # not a negative number to argparse: a missing value
        ("1000,2000", [1000, 2000]),
        ("1000,", [1000]),
        ("1000,,2000", [1000, 2000]),
        ([option, "1000", "2000,4000"], [1000, 2000, 4000]),
    )


PATH = [("", NO), (" ", NO), ("runs/a", Path("runs/a")), ("a b", Path("a b"))]
MODEL_NAME = [
    ("", NO),
    ("  ", NO),
    ("tiny", "tiny"),
    ("no-such-model", Later("E01", "no-such-model")),
    ("./no/such/model", Later("E03", "./no/such/model")),
]
CHOICE = [("", NO), ("bogus", NO), ("ALL", NO), ("decode", "decode"), ("all", "all")]
SHARD = [
    ("", NO),
    ("x/2", NO),
    ("1-2", NO),
    ("1.5/2", NO),
    ("-1/2", NO),
    ("2/2", NO),
    ("0/0", NO),
    ("0/-1", NO),
    ("1/2", Shard(1, 2)),
    (" 0 / 4 ", Shard(0, 4)),
]

MODEL = {
    "model": MODEL_NAME,
    "device": [
        ("", Later("E11", "")),
        ("tpu", Later("E11", "tpu")),
        ("cuda:99", Later("E11", "cuda:99")),
        ("cpu", "cpu"),
    ],
    "dtype": [
        ("", Later("E10", "")),
        ("float8", Later("E10", "float8")),
        ("bfloat16", "bfloat16"),
    ],
    "n_ctx": ints(("0", Later("E12", 0)), ("-1", Later("E12", -1)), ("512", 512)),
    "trust_remote_code": [
        (["--trust-remote-code"], True),
        (["--trust-remote-code=x"], NO),
        (["--trust-remote-code="], NO),
    ],
    "device_map": [
        ("", NO),
        ("everywhere", NO),
        ("{}", NO),
        ("[1]", NO),
        ('"auto"', NO),
        ("{model: cpu}", NO),
        ("auto", "auto"),
        ('{"model.layers.0": 0}', {"model.layers.0": 0}),
        ('{"model.layers.0": 1.5}', Later("E45", {"model.layers.0": 1.5})),
    ],
    "n_devices": ints(("0", Later("E45", 0)), ("-1", Later("E45", -1)), ("2", 2)),
    "max_memory": [
        ("", NO),
        (",", NO),
        ("0:70GiB", NO),
        ("0=", NO),
        ("=70GiB", NO),
        ("{}", NO),
        ("[1]", NO),
        ("{bad", NO),
        ("0=70GiB,cpu=200GiB", {0: "70GiB", "cpu": "200GiB"}),
        ('{"1": "8GiB"}', {1: "8GiB"}),
    ],
}

TRIAL = {
    "lengths": positive_list("--lengths"),
    "min_length": positive(),
    "max_length": positive(),
    "n_lengths": positive(),
    "depths": [
        *(
            (v, NO)
            for v in ("", " ", ",", "x", "0,half", "nan", "inf", "-inf", "1e999", "0,nan", "1_0")
        ),
        ("0,50,100", [0.0, 50.0, 100.0]),
        ("12.5", [12.5]),
        ("1e1", [10.0]),
        (["--depths", "0", "50"], [0.0, 50.0]),
        ("150", Later("E15", [150.0])),
        ("-5", Later("E15", [-5.0])),
    ],
    "n_depths": positive(),
    "needles": PATH,
    "n_needles": positive(),
    "n_distractors": non_negative(),  # 0: no distractors
    "haystack": PATH,
    "chat": [
        (["--chat"], True),
        (["--no-chat"], False),
        (["--chat=x"], NO),
        (["--no-chat=1"], NO),
    ],
    "seed": non_negative(),  # a negative seed would give seed 1's needles (random.Random(-1))
    "max_new_tokens": positive(),
    "batch_size": ints(("0", NO), ("-1", NO), ("1", 1), ("8", 8), ("auto", None), ("AUTO", NO)),
}

CASES: dict[str, dict[str, list[tuple[Any, Any]]]] = {
    "detect": {
        **MODEL,
        **TRIAL,
        "out": PATH,
        "top": positive(),
        "shard": SHARD,
        "scorers": [
            ("", NO),
            (",", NO),
            ("bogus", NO),
            ("write,bogus", NO),
            ("retrieval", NO),  # always runs: not an extra scorer
            ("write", ["write"]),
            ("write,query_focused", ["write", "query_focused"]),
            (["--scorers", "query_focused", "write"], ["query_focused", "write"]),
        ],
    },
    "ablate": {
        **MODEL,
        **TRIAL,
        "scores": PATH,
        "top_k": int_list(
            ("0", [0]),  # the unmasked baseline
            ("0,2,6", [0, 2, 6]),
            (["--top-k", "0", "2,6"], [0, 2, 6]),
            ("100", [100]),  # clipped to the model's heads, with a note (E25)
            ("-1", Later("E26", [-1])),
        ),
        "random": ints(("0", Later("E26", 0)), ("-1", Later("E26", -1)), ("1", 1)),
        "mode": [("", Later("E27", "")), ("bogus", Later("E27", "bogus")), ("zero", "zero")],
        "phase": CHOICE,
        "out": PATH,
        "shard": SHARD,
    },
    "compare-detectors": {
        **MODEL,
        **TRIAL,
        "scores": PATH,
        "top_k": positive_list("--top-k"),  # K > 0: the baseline always runs
        "random": positive(),
        "patterns": [
            (["--patterns"], True),
            (["--no-patterns"], False),
            (["--patterns=x"], NO),
            (["--no-patterns=1"], NO),
        ],
        "mode": [("", NO), ("bogus", NO), ("ZERO", NO), ("zero", "zero"), ("mean", "mean")],
        "out": PATH,
    },
    "patch": {
        **MODEL,
        "pairs": ints(
            ("0", Later("E52", 0)), ("-1", Later("E52", -1)), ("-3", Later("E52", -3)), ("2", 2)
        ),
        "length": positive(),
        "seed": non_negative(),
        "scores": PATH,
        "out": PATH,
        "batch_size": TRIAL["batch_size"],
    },
    "kv-sim": {
        **MODEL,
        **TRIAL,
        "scores": PATH,
        "out": PATH,
        "sink": ints(("-1", Later("E47", -1)), ("0", 0), ("4", 4)),  # 0: no sink tokens
        "window": ints(("0", Later("E47", 0)), ("-1", Later("E47", -1)), ("16", 16)),
        "top_k": int_list(
            ("0", [0]),
            ("0,1,2,4", [0, 1, 2, 4]),
            ("-1", Later("E47", [-1])),
            ("0,40", Later("E47", [0, 40])),
        ),
        "random": ints(("-1", Later("E47", -1)), ("0", 0), ("2", 2)),  # 0: no random draws
        "uniform_windows": positive_list("--uniform-windows"),
        "phase": CHOICE,
        "reduce": [("", NO), ("bogus", NO), ("MAX", NO), ("max", "max"), ("mean", "mean")],
        "tolerance": [
            *((v, NO) for v in ("", " ", "x", ",", "nan", "inf", "-inf", "-0.1", "2", "1.01")),
            ("0", 0.0),
            ("0.05", 0.05),
            (".5", 0.5),
            ("1", 1.0),
        ],
        "shard": SHARD,
    },
    "report": {
        "dirs": [("", NO), (" ", NO), ("runs/a", [Path("runs/a")])],
        "out": PATH,
        "model": MODEL_NAME,
    },
    "compare": {"a": PATH, "b": PATH, "k": positive()},
    "export": {"results": PATH, "out": PATH},
    "merge": {"dir": PATH, "top": positive()},
    "models": {},
}


# ---- running a case ----------------------------------------------------------------------------

PARSER = cli.build_parser()


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def fuzzed_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


COMMANDS = subparsers(PARSER)


def action_of(command: str, dest: str) -> argparse.Action:
    (action,) = (a for a in fuzzed_actions(COMMANDS[command]) if a.dest == dest)
    return action


def argv_for(command: str, dest: str, value: Any) -> list[str]:
    """The command line with the required arguments and ``value`` for ``dest`` (``--opt=value``
    for an option, so that a value like ``-5,10`` reaches its type; a list is taken as is)."""
    target = action_of(command, dest)
    argv = [command]
    for action in fuzzed_actions(COMMANDS[command]):
        if action is target:
            if not action.option_strings:
                argv.append(value)
            continue
        if not action.option_strings:
            argv.append("p")
        elif action.required:
            argv.append(f"{action.option_strings[0]}=req")
    if target.option_strings:
        argv += value if isinstance(value, list) else [f"{target.option_strings[0]}={value}"]
    return argv


def parse(argv: list[str]) -> tuple[argparse.Namespace | None, str]:
    """``(namespace, "")``, or ``(None, stderr)`` when the parser exits (with 2: asserted)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return PARSER.parse_args(argv), ""
        except SystemExit as exc:
            assert exc.code == 2, (argv, exc.code, err.getvalue())
    return None, err.getvalue()


def option_name(action: argparse.Action) -> str:
    """How argparse names the option in its messages."""
    return "/".join(action.option_strings) or action.metavar or action.dest


def check(command: str, dest: str, value: Any, expected: Any) -> None:
    argv = argv_for(command, dest, value)
    args, err = parse(argv)
    if expected is NO:
        assert args is None, f"{argv} was accepted: {dest} = {getattr(args, dest)!r}"
        message = err.strip().splitlines()[-1]
        assert f"error: argument {option_name(action_of(command, dest))}: " in message, (
            argv,
            err,
        )
        assert "Traceback" not in err
        return
    assert args is not None, f"{argv} was refused: {err}"
    meant = expected.value if isinstance(expected, Later) else expected
    got = getattr(args, dest)
    assert got == meant and type(got) is type(meant), (argv, got, meant)
    if isinstance(meant, list):
        assert all(type(x) is type(y) for x, y in zip(got, meant, strict=True)), (argv, got)


# ---- the tests ---------------------------------------------------------------------------------


def test_every_option_has_fuzz_cases():
    assert set(COMMANDS) == set(CASES), "a subcommand without fuzz cases (or cases of none)"
    for command, sub in COMMANDS.items():
        dests = {a.dest for a in fuzzed_actions(sub)}
        assert dests == set(CASES[command]), (
            f"{command}: options without fuzz cases: {sorted(dests - set(CASES[command]))}; "
            f"cases of no option: {sorted(set(CASES[command]) - dests)}"
        )
        for dest in dests:
            assert CASES[command][dest], f"{command} {dest}: no cases"


def _values(command: str, dest: str) -> set[str]:
    return {v for v, _ in CASES[command][dest] if isinstance(v, str)}


KINDS = {
    # the type of an option -> the bad values its cases must hold (refused or Later)
    cli._any_int: {"x", "1.5", "", ",", "-1"},
    cli._positive_int: {"x", "1.5", "", ",", "-1", "0"},
    cli._non_negative_int: {"x", "1.5", "", ",", "-1"},
    cli._ints: {"x", "1.5", "", ",", "-1"},
    cli._positive_ints: {"x", "1.5", "", ",", "-5", "0", "10,-5"},
    cli._floats: {"x", "", ",", "nan", "inf", "150", "-5"},
    cli._fraction: {"x", "", "nan", "-0.1", "2"},
    cli._path: {"", " "},
    cli._model_name: {"", " " * 2},
    cli._shard: {"", "x/2", "-1/2", "2/2", "0/0"},
    cli._device_map: {"", "{}", "everywhere"},
    cli._max_memory: {"", ",", "{}"},
    cli._batch_size: {"x", "1.5", "", ",", "-1", "0", "AUTO"},
    cli._scorer_names: {"", ",", "bogus"},
}


def test_every_option_is_fuzzed_with_the_bad_values_of_its_kind():
    for command, sub in COMMANDS.items():
        for action in fuzzed_actions(sub):
            cases = CASES[command][action.dest]
            if action.nargs == 0:  # a switch: given alone, and given a value it cannot take
                given = {v[0]: e for v, e in cases if isinstance(v, list) and len(v) == 1}
                for flag in action.option_strings:
                    assert flag in given, (command, flag)
                    assert any(v.startswith(f"{flag}=") and e is NO for v, e in given.items()), (
                        command,
                        flag,
                    )
                continue
            if action.choices is not None:
                need = {"", "bogus"}
            elif action.type is None:  # free text, checked later: at least the empty value
                need = {""}
            else:
                assert action.type in KINDS, f"{command} {action.dest}: a type without fuzz kinds"
                need = KINDS[action.type]
            missing = need - _values(command, action.dest)
            assert not missing, f"{command} {option_name(action)}: no case for {sorted(missing)}"
            for value, expected in cases:  # every bad value is refused, or refused later
                if isinstance(value, str) and value in need:
                    assert expected is NO or isinstance(expected, Later), (command, value)


@pytest.mark.parametrize(
    ("command", "dest"),
    [(c, d) for c in CASES for d in CASES[c]],
    ids=[f"{c}:{d}" for c in CASES for d in CASES[c]],
)
def test_option_refuses_bad_values_or_means_what_it_says(command, dest):
    for value, expected in CASES[command][dest]:
        check(command, dest, value, expected)


def test_later_rows_are_in_the_catalogue_with_their_tests():
    doc = CATALOGUE.read_text(encoding="utf-8")
    tests = ERROR_TESTS.read_text(encoding="utf-8")
    rows = {e.row for c in CASES.values() for d in c.values() for _, e in d if isinstance(e, Later)}
    for row in sorted(rows):
        assert re.search(rf"^\| {row} \|.*\| `test_{row.lower()}_\w+` \|$", doc, re.M), row
        assert re.search(rf"^def test_{row.lower()}_\w+\(", tests, re.M), row


def test_the_parse_time_row_is_in_the_catalogue():
    doc = CATALOGUE.read_text(encoding="utf-8")
    (row,) = [line for line in doc.splitlines() if line.startswith("| E55 |")]
    assert "| CLI | 2 |" in row and "test_option_refuses_bad_values_or_means_what_it_says" in row


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["detect", "--out=o", "--n-depths=0"], "argument --n-depths: expected an integer >= 1, got '0'"),
        (["detect", "--out=o", "--n-needles=-1"], "argument --n-needles: expected an integer >= 1, got '-1'"),
        (["detect", "--out=o", "--n-distractors=-1"], "argument --n-distractors: expected an integer >= 0, got '-1'"),
        (["detect", "--out=o", "--max-new-tokens=0"], "argument --max-new-tokens: expected an integer >= 1, got '0'"),
        (["detect", "--out=o", "--seed=-1"], "argument --seed: expected an integer >= 0, got '-1'"),
        (["detect", "--out=o", "--seed=1.5"], "argument --seed: invalid int value: '1.5' (expected an integer >= 0)"),
        (["detect", "--out=o", "--lengths=,"], "argument --lengths: expected comma-separated integers, got ','"),
        (["detect", "--out=o", "--lengths=-5,10"], "argument --lengths: expected comma-separated integers >= 1, got -5 in '-5,10'"),
        (["detect", "--out=o", "--depths=0,1e999"], "argument --depths: expected comma-separated finite numbers, got '0,1e999'"),
        (["detect", "--out=o", "--min-length=-5"], "argument --min-length: expected an integer >= 1, got '-5'"),
        (["detect", "--out="], "argument --out: expected a path, got '' (an empty path would mean the current directory)"),
        (["detect", "--out=o", "--top=0"], "argument --top: expected an integer >= 1, got '0'"),
        (["detect", "--out=o", "--model="], "argument --model: expected a registry name, a model directory, a .gguf file or a hub id, got ''"),
        (["detect", "--out=o", "--max-memory={}"], "argument --max-memory: expected a JSON object {device: size} of at least one entry, got '{}'"),
        (["detect", "--out=o", "--device-map={}"], "argument --device-map: expected a JSON object {module: device} of at least one entry, got '{}'"),
        (["patch", "--out=o", "--length=0"], "argument --length: expected an integer >= 1, got '0'"),
        (["patch", "--out=o", "--batch-size=0"], "argument --batch-size: invalid batch size: '0' (expected 'auto' or an integer >= 1)"),
        (["kv-sim", "--scores=s", "--out=o", "--tolerance=2"], "argument --tolerance: expected a number from 0 to 1, got '2'"),
        (["kv-sim", "--scores=s", "--out=o", "--uniform-windows=0"], "argument --uniform-windows: expected comma-separated integers >= 1, got 0 in '0'"),
        (["compare", "a", "b", "--k=0"], "argument --k: expected an integer >= 1, got '0'"),
        (["merge", "d", "--top=-1"], "argument --top: expected an integer >= 1, got '-1'"),
        (["ablate", "--scores=s", "--out=o", "--phase=bogus"], "argument --phase: invalid choice: 'bogus'"),
        (["bogus"], "argument command: invalid choice: 'bogus'"),
    ],
)  # fmt: skip
def test_refusals_say_what_is_allowed(argv, message):
    args, err = parse(argv)
    assert args is None and message in err, err


def test_defaults_still_parse():
    """The defaults pass through the types that now guard them (argparse types string ones)."""
    args = PARSER.parse_args(["kv-sim", "--scores", "s", "--out", "o"])
    assert (args.model, args.seed, args.sink, args.window, args.tolerance) == (
        "tiny",
        0,
        4,
        64,
        0.05,
    )
    assert args.n_lengths == 5 and args.n_depths == 5 and args.n_distractors == 2
    args = PARSER.parse_args(["report", "d"])
    assert args.out == Path("report.html") and args.model is None


# ---- hypothesis: integer list options ----------------------------------------------------------

LIST_OPTIONS = [
    ("detect", "lengths", 1),
    ("ablate", "top_k", None),
    ("compare-detectors", "top_k", 1),
    ("kv-sim", "top_k", None),
    ("kv-sim", "uniform_windows", 1),
]


def meant_ints(text: str, low: int | None) -> list[int] | None:
    """What an integer list option should make of ``text``: ASCII integers between commas
    (blank pieces skipped), at least one, each ``>= low``; None where it should refuse."""
    pieces = [p.strip() for p in text.split(",") if p.strip()]
    if not pieces or not all(re.fullmatch(r"[+-]?[0-9]+", p) for p in pieces):
        return None
    values = [int(p) for p in pieces]
    return None if low is not None and min(values) < low else values


list_text = st.one_of(
    st.text(alphabet=st.sampled_from("0123456789,-+ ._ex\t\u0663\u00a0"), max_size=12),
    st.text(max_size=8),
    st.lists(st.integers(-(10**6), 10**6), max_size=4).map(lambda xs: ",".join(map(str, xs))),
    st.lists(st.integers(0, 99), min_size=1, max_size=4).map(lambda xs: " , ".join(map(str, xs))),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(LIST_OPTIONS), text=list_text)
@example(case=("detect", "lengths", 1), text=",")
@example(case=("detect", "lengths", 1), text="-5,10")
@example(case=("ablate", "top_k", None), text="-1")
@example(case=("kv-sim", "uniform_windows", 1), text="0")
@example(case=("detect", "lengths", 1), text="\u0663")
def test_integer_lists_are_refused_or_mean_the_text(case, text):
    command, dest, low = case
    args, err = parse(argv_for(command, dest, text))
    meant = meant_ints(text, low)
    if meant is None:
        assert args is None, f"{text!r} was accepted as {getattr(args, dest)!r}"
        assert f"argument {option_name(action_of(command, dest))}: " in err
    else:
        assert args is not None, f"{text!r} was refused: {err}"
        got = getattr(args, dest)
        assert got == meant and all(type(x) is int for x in got)
