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
    # OUT_NAME=RAW_SUBDIR entries; the first one nested, as in "all_md/train=all_md"
    outputs = {f"s2ef/{splits[0]}": splits[0], **{name: name for name in splits[1:]}}
    entries = [f"{out}={raw_name}" if out != raw_name else out for out, raw_name in outputs.items()]
    job = submit("slurm/shard_oc20.sh", tmp_path,
                 [f"--array=0-{len(entries) - 1}", "--cpus-per-task=2", "--time=5"],
                 {"SPLITS": " ".join(entries), "SHARD_ARGS": " ".join(SHARD_ARGS)},
                 script_args=(str(raw), str(tmp_path / "array")))
    jobs.append(job)
    job.wait(timeout=180)
    logs = job.logs()
    assert len(list(tmp_path.glob("eqv2-shard-*_*.out"))) == len(entries), f"one log per array task expected\n{logs}"

    for out, raw_name in outputs.items():
        serial = tmp_path / "serial" / out
        subprocess.run([sys.executable, "-m", "eqv2", "shard", str(raw / raw_name), str(serial),
                        "--prefix", out.replace("/", "_"), "--workers", "1", "--no-progress", *SHARD_ARGS],
                       check=True, cwd=REPO, timeout=300)
        array_out = _tree(tmp_path / "array" / out)
        serial_out = _tree(serial)
        assert any(name.endswith(".tar") for name in serial_out), f"serial tool wrote no shards for {raw_name}"
        assert sorted(array_out) == sorted(serial_out), f"{out}: file lists differ\n{logs}"
        for name, data in serial_out.items():
            assert array_out[name] == data, f"{out}/{name} differs between the array task and the serial tool"
