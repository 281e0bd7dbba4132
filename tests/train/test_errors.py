"""Bad input gets a clear error naming the key or path, and the exit code the SLURM scripts act on."""
import json

import pytest

from eqv2.train import main
from eqv2.training import checkpointing as ckpt
from eqv2.training.signals import EXIT_CONFIG, EXIT_ERROR
from tests.train.conftest import HERE, common_args, data_args, records, run_train

DS = str(HERE / "ds_zero2_cpu.json")
RUN = str(HERE / "tiny_run.yaml")


def test_unknown_key(capsys, demo_data):
    assert main(["--ds_config", DS, "--config", RUN, *data_args(demo_data), "--set", "optim.lrr=1e-3"]) == EXIT_CONFIG
    assert "unknown config key optim.lrr" in capsys.readouterr().err


def test_ill_typed_key(capsys, demo_data):
    assert main(["--ds_config", DS, "--config", RUN, *data_args(demo_data), "--set", "model.lmax=six"]) == EXIT_CONFIG
    assert "model.lmax: expected int" in capsys.readouterr().err


def test_missing_data_path(capsys, tmp_path):
    code = main(["--ds_config", DS, "--config", RUN, "--set", f"data.train_manifest={tmp_path}/nope.json"])
    assert code == EXIT_CONFIG
    assert f"data.train_manifest: file not found: {tmp_path}/nope.json" in capsys.readouterr().err


def test_bad_ds_config(capsys, tmp_path, demo_data):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                               "train_batch_size": 64}))
    assert main(["--ds_config", str(bad), "--config", RUN, *data_args(demo_data)]) == EXIT_CONFIG
    assert "'train_batch_size' is not allowed" in capsys.readouterr().err
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    assert main(["--ds_config", str(bad), "--config", RUN, *data_args(demo_data)]) == EXIT_CONFIG
    assert "gradient_accumulation_steps must be a positive integer" in capsys.readouterr().err


def test_scientific_notation_override_is_a_float(demo_data):
    from eqv2.training.config import load_run_config
    cfg, _ = load_run_config(RUN, [*_sets(data_args(demo_data)), "optim.lr=2e-4"], micro_batch=2)
    assert cfg.optim.lr == 2e-4


def _sets(args):
    return [a for a in args if a != "--set"]


def test_graph_stats_of_another_graph_are_refused(capsys, demo_data, tmp_path):
    """model_graph_stats_from_data: avg_degree measured at 6 Å / 12 neighbours (the demo data) must not
    configure a model whose graph is 5 Å / 8: a clear error naming both graphs and the remedy."""
    args = common_args(demo_data, tmp_path / "run") + ["--set", "model.max_radius=5.0", "--set", "model.max_neighbors=8"]
    assert main(args) == EXIT_CONFIG  # in this process: a traceback would fail the test
    out = capsys.readouterr().err
    assert "model_graph_stats_from_data" in out and "6.0 Å / 12-neighbour graph" in out and "5.0 Å / 8" in out
    assert "eqv2 stats" in out and "--max-radius 5.0 --max-neighbors 8" in out


def test_nonfinite_losses_are_counted_then_stop(demo_data, tmp_path):
    """A broken energy normaliser (std 1e-45) makes every target infinite: each step is skipped and
    counted, and the run stops with exit 1 and a message once loss.max_nonfinite_steps is reached."""
    run_dir = tmp_path / "nan"
    args = common_args(demo_data, run_dir) + ["--set", "normalizers={energy_mean: 0.0, energy_std: 1.0e-45, "
                                              "forces_std: 1.0}", "--set", "loss.max_nonfinite_steps=3"]
    rc, out = run_train(args, nproc=1)
    assert rc == [EXIT_ERROR], out
    assert "stopping: 3 steps had a non-finite loss (loss.max_nonfinite_steps=3)" in out
    train, _ = records(run_dir)
    assert [r["nonfinite_steps"] for r in train.values()] == [1, 2, 3]
    assert ckpt.latest_tag(run_dir / "checkpoints") is None  # nothing diverged was saved


def test_interrupted_save_never_replaces_the_last_good_checkpoint(tmp_path):
    """What a save killed half-way leaves behind: a newer tag directory without COMPLETE, possibly a
    stale `latest`.  Resume must pick the newest complete checkpoint."""
    d = tmp_path / "checkpoints"
    for step, complete in ((4, True), (8, True), (12, False)):
        tag = d / ckpt.tag_for(step)
        tag.mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"partial")
        if complete:
            (tag / ckpt.COMPLETE).write_text("ok")
    assert ckpt.latest_tag(d) == "step_00000008"  # no pointer yet: scan
    (d / "latest").write_text("step_00000012\n")  # pointer to an incomplete tag: ignored
    assert ckpt.latest_tag(d) == "step_00000008"
    (d / "latest").write_text("step_00000004\n")  # a valid pointer wins over the scan
    assert ckpt.latest_tag(d) == "step_00000004"
    assert ckpt.find_resume("auto", tmp_path) == (d / "step_00000004", [])
    assert ckpt.find_resume(None, tmp_path) == (None, [])
    assert ckpt.find_resume("auto", tmp_path / "fresh") == (None, [])  # first start of a requeueable job
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.find_resume(str(d / "step_00000012"), tmp_path)


def test_structure_that_cannot_be_a_graph_stops_the_run_naming_it(capsys, tmp_path, demo_data):
    """Graphs are built in the loader (data.build_graphs): a broken structure there is bad input, exit 2."""
    from eqv2.data.format import sample_key
    from tests.data.conftest import oc20_frames, with_energy, write_uneven

    samples = with_energy(oc20_frames(8, seed=5))
    samples[5]["positions"][3] = samples[5]["positions"][1]
    write_uneven(tmp_path / "data", samples, [4, 4])
    code = main(["--ds_config", DS, "--config", RUN, "--set", f"data.train_manifest={tmp_path / 'data' / 'manifest.json'}",
                 "--set", 'data.val_manifest=""', "--set", f"data.stats={demo_data / 'train' / 'stats.json'}",
                 "--set", f"run_dir={tmp_path / 'run'}"])
    assert code == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"(id {sample_key(samples[5]['sid'], samples[5]['fid'])}): atoms" in err and "coincide" in err


def test_graphs_built_in_the_loader_train_like_graphs_built_by_the_model(demo_data, tmp_path):
    """Also with shape buckets, made in the loader with the graphs: the same losses (no dropout: its masks are
    drawn over the padded shapes)."""
    losses, pads = {}, ["--set", "execution.pad_atoms_multiple=16", "--set", "execution.pad_edges_multiple=64"]
    no_dropout = ["--set", "model.alpha_drop=0.0", "--set", "model.drop_path_rate=0.0"]
    for name, sets in (("loader", ["--set", "data.build_graphs=true"]), ("model", ["--set", "data.build_graphs=false"]),
                       ("loader_buckets", ["--set", "data.build_graphs=true", *pads])):
        run_dir = tmp_path / name
        rc, out = run_train(common_args(demo_data, run_dir) + ["--set", "optim.max_steps=4", *no_dropout, *sets])
        assert rc == [0], out
        train, _ = records(run_dir)
        losses[name] = [train[s]["loss"] for s in sorted(train)]
        assert ("new_shape_buckets" in train[1]) == (name == "loader_buckets")  # buckets on in that run only
    assert len(losses["loader"]) == 4
    for name in ("model", "loader_buckets"):
        for a, b in zip(losses[name], losses["loader"]):
            assert abs(a - b) <= 1e-5 * abs(b), losses
