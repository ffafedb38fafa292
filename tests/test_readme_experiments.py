"""The README's table of the paper's experiments: every command in it is one the tools
accept as written (settings resolved, sweeps planned, evaluator options parsed); the data
and teacher files they name are the user's to make."""

from __future__ import annotations

import re
import shlex

import pytest

from fastibd.eval.evaluate import build_parser as evaluate_parser
from fastibd.train.settings import load_settings
from fastibd.train.sweep import build_parser as sweep_parser
from fastibd.train.sweep import check_settings, plan
from tests.conftest import REPO


def experiment_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("### The paper's experiments, one command each", 1)[1]
    table = section.split("\n\n", 2)[2].split("\n\n", 1)[0]
    commands = re.findall(r"`(python -m fastibd\.[a-z]+ [^`]+)`", table)
    assert len(commands) >= 10, commands
    return commands


@pytest.mark.parametrize("command", experiment_commands())
def test_every_experiment_command_is_accepted(command: str) -> None:
    tool, *argv = shlex.split(command)[2:]
    if tool == "fastibd.train":
        load_settings(argv)
    elif tool == "fastibd.sweep":
        args, overrides = sweep_parser().parse_known_args(argv)
        runs = plan(args.grid, args.out)
        assert len(runs) >= 2
        check_settings(runs, ["--cfg", args.cfg, *overrides])
    elif tool == "fastibd.evaluate":
        evaluate_parser().parse_args(argv)
    elif tool == "fastibd.report":
        assert argv == ["runs/cifar10_rn18"]
    else:
        raise AssertionError(f"unknown tool in the README table: {tool}")
