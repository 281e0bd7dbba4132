"""Shared fixtures for the trainer's end-to-end tests: the demo data and a way to run eqv2/train.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests.verbs import run_eqv2

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "eqv2" / "train.py"


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The real demo dataset (EMT slabs, sharded), built once per session (~10 s)."""
    out = tmp_path_factory.mktemp("demo_data")
    run_eqv2("demo-data", "--out", out, "--quiet", check=True)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_env(**extra: str) -> dict[str, str]:
    """The environment for launching `deepspeed` / `torchrun` as a user would: this interpreter's bin
    directory first on PATH (CI runs the venv's python without activating it), the repository importable,
    one thread per rank, no rank variables inherited from an enclosing launcher."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    path = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "PYTHONPATH": path,
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]), **extra}


def run_worker(worker: Path, nproc: int, args: list[str], timeout: float = 300) -> None:
    """Run a test worker script under torchrun on `nproc` CPU ranks; fails with its output if it fails."""
    # keep any PYTHONPATH the caller has (the device machine installs packages there)
    path = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(worker), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def data_args(data: Path) -> list[str]:
    return ["--set", f"data.train_manifest={data / 'train' / 'manifest.json'}",
            "--set", f"data.val_manifest={data / 'val' / 'manifest.json'}"]


def start_ranks(nproc: int, args: list[str], extra_env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start `nproc` trainer processes the way srun/torchrun do: RANK/WORLD_SIZE/... in the environment
    (plus `extra_env`)."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, str(TRAIN), *args], env=env, cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs


def wait_ranks(procs: list[subprocess.Popen], timeout: float = 300) -> tuple[list[int], str]:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], "\n".join(outs)


def run_train(args: list[str], nproc: int = 1, timeout: float = 300,
              env: dict[str, str] | None = None) -> tuple[list[int], str]:
    return wait_ranks(start_ranks(nproc, args, env), timeout)


def records(run_dir: Path) -> tuple[dict[int, dict], list[dict]]:
    """Training records by step (the last record wins: a resumed run rewrites steps after its
    checkpoint) and evaluation records, from the run's metrics.jsonl."""
    train, evals = {}, []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "split" in rec:
            evals.append(rec)
        else:
            train[rec["step"]] = rec
    return train, evals


def demo_val_metrics(model, demo_data: Path, batch_size: int, device: str = "cpu", bf16: bool = False) -> dict:
    """The trainer's S2EF metrics of `model` on the demo data's validation split, computed here on one rank (bf16:
    under bf16 autocast), to compare with what a run logged."""
    import torch

    from eqv2.data import DataConfig, val_batches
    from eqv2.training.metrics import S2EFMetrics

    cfg = DataConfig(train_manifest=str(demo_data / "train" / "manifest.json"),
                     val_manifest=str(demo_data / "val" / "manifest.json"), batch_size=batch_size, num_workers=0)
    metrics = S2EFMetrics(torch.device(device))
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        for batch in val_batches(cfg, 0, 1):
            batch = batch.to(device)
            metrics.update(model(batch), batch)
    return metrics.compute()


HERE = Path(__file__).parent
DEMO_STEPS = 250
MAX_STEPS = 40  # of the 2-rank reference run


@pytest.fixture(scope="session")
def demo_run(demo_data, tmp_path_factory) -> Path:
    """configs/train/demo.yaml, shortened to DEMO_STEPS, on one process: the `make demo` path."""
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    rc, out = run_train(["--ds_config", "ds_configs/cpu_demo.json", "--config", "configs/train/demo.yaml",
                         *data_args(demo_data), "--set", f"run_dir={run_dir}", "--set", f"optim.max_steps={DEMO_STEPS}",
                         "--set", "eval.every_steps=100", "--set", "log.every_steps=25"])
    assert rc == [0], out
    return run_dir


def common_args(demo_data: Path, run_dir: Path) -> list[str]:
    return ["--ds_config", str(HERE / "ds_zero2_cpu.json"), "--config", str(HERE / "tiny_run.yaml"),
            *data_args(demo_data), "--set", f"run_dir={run_dir}", "--set", f"optim.max_steps={MAX_STEPS}"]


@pytest.fixture(scope="session")
def reference_run(demo_data, tmp_path_factory) -> Path:
    """The tiny run uninterrupted on 2 ranks (ZeRO-2, 2 micro-batches per step, dropout on)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    rc, out = run_train(common_args(demo_data, run_dir), nproc=2)
    assert rc == [0, 0], out
    return run_dir


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)
