"""slurm/shard_oc20.sh: the job array writes exactly what the serial tool writes, split by split."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm.conftest import REPO, submit

pytestmark = pytest.mark.slurm

SHARD_ARGS = ["--shard-samples", "30", "--subtract-reference"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shard_array_matches_serial_tool(slurm_cluster, demo_raw, tmp_path, jobs):
    raw = demo_raw / "raw"
    splits = sorted(p.name for p in raw.iterdir() if p.is_dir())
    assert len(splits) >= 2, f"demo raw layout has splits {splits}; the array test needs two"
    job = submit("slurm/shard_oc20.sh", tmp_path,
                 [f"--array=0-{len(splits) - 1}", "--cpus-per-task=2", "--time=5"],
                 {"SPLITS": " ".join(splits), "SHARD_ARGS": " ".join(SHARD_ARGS)},
                 script_args=(str(raw), str(tmp_path / "array")))
    jobs.append(job)
    job.wait(timeout=180)
    logs = job.logs()
    assert len(list(tmp_path.glob("eqv2-shard-*_*.out"))) == len(splits), f"one log per array task expected\n{logs}"

    for split in splits:
        serial = tmp_path / "serial" / split
        subprocess.run([sys.executable, "tools/shard_extxyz.py", str(raw / split), str(serial), "--prefix", split,
                        "--workers", "1", "--no-progress", *SHARD_ARGS], check=True, cwd=REPO, timeout=300)
        array_out = _tree(tmp_path / "array" / split)
        serial_out = _tree(serial)
        assert any(name.endswith(".tar") for name in serial_out), f"serial tool wrote no shards for {split}"
        assert sorted(array_out) == sorted(serial_out), f"{split}: file lists differ\n{logs}"
        for name, data in serial_out.items():
            assert array_out[name] == data, f"{split}/{name} differs between the array task and the serial tool"
