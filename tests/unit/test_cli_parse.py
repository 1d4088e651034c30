"""The command line's parsing of list options and of the chat switch, and the model listing."""

from __future__ import annotations

import pytest

from retrieval_heads import cli, registry


@pytest.mark.parametrize(
    "given",
    [
        ["--lengths", "1000,2000,4000"],
        ["--lengths", "1000", "2000", "4000"],
        ["--lengths", "1000,", "2000", "4000"],
        ["--lengths", "1000", "2000,4000"],
    ],
)
def test_list_options_take_commas_or_spaces(given):
    args = cli.build_parser().parse_args(["detect", "--out", "x", *given, "--depths", "0", "50"])
    assert args.lengths == [1000, 2000, 4000]
    assert args.depths == [0.0, 50.0]


def test_list_options_keep_refusing_garbage(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["detect", "--out", "x", "--lengths", "1000", "lots"])
    assert exc.value.code == 2
    assert "expected comma-separated integers, got 'lots'" in capsys.readouterr().err


def test_top_k_with_spaces_and_a_following_option():
    args = cli.build_parser().parse_args(
        ["ablate", "--scores", "s", "--out", "o", "--top-k", "0", "2", "6", "--random", "2"]
    )
    assert args.top_k == [0, 2, 6] and args.random == 2


def test_chat_is_a_three_way_switch():
    parse = cli.build_parser().parse_args
    assert parse(["detect", "--out", "x"]).chat is None  # the registry decides
    assert parse(["detect", "--out", "x", "--chat"]).chat is True
    assert parse(["detect", "--out", "x", "--no-chat"]).chat is False


def test_the_instruct_model_chats_by_default():
    assert registry.default_chat("smollm2-135m-instruct") is True
    assert registry.default_chat("gemma-3-270m") is False
    assert registry.default_chat("tiny") is False
    assert registry.default_chat("/some/folder") is False


def test_models_lists_every_entry_with_its_state(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    for name in registry.names():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert registry.state(name) in line
    assert "tiny " in out and "shipped" in out
    assert ".gguf file" in out
