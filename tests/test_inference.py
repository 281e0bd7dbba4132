"""eqv2.inference: the fast inference path against the float32 reference path (CPU; the CUDA path at the end)."""
from __future__ import annotations

import pytest
import torch

import eqv2
from eqv2.calculator import atoms_to_batch
from eqv2.checkpoint import Normalizers, save_model
from eqv2.inference import InferenceOptions, PrecisionError, load_for_inference, prepare
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from tests.model.fairchem_reference import slab_structures

CFG = ModelConfig(num_layers=2, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8, attn_alpha_channels=4,
                  attn_value_channels=2, ffn_hidden_channels=8, edge_channels=8, num_heads=2, max_neighbors=12,
                  max_radius=5.0)
NORMS = Normalizers(energy_mean=-0.7, energy_std=2.5, forces_std=0.3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_model(path, EquiformerV2(CFG), CFG, NORMS)
    return path


def _batch(n=3, seed=0):
    return atoms_to_batch(slab_structures(seed, n))


def test_bf16_autocast_on_cpu_is_close_to_fp32_and_checked(checkpoint):
    """CPU bf16 autocast (the model's precision-sensitive parts stay float32) against the float32 reference:
    measured max |dE|/atom ~1e-3 eV and max |dF| ~1e-2 eV/Å on this random model; the check reports both."""
    lines = []
    batch = _batch()
    with torch.no_grad():
        ref = eqv2.load_model(checkpoint)(batch)
    fast = load_for_inference(checkpoint, "cpu", InferenceOptions(precision="bf16", compile="off"), log=lines.append)
    out = fast(batch)
    assert out["energy"].dtype == torch.float32 and out["forces"].dtype == torch.float32
    de = ((out["energy"] - ref["energy"]).abs() / batch.natoms).max()
    df = (out["forces"] - ref["forces"]).norm(dim=-1).max()
    assert 0 < de < 5e-3 and 0 < df < 5e-2, (de, df)  # bf16 ran (not bit-equal), and is close
    (check,) = fast.checks
    assert check.ok and check.structures == 3
    assert check.max_energy_per_atom == pytest.approx(float(de), rel=1e-6)
    assert check.max_forces == pytest.approx(float(df), rel=1e-6)
    assert "bf16 vs fp32, 3 structures" in lines[0] and "within" in lines[0]
    assert fast.reference is None  # one batch checked (check_batches 1): the float32 copy is dropped
    fast(_batch(2, seed=1))
    assert len(fast.checks) == 1


def test_outside_the_tolerance_bf16_refuses_and_auto_falls_back(checkpoint):
    batch = _batch()
    strict = InferenceOptions(precision="bf16", compile="off", energy_tolerance=1e-9, forces_tolerance=1e-9)
    with pytest.raises(PrecisionError, match="OUTSIDE the tolerance.*--precision fp32"):
        load_for_inference(checkpoint, "cpu", strict, log=lambda line: None)(batch)
    # auto on CPU is fp32 (nothing to check); a bf16 run that falls back is what auto does on CUDA
    assert InferenceOptions(precision="auto").resolved_precision(torch.device("cpu")) == "fp32"
    lines = []
    fast = load_for_inference(checkpoint, "cpu", InferenceOptions(precision="bf16", compile="off", check_batches=1,
                                                                  energy_tolerance=1e-9), log=lines.append)
    fast.options = InferenceOptions(precision="auto", energy_tolerance=1e-9)  # auto's fallback, on the CPU
    with torch.no_grad():
        ref = eqv2.load_model(checkpoint)(batch)
    out = fast(batch)
    assert fast.fell_back and "falling back" in lines[-1]
    torch.testing.assert_close(out["energy"], ref["energy"], rtol=0, atol=0)  # the float32 outputs
    torch.testing.assert_close(fast(batch)["forces"], ref["forces"], rtol=0, atol=0)


def test_fp32_runs_the_reference_path_bit_for_bit(checkpoint):
    batch = _batch()
    with torch.no_grad():
        ref = eqv2.load_model(checkpoint)(batch)
    fast = load_for_inference(checkpoint, "cpu", InferenceOptions(precision="fp32"))
    assert fast.reference is None and not fast.compiled and "fp32, eager, kernels: reference" in fast.describe()
    out = fast(batch)
    for key in ("energy", "forces"):
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0)


