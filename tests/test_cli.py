"""`enecg --help` and `--help` on every sub-command (walked from the parser, so new commands are covered)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from enecg.cli import build_parser, main


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.extend(_command_paths(sub, (*prefix, name)))
    return paths


COMMANDS = _command_paths(build_parser())


def test_every_issue_command_is_registered() -> None:
    top = {path[0] for path in COMMANDS if path}
    assert {"data", "experts", "train", "evaluate", "predict", "push", "pretrain", "quickstart", "efficiency",
            "transfer"} <= top
    assert ("data", "prepare", "ptbxl") in COMMANDS and ("experts", "check") in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "enecg")
def test_help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: enecg") and "-h, --help" in out


def test_console_script_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "enecg.cli", "--help"], capture_output=True, text=True,
                            timeout=120, check=True)
    assert "COMMAND" in result.stdout
