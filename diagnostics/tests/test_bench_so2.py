"""diagnostics/bench_so2.py: the SO(2) convolution micro-benchmark runs and names a bad Inductor option."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_so2_microbenchmark_tool_runs_and_reports(tmp_path):
    """diagnostics/bench_so2.py (the A/B bench for the SO(2) convolution's kernels) runs a variant with an
    Inductor option and writes its timing; an unknown Inductor key stops it with the key's name."""
    out = tmp_path / "so2.json"
    cmd = [sys.executable, "-m", "diagnostics.bench_so2", "--edges", "200", "--iters", "1", "--channels", "4",
           "--hidden", "4", "--lmax", "2", "--mmax", "1", "--variants", "static", "rotation-aligned", "--input-dtype", "bf16",
           "--inductor", "max_pointwise_cat_inputs=3", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in results] == ["static", "rotation-aligned"]
    assert all("error" not in r and r["us_per_fwd_bwd"] > 0 for r in results), results
    bad = subprocess.run(cmd[:-2] + ["--inductor", "no_such_key=1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode != 0 and "no_such_key" in bad.stderr
