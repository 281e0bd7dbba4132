"""bench/run.py's table: MFU for both trainers' rows and the launch-to-first-step column."""
import argparse

from bench.run import PEAK_TFLOPS, table, trainer_mfu


def test_table_reports_mfu_and_launch_to_first_step():
    trainer = {"steady_samples_per_s_per_rank": 50.0, "samples_per_s": 40.0, "atoms_per_s": 40.0 * 70.0,
               "end_to_end_samples_per_s": 10.0, "peak_mem_gib_rank0": 20.0, "startup": {"launch_to_first_step_s": 81.4}}
    fairchem = {"samples_per_s": 10.0, "atoms_per_s": 720.0, "peak_gib": 45.0, "params": 153.6e6,
                "tflop_per_atom": 0.033, "mfu": 720.0 * 0.033e12 / (PEAK_TFLOPS * 1e12)}
    # steady 50 samples/s x 70 atoms x 0.033 TFLOP per atom = 115.5 TFLOP/s of the 989 peak
    assert abs(trainer_mfu(trainer, fairchem) - 115.5 / 989.0) < 1e-12
    args = argparse.Namespace(micro_batch=8, steps=300, skip=100, ds_config="ds_configs/zero0_bf16.json")
    text = table([{"run": "oc20_all_md_153M", "trainer": trainer, "fairchem": fairchem}], "H200", "abc", args)
    header, _, row = text.splitlines()[-3:]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["trainer MFU"] == "11.7 %" and cells["launch to first step (s)"] == "81"
    assert cells["fairchem MFU"] == "2.4 %" and cells["steady / fairchem"] == "5.00×"
    assert "989 TFLOP/s" in text
    # without a reference call there are no FLOPs: no MFU, no ratio, the rest stays
    row = table([{"run": "x", "trainer": {**trainer, "startup": {}}}], "H200", "abc", args).splitlines()[-1]
    assert row.count("–") == 7, row
