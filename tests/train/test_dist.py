"""Launcher discovery from environment variables (torchrun/deepspeed, srun, bare process), and the exit
of an entry point."""
from eqv2.training.dist import discover_launcher, first_slurm_host, slurm_port


def test_torch_env_is_used_as_is():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert discover_launcher(env) == "torch-env"
    assert env["RANK"] == "3" and env["MASTER_ADDR"] == "n1"


def test_slurm_variables_are_mapped():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[007-008,012],cpu1", "SLURM_JOB_ID": "123456"}
    assert discover_launcher(env) == "slurm"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "16", "1")
    assert env["MASTER_ADDR"] == first_slurm_host("gpu[007-008,012],cpu1")
    assert env["MASTER_PORT"] == str(slurm_port("123456"))


def test_first_host_parser():
    # without scontrol on PATH these go through the parser; with it, scontrol must agree
    assert first_slurm_host("node1") == "node1"
    assert first_slurm_host("a[03-05],b[1-2]") == "a03"
    assert first_slurm_host("x12,y[1-3]") == "x12"
    assert 20000 <= slurm_port("99999999") < 40000


def test_single_process_default():
    env = {}
    assert discover_launcher(env) == "single"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("0", "1", "0")


def test_exit_process_keeps_the_code_and_the_buffered_output():
    """exit_process leaves without interpreter finalisation, which would otherwise flush stdio: what a
    finished entry point printed into a pipe (block-buffered) must still arrive, and its exit code be kept;
    atexit handlers (finalisation) do not run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import atexit, sys; from eqv2.training.dist import exit_process; "
            "atexit.register(lambda: print('finalised')); "
            "print('done', end=''); print('warn', end='', file=sys.stderr); exit_process(75)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered into the pipe
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (75, "done", "warn")
