"""diagnostics/ds_step_ops.py: what DeepSpeed adds to a step per parameter tensor (docs/perf-notes.md, session 7)."""
import json
import subprocess
import sys

from tests.train.conftest import REPO


def test_contiguous_gradients_copy_every_gradient_once_more():
    settings = ['{"stage": 2, "overlap_comm": true, "contiguous_gradients": true}',
                '{"stage": 2, "overlap_comm": true, "contiguous_gradients": false}']
    proc = subprocess.run([sys.executable, "-m", "diagnostics.ds_step_ops", "--config", "31M", "--zero",
                           *settings], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2
    contiguous, plain = rows
    tensors = contiguous["parameter_tensors"]
    assert tensors == plain["parameter_tensors"] > 300  # 31M: one tensor per weight and bias
    copies = [dict(r["top_launching_ops"]).get("copy_", 0) for r in rows]
    # one copy per gradient into the contiguous bucket (and one for the bucket itself at the end)
    assert copies[0] - copies[1] in (tensors, tensors + 1), (copies, tensors)
    extra = contiguous["backward_extra_launches"] - plain["backward_extra_launches"]
    assert tensors <= extra <= tensors + 5, (extra, tensors)
    # step(): a cast and a norm per gradient in both (the global norm for clipping)
    assert contiguous["step_launches"] == plain["step_launches"] >= 2 * tensors


def _rows(*args):
    proc = subprocess.run([sys.executable, "-m", "diagnostics.ds_step_ops", "--config", "31M", *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_trainer_clipping_at_stage0_is_a_few_multi_tensor_operations():
    (ours,), (theirs,) = _rows("--zero", '{"stage": 0}'), _rows("--zero", '{"stage": 0}', "--deepspeed-clipping")
    tensors = ours["parameter_tensors"]

    def launches(row):  # without the CPU AdamW's reads of its step counters (on a GPU the fused AdamW has none)
        return row["step_launches"] - dict(row["top_launching_ops"]).get("_local_scalar_dense", 0)
    assert launches(theirs) >= 2 * tensors  # a norm and a scaling per gradient
    assert launches(ours) < 40, ours
