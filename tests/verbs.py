"""Run `eqv2 <verb>` as a user does, in a real process (`python -m eqv2`, the console script's module,
from the repository root so that the checkout under test is the one imported)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def eqv2_cmd(*args) -> list[str]:
    """The command line of `eqv2 ARGS...`."""
    return [sys.executable, "-m", "eqv2", *map(str, args)]


def run_eqv2(*args, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    """Run `eqv2 ARGS...` to completion; with check, a failure shows its stderr's tail."""
    proc = subprocess.run(eqv2_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