def test_compiled_path_equals_eager(tmp_path):
    """torch.compile (Inductor on the CPU, default mode) of the block, heads and edge frames of a one-block
    model: the same function as the eager model (one batch shape: compiling on 2 CPU cores is slow)."""
    torch._dynamo.reset()
    cfg = ModelConfig(**{**CFG.__dict__, "num_layers": 1})
    torch.manual_seed(0)
    save_model(tmp_path / "one.pt", EquiformerV2(cfg), cfg, NORMS)
    fast = load_for_inference(tmp_path / "one.pt", "cpu", InferenceOptions(precision="fp32", compile="on"))
    assert fast.compiled == ["blocks.0", "edge_degree_embedding", "energy_head", "force_head", "edge_frames"]
    assert fast.mode == "default"
    batch = _batch(2)
    out = fast(batch)
    with torch.no_grad():
        ref = eqv2.load_model(tmp_path / "one.pt")(batch)
    for key in ("energy", "forces"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_bad_options_are_refused_by_name():
    with pytest.raises(ValueError, match="precision must be one of"):
        InferenceOptions(precision="fp16")
    with pytest.raises(ValueError, match="compile must be one of"):
        InferenceOptions(compile="yes")
    with pytest.raises(ValueError, match="check_batches must be >= 0"):
        InferenceOptions(check_batches=-1)


def test_prepare_twice_is_refused(checkpoint):
    fast = prepare(eqv2.load_model(checkpoint), "cpu", InferenceOptions())
    with pytest.raises(ValueError, match="already prepared"):
        prepare(fast, "cpu")


GPU_CFG = ModelConfig(num_layers=2, lmax=6, mmax=3, sphere_channels=32, attn_hidden_channels=16, attn_alpha_channels=8,
                      attn_value_channels=4, ffn_hidden_channels=32, edge_channels=32, num_heads=4, max_radius=6.0,
                      max_neighbors=1000)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fast_path_fused_compiled_bf16_matches_fp32(tmp_path):
    """The whole CUDA fast path (the plan's fused kernels and shape buckets, compiled with CUDA graphs, bf16)
    against float32 on the same batches: as close as bf16 eager autocast of the reference modules, and the
    check records every batch (random weights: no physical tolerance applies, so none is judged)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    save_model(tmp_path / "gpu.pt", EquiformerV2(GPU_CFG), GPU_CFG, NORMS)
    options = InferenceOptions(precision="auto", check_batches=3, energy_tolerance=1e9, forces_tolerance=1e9)
    fast = load_for_inference(tmp_path / "gpu.pt", "cuda", options, log=lambda line: None)
    assert fast.precision == "bf16" and fast.mode == "reduce-overhead" and fast.plan.fused_s2_activation
    assert fast.plan.fused_rotation and fast.plan.pad_atoms_multiple == 64
    ref = eqv2.load_model(tmp_path / "gpu.pt", "cuda")
    for n, seed in ((3, 0), (4, 1), (3, 0), (3, 0)):  # the last ones replay the first batch's recorded graphs
        batch = _batch(n, seed).to("cuda")
        out = fast(batch)
        with torch.no_grad():
            want = ref(batch)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                eager = ref(batch)
        for key in ("energy", "forces"):
            assert out[key].dtype == torch.float32
            err = float((out[key] - want[key]).norm() / want[key].norm())
            base = float((eager[key].float() - want[key]).norm() / want[key].norm())
            assert err < 5e-2 and err <= 2 * base + 1e-3, (n, key, err, base)
    assert len(fast.checks) == 3 and not fast.fell_back and fast.reference is None
    torch._dynamo.reset()


def test_predict_cli_precision_and_a_refused_check(checkpoint, tmp_path, capsys):
    import ase.io
    import numpy as np

    from eqv2.predict import main

    frames = tmp_path / "frames.extxyz"
    ase.io.write(frames, slab_structures(2, 3))
    common = ["--checkpoint", str(checkpoint), "--input", str(frames), "--device", "cpu", "-q"]
    assert main([*common, "--output", str(tmp_path / "ref.npz"), "--precision", "fp32"]) == 0
    assert main([*common, "--output", str(tmp_path / "bf16.npz"), "--precision", "bf16"]) == 0
    err = capsys.readouterr().err
    assert "precision check (bf16 vs fp32, 3 structures)" in err and "within" in err
    ref, low = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "bf16.npz")
    assert 0 < np.abs(low["forces"] - ref["forces"]).max() < 5e-2
    assert main([*common, "--output", str(tmp_path / "x.npz"), "--precision", "bf16",
                 "--precision-tolerance", "1e-12", "1"]) == 2
    assert "OUTSIDE the tolerance" in capsys.readouterr().err


def test_calculator_inference_option(checkpoint, oc20_atoms):
    from eqv2.calculator import EquiformerV2Calculator

    ref, low = oc20_atoms.copy(), oc20_atoms.copy()
    ref.calc = EquiformerV2Calculator(checkpoint, device="cpu")
    low.calc = EquiformerV2Calculator(checkpoint, device="cpu",
                                      inference=InferenceOptions(precision="bf16", compile="off"))
    assert low.calc.potential.precision == "bf16" and len(low) > 0
    e_ref, e_low = ref.get_potential_energy(), low.get_potential_energy()
    assert e_low != e_ref and abs(e_low - e_ref) / len(ref) < 5e-3
    assert len(low.calc.potential.checks) == 1 and low.calc.potential.checks[0].ok
