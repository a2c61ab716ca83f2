"""The `nezha` command's parser: every subcommand registered from its own module, each with --help."""

from __future__ import annotations

import pytest

from nezha.cli import SUBCOMMANDS, build_parser, main


def test_every_subcommand_module_registers_its_command():
    parser = build_parser()
    names = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 (argparse keeps them there)
    assert names == {m.replace("_", "-") for m in SUBCOMMANDS}


@pytest.mark.parametrize("argv", [["train", "--help"], ["experiment", "--help"], ["bench", "latency", "--help"],
                                  ["catalog", "--help"], ["quickstart", "--help"],
                                  ["diagnose", "--help"]])
def test_help_exits_cleanly(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 0 and "usage: nezha" in capsys.readouterr().out


def test_a_config_error_is_one_line_not_a_traceback(capsys):
    assert main(["train", "--transition", "transformer"]) == 2
    err = capsys.readouterr().err
    assert "transition: unknown transition 'transformer'" in err and "Traceback" not in err
