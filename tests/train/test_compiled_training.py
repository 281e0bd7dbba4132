"""The trainer with compiled blocks (CPU Inductor): batches of varying atom, edge and structure counts
must not recompile the blocks after their first compilation (symbolic in atoms, edges and structures)."""
import json

import pytest

from tests.train.conftest import HERE, data_args, records, run_train


@pytest.mark.slow
def test_compiled_training_does_not_recompile_as_batches_vary(demo_data, tmp_path):
    """With shape buckets (as the trainer runs on a GPU): a new padded shape must not recompile (under CUDA
    graphs it is recorded, which is cheap; a recompilation is not).  One run (each costs over a minute on 2
    cores; a run without buckets compiled the same parts): the padded shapes vary from batch to batch, which
    the 5 graphs below show (5 parts compiled once, symbolic), and the final validation runs the
    compiled model in eval mode.  Then a second run of the same config in another run directory with the
    same on-disk compile cache (as slurm/lib.sh shares one between the runs under one parent directory)
    loads its first step's graphs from the cache instead of compiling them (startup.json's counts)."""
    run_dir = tmp_path / "run"
    pads = ["--set", "execution.pad_atoms_multiple=16", "--set", "execution.pad_edges_multiple=64"]
    cache = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compile_cache")}  # cold: nothing from other tests

    def launch(run_dir, steps):
        return run_train(["--ds_config", str(HERE / "ds_zero2_cpu.json"), "--config", str(HERE / "tiny_run.yaml"),
                          *data_args(demo_data), "--set", f"run_dir={run_dir}", "--set", f"optim.max_steps={steps}",
                          "--set", "compile.enabled=true", "--set", "checkpoint.every_steps=1000",
                          "--set", "data.max_atoms=80", "--set", "data.pack_batches=false", *pads],
                         timeout=900, env=cache)  # batches by atoms, unpacked so that their sizes vary: 2-4 structures each

    rc, out = launch(run_dir, 14)
    assert rc == [0], out[-3000:]
    cold = json.loads((run_dir / "startup.json").read_text())["compile_cache"]
    assert cold["dir"] == cache["TORCHINDUCTOR_CACHE_DIR"] and cold["fxgraph_misses"] > 0 and cold["fxgraph_hits"] == 0, cold
    assert "compiled: 6 parts" in out  # 2 blocks, the edge-degree embedding, 2 heads, the edge frames
    train, _ = records(run_dir)
    graphs = {step: rec["compiled_graphs"] for step, rec in train.items()}
    atoms = {round(rec["atoms_per_s"] / rec["steps_per_s"]) for rec in train.values()}
    structures = {round(rec["samples_per_s"] / rec["steps_per_s"]) for rec in train.values()}
    assert len(atoms) > 5 and len(structures) > 1, (atoms, structures)  # the batches do vary
    # 5 code objects (block, edge-degree embedding, energy head, force head, edge frames), each compiled
    # once with symbolic shapes in the first step; nothing after that (Dynamo's automatic dynamic shapes
    # alone: 10, each static at the first micro-batch and again symbolic at the second)
    assert set(graphs[s] for s in graphs if s >= 2) == {5}, graphs
    # torch's compile callbacks tell the same story per interval: the 5 Dynamo compilations and the
    # deferred backward ones in the first two steps, none later; no CUDA graphs on a CPU
    compiles = {step: rec["compiles"] for step, rec in train.items()}
    assert compiles[1] + compiles[2] >= 5 and all(compiles[s] == 0 for s in compiles if s > 2), compiles
    assert train[1]["compile_s"] > 0 and all(train[s]["compile_s"] == 0 for s in train if s > 2)
    assert all(rec["cudagraph_records"] == 0 for rec in train.values())
    assert "eval val step 14" in out, out[-3000:]
    # the batches did fall into several buckets after the compilations
    assert sum(rec["new_shape_buckets"] for s, rec in train.items() if s > 2) > 0, train

    rc, out = launch(tmp_path / "run2", 1)
    assert rc == [0], out[-3000:]
    warm = json.loads((tmp_path / "run2" / "startup.json").read_text())["compile_cache"]
    assert warm["fxgraph_hits"] >= cold["fxgraph_misses"] and warm["fxgraph_misses"] == 0, (cold, warm)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_modes_need_shape_buckets(mode):
    from eqv2.config import ConfigError
    from eqv2.model.config import ModelConfig
    from eqv2.model.equiformer_v2 import EquiformerV2
    from eqv2.training.compile import CompileConfig, apply_compile

    model = EquiformerV2(ModelConfig(num_layers=1, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8,
                                     num_heads=2, attn_alpha_channels=4, attn_value_channels=4,
                                     ffn_hidden_channels=8, edge_channels=8))
    with pytest.raises(ConfigError, match=f"compile.mode={mode}.*execution.pad_atoms_multiple"):
        apply_compile(model, CompileConfig(enabled=True, mode=mode))


def test_shape_buckets_count_each_padded_shape_once():
    """ShapeBuckets keys a host batch by the shape pad_to_bucket gives it: atoms and edges rounded up to their
    multiples (plus one padding atom and edge), and the structure count."""
    import torch

    from dataclasses import replace

    from eqv2.batch import AtomsBatch
    from eqv2.buckets import bucket_shape, pad_to_bucket
    from eqv2.training.compile import ShapeBuckets

    def batch(natoms: list[int], edges: int | None) -> AtomsBatch:
        n = sum(natoms)
        return AtomsBatch(pos=torch.zeros(n, 3), atomic_numbers=torch.ones(n, dtype=torch.long),
                          cell=torch.zeros(len(natoms), 3, 3), pbc=torch.zeros(len(natoms), 3, dtype=torch.bool),
                          natoms=torch.tensor(natoms), batch=torch.repeat_interleave(torch.arange(len(natoms)), torch.tensor(natoms)),
                          edge_index=None if edges is None else torch.zeros(2, edges, dtype=torch.long))

    buckets = ShapeBuckets(16, 64)
    assert buckets.count_new([batch([5, 6], 40), batch([7, 4], 63)]) == 1  # 11 atoms -> 16, 40 and 63 edges -> 64
    assert buckets.count_new([batch([5, 10], 40)]) == 0  # 15 atoms + 1 padding atom: still 16
    assert buckets.count_new([batch([5, 11], 40)]) == 1  # 16 atoms + 1 -> 32
    assert buckets.count_new([batch([5, 6], 64)]) == 1  # 64 edges + 1 -> 128
    assert buckets.count_new([batch([5, 3, 3], 40)]) == 1  # three structures: another shape
    assert buckets.count_new([batch([5, 6], None), batch([6, 5], None)]) == 1  # edges unknown on the host
    # the same rounding as the padding made where batches are built
    host = replace(batch([10, 6], 64), cell_offset=torch.zeros(64, 3, dtype=torch.long), graph_spec=(6.0, 20, 90, True))
    bucket = pad_to_bucket(host, 16, 64).bucket
    assert (bucket.pos.shape[0], bucket.num_graphs, bucket.edge_index.shape[1]) == buckets.shape(host) == (32, 3, 128)
    assert bucket_shape(16, 64, 16, 64) == (32, 128)
