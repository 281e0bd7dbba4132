"""`eqv2 plot RUN_DIR` on a real run directory (the demo run of tests/train/conftest.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

from eqv2.plot import main, read_metrics  # noqa: E402


def test_plot_writes_the_curves_of_a_run(demo_run, tmp_path):
    out = tmp_path / "plots"
    assert main([str(demo_run), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["loss.png", "lr.png", "throughput.png", "validation.png"]
    for path in out.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    train, evals = read_metrics(demo_run)
    assert [r["step"] for r in train] == sorted({r["step"] for r in train})
    assert evals and all(recs for recs in evals.values())


def test_plot_of_a_resumed_run_keeps_one_record_per_step(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 2.5}, {"step": 2, "split": "val",
             "energy_mae": 1.0, "forces_mae": 0.1}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    train, evals = read_metrics(run)
    assert [r["loss"] for r in train] == [3.0, 2.5] and len(evals["val"]) == 1


@pytest.mark.parametrize("content, message", [(None, "metrics.jsonl: not found"),
                                              ('{"step": 1}\nnot json\n', "metrics.jsonl line 2: not a metrics record"),
                                              ("", "no records yet")])
def test_plot_of_a_bad_run_dir_is_one_line(tmp_path, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    proc = subprocess.run([sys.executable, "-m", "eqv2.plot", str(run)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
