"""Every benchmark script starts as documented (`python -m bench.<name> --help` from the repository)."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["run", "model", "bench_data", "scaling", "make_oc20_sized_data", "lbfgs_step",
                                  "lbfgs_accuracy"])
def test_help(name):
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "usage" in proc.stdout, proc.stderr[-2000:]
