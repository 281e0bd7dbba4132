"""`eqv2 <verb>`: the console script lists its verbs, refuses an unknown one in one line, and runs a verb."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eqv2 import cli

REPO = Path(__file__).resolve().parents[1]


def _eqv2(*args: str) -> subprocess.CompletedProcess:
    # the installed console script where there is one (pip install -e .), else the module it runs
    exe = shutil.which("eqv2", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "eqv2.cli"]
    return subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_help_lists_every_verb_with_an_example():
    proc = _eqv2("--help")
    assert proc.returncode == 0, proc.stderr
    for verb, (_, _, example) in cli.VERBS.items():
        assert f"  {verb}" in proc.stdout and example in proc.stdout


def test_no_verb_prints_the_usage_and_fails():
    proc = _eqv2()
    assert proc.returncode == 2 and "usage: eqv2 <verb>" in proc.stderr


def test_unknown_verb_is_one_line_with_a_suggestion():
    proc = _eqv2("plott")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "eqv2: unknown verb 'plott' (did you mean 'plot'?)"


@pytest.mark.parametrize("verb", sorted(cli.VERBS))
def test_each_verb_has_help(verb):
    proc = _eqv2(verb, "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"usage: eqv2 {verb}" in proc.stdout
