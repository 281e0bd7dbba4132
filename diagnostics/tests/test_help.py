"""Every diagnostic script starts as documented (`python -m diagnostics.<name> --help` from the repository)."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["activation_memory", "bench_so2", "ds_step_ops", "first_compiles", "gc_cost", "recipe_parity", "shape_buckets", "step_profile"])
def test_help(name):
    proc = subprocess.run([sys.executable, "-m", f"diagnostics.{name}", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "usage" in proc.stdout, proc.stderr[-2000:]
