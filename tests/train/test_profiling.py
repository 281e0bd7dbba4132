"""`log.profile_steps`: the trainer records the chosen steps with the torch profiler into the run directory."""
from eqv2.train import main
from eqv2.training.signals import EXIT_CONFIG
from tests.train.conftest import HERE, data_args, run_train

DS = str(HERE / "ds_zero2_cpu.json")
RUN = str(HERE / "tiny_run.yaml")


def test_profile_steps_writes_the_op_table(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    rc, out = run_train(["--ds_config", DS, "--config", RUN, *data_args(demo_data), "--set", f"run_dir={run_dir}",
                         "--set", "optim.max_steps=4", "--set", "log.profile_steps=[2, 3]",
                         "--set", "checkpoint.every_steps=1000"])
    assert rc == [0], out[-3000:]
    text = (run_dir / "profile_rank0.txt").read_text()
    assert text.startswith("steps 2-3: ") and "ms wall per step" in text
    assert "aten::mm" in text or "aten::addmm" in text  # the model's matrix products were recorded
    assert "Self CPU" in text


def test_bad_profile_steps_name_the_key(capsys, demo_data):
    for bad in ("[3, 2]", "[0, 1]", "[5]"):
        assert main(["--ds_config", DS, "--config", RUN, *data_args(demo_data), "--set", f"log.profile_steps={bad}"]) == EXIT_CONFIG
        assert "log.profile_steps must be [first, last]" in capsys.readouterr().err


def test_gpu_busy_time_is_the_union_of_kernel_intervals():
    from eqv2.training.profiling import busy_and_gaps_us

    busy, gaps = busy_and_gaps_us([(10, 20), (0, 5), (15, 30), (40, 41), (18, 19)])
    assert busy == 5 + 20 + 1 and gaps == [5, 10]
    assert busy_and_gaps_us([]) == (0.0, [])
