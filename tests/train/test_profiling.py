"""`log.profile_steps`: the trainer records the chosen steps with the torch profiler into the run directory."""
import json

from eqv2.train import main
from eqv2.training.startup import PHASES
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
    for name in ("forward", "backward", "optimizer_step", "nonfinite_check", "ema"):  # the step's phases
        assert f"step/{name}" in text.split("\n-")[0], name
    # the same steps by category (training/profile_breakdown.py), and the start-up phases of the launch
    table = json.loads((run_dir / "profile_rank0.json").read_text())
    assert table["steps"] == 2 and table["device"] == "cpu"
    ms = table["ms_per_step"]
    for cat in ("rotations", "linear_layers", "optimizer_step", "ema", "loss", "s2_activation", "layer_norms"):
        assert ms[cat] > 0, (cat, ms)
    assert abs(sum(table["share"].values()) - 1.0) < 1e-2
    # host reads are counted with the phase they are in; none in the model's passes, the loss or the EMA
    # (on the CPU the loader's and the CPU AdamW's own reads are counted too: no device there)
    reads = table["host"]["syncs_per_step_by_phase"]
    assert reads and all(k.startswith("aten::_local_scalar_dense in ") for k in reads), reads
    assert not [k for k in reads if k.split(" in ")[1] in ("forward", "backward", "loss", "ema", "clip")], reads
    assert table["ms_per_step"]["communication"] > 0  # ZeRO-2's gradient all-reduce (gloo)
    startup = json.loads((run_dir / "startup.json").read_text())
    assert set(PHASES) < set(startup) and all(startup[k] >= 0 for k in PHASES)
    assert abs(sum(startup[k] for k in PHASES) - startup["launch_to_first_step_s"]) < 0.01
    assert startup["imports_init_s"] > 0.5  # torch and deepspeed were imported in it (a fresh process)
    first = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][0]
    assert first["startup"] == startup


def test_bad_profile_steps_name_the_key(capsys, demo_data):
    for bad in ("[3, 2]", "[0, 1]", "[5]"):
        assert main(["--ds_config", DS, "--config", RUN, *data_args(demo_data), "--set", f"log.profile_steps={bad}"]) == EXIT_CONFIG
        assert "log.profile_steps must be [first, last]" in capsys.readouterr().err


def test_gpu_busy_time_is_the_union_of_kernel_intervals():
    from eqv2.training.profiling import busy_and_gaps_us

    busy, gaps = busy_and_gaps_us([(10, 20), (0, 5), (15, 30), (40, 41), (18, 19)])
    assert busy == 5 + 20 + 1 and gaps == [5, 10]
    assert busy_and_gaps_us([]) == (0.0, [])


def test_phase_table_charges_gpu_idle_time_to_the_host_phase_it_falls_in():
    """Each GPU idle gap is split over the phases the host was in; what no phase covers is reported
    apart; host time is the union of a phase's ranges; rows sorted by idle time."""
    from eqv2.training.profiling import _overlap, _union, idle_intervals, phase_table

    kernels = [(0, 1000), (5000, 6000), (9000, 9500)]
    phases = [("step/a", 500, 3000), ("step/b", 2000, 7000), ("step/a", 8000, 9200)]
    gaps = idle_intervals(kernels)
    assert gaps == [(1000, 5000), (6000, 9000)]
    assert _union([(0, 2), (1, 3), (5, 6)]) == [(0, 3), (5, 6)] and _overlap((0, 5), (3, 9)) == 2
    lines = phase_table(phases, kernels, steps=1, gpu=True).splitlines()[1:]
    vals = {line.split()[0]: float(line.split()[-1]) * 1e3 for line in lines}
    # a: 1000-3000 (2000) + 8000-9000 (1000); b: 2000-5000 (3000) + 6000-7000 (1000); between: 7000-8000
    assert vals == {"step/a": 3000.0, "step/b": 4000.0, "(between": 1000.0}
    assert [line.split()[0] for line in lines] == ["step/b", "step/a", "(between"]
    host = {line.split()[0]: float(line.split()[1]) * 1e3 for line in lines[:2]}
    assert host == {"step/a": 3700.0, "step/b": 5000.0}
    assert phase_table([], kernels, 1, True) == ""


def test_gpu_kernels_are_charged_by_launching_operator_phase_and_backward_link():
    """The CUDA side of the category table on a hand-built trace (no GPU here): a kernel is found by its
    runtime call's correlation id; its operator (a custom rotation op, a linear layer's mm) or the
    trainer phase it was issued in decides the category; a backward kernel is charged to the forward
    operation of its autograd node's sequence number; NCCL kernels are communication; host syncs are
    counted with their phase."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent

    from eqv2.training.profile_breakdown import breakdown

    def cpu(i, name, a, b, thread=1, seq=-1, fwd_thread=None):
        return FunctionEvent(i, name, thread, a, b, sequence_nr=seq, fwd_thread=fwd_thread or thread)

    def kernel(i, name, a, b):
        return FunctionEvent(i, name, 7, a, b, device_type=DeviceType.CUDA)

    events = [
        cpu(1, "step/forward", 0, 100), cpu(2, "mod/TransformerBlock", 10, 90),
        cpu(3, "eqv2::gather_rotate", 20, 30, seq=5), cpu(1001, "cudaLaunchKernel", 21, 22),
        cpu(4, "aten::mm", 40, 50, seq=6), cpu(1002, "cudaLaunchKernel", 41, 42),
        cpu(5, "step/backward", 100, 200),
        # the backward of the rotation, on the autograd thread (2): charged to the rotation via seq 5
        cpu(6, "autograd::engine::evaluate_function: GatherRotateBackward", 110, 140, thread=2),
        cpu(7, "GatherRotateBackward", 111, 139, thread=2, seq=5, fwd_thread=1),
        cpu(8, "aten::index_add_", 112, 120, thread=2), cpu(1003, "cudaLaunchKernel", 113, 114, thread=2),
        cpu(9, "step/optimizer_step", 200, 260), cpu(10, "aten::_fused_adamw_", 201, 230),
        cpu(1004, "cudaLaunchKernel", 202, 203), cpu(11, "cudaStreamSynchronize", 240, 250),
        cpu(12, "step/ema", 260, 280), cpu(13, "aten::_foreach_lerp_", 261, 270),
        cpu(1005, "cudaLaunchKernel", 262, 263),
        kernel(1001, "_gather_mm_kernel", 25, 45), kernel(1002, "sm90_xmma_gemm_bf16", 50, 60),
        kernel(1003, "triton_poi_fused_index_add_0", 130, 150), kernel(1004, "multi_tensor_apply_kernel", 205, 225),
        kernel(1005, "multi_tensor_apply_kernel", 265, 268), kernel(2000, "ncclDevKernel_AllReduce_Sum", 150, 160),
    ]
    trace = EventList(events)
    trace._build_tree()
    table = breakdown(trace, steps=1, gpu=True)
    ms = {k: v * 1e3 for k, v in table["ms_per_step"].items() if v}  # in the trace's µs
    assert ms == {"rotations": 20.0 + 20.0, "linear_layers": 10.0, "optimizer_step": 20.0, "ema": 3.0,
                  "communication": 10.0}, ms
    host = table["host"]
    assert host["device_busy_ms_per_step"] * 1e3 == 20 + 10 + 30 + 20 + 3  # the union of the kernel intervals
    assert host["syncs_per_step_by_phase"] == {"cudaStreamSynchronize in optimizer_step": 1.0}
