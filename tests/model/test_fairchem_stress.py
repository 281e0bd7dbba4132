"""The OMat24 / MPtrj / sAlex family, converted, predicts energy, forces and stress as fairchem does.

fairchem-core 1.10.0 builds the models itself (its HydraModel from the published configs'
model sections: configs/omat24/mptrj/eqV2_31M_dens_mptrj.yml for the DeNS backbone and heads,
configs/omat24/all/eqV2_31M.yml for the plain backbone; every option they set kept, widths and
blocks shrunk), with random perturbed weights, saved in the layout its trainer saves (DDP `module.`
prefix, EMA shadow parameters, Normalizer and LinearReferences state dicts, the config's `outputs`).
The reference is fairchem's own trainer code on its own graph (otf_graph, use_pbc_single): its
`OCPTrainer._forward` (the stress assembled from its denormalised isotropic and anisotropic parts),
then `_denorm_preds` of every output (normalisers, element references) as `OCPTrainer.predict` does,
on a batch made as its OCPCalculator makes one.  eqv2's side: the converter tool,
`python -m eqv2.predict` (a real process) and the ASE calculator.
"""
from __future__ import annotations

import subprocess
import sys
import types
from contextlib import contextmanager
from functools import partial

import ase.io
import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, bulk, fcc100, fcc111, molecule

from eqv2.calculator import EquiformerV2Calculator
from tests.conftest import REPO

fr = pytest.importorskip("tests.model.fairchem_reference")
try:
    LEGACY, HYDRA = fr.import_fairchem()
except ImportError as err:  # pragma: no cover - CI installs fairchem-core
    pytest.skip(f"fairchem-core 1.10.0 not importable: {err}", allow_module_level=True)

DENS = "fairchem.core.models.equiformer_v2.equiformer_v2_dens."
# the published 31M OMat24 / MPtrj backbone, widths and blocks shrunk (every option it sets kept)
BACKBONE = dict(
    use_pbc=True, use_pbc_single=True, otf_graph=True, enforce_max_neighbors_strictly=False, max_neighbors=20,
    max_radius=12.0, max_num_elements=96, avg_num_nodes=31.16592360068011, avg_degree=61.94676351484548,
    num_layers=2, sphere_channels=16, attn_hidden_channels=16, num_heads=2, attn_alpha_channels=8,
    attn_value_channels=4, ffn_hidden_channels=16, norm_type="layer_norm_sh", lmax_list=[4], mmax_list=[2],
    grid_resolution=18, num_sphere_samples=128, edge_channels=16, use_atom_edge_embedding=True,
    share_atom_edge_embedding=False, use_m_share_rad=False, distance_function="gaussian", num_distance_basis=512,
    attn_activation="silu", use_s2_act_attn=False, use_attn_renorm=True, ffn_activation="silu", use_gate_act=False,
    use_grid_mlp=True, use_sep_s2_act=True, alpha_drop=0.1, drop_path_rate=0.1, proj_drop=0.0, weight_init="uniform",
)
STRESS = {"output_name": "stress", "use_source_target_embedding": True, "decompose": True}
OUTPUTS = {"energy": {"level": "system", "property": "energy"},
           "forces": {"level": "atom", "property": "forces", "train_on_free_atoms": True, "eval_on_free_atoms": True},
           "stress": {"level": "system", "property": "stress",
                      "decomposition": {"stress_isotropic": {"irrep_dim": 0}, "stress_anisotropic": {"irrep_dim": 2}}}}
CASES = {  # name -> (backbone, heads, normalised targets)
    # configs/omat24/mptrj/eqV2_31M_dens_mptrj.yml, class paths as it names them
    "dens_published": ({"model": DENS + "EqV2DeNSBackbone", "use_force_encoding": True,
                        "use_noise_schedule_sigma_encoding": False},
                       {"energy": {"module": DENS + "DeNSScalarHead", "use_denoising": True},
                        "forces": {"module": DENS + "DeNSVectorHead"},
                        "stress": {"module": DENS + "DeNSRank2Head", **STRESS, "use_denoising": False}},
                       ("forces", "stress_isotropic", "stress_anisotropic")),
    # configs/omat24/all/eqV2_31M.yml's backbone with the generic scalar / vector / rank-2 heads
    "hydra_published": ({"model": "equiformer_v2_backbone"},
                        {"energy": {"module": "equiformerV2_scalar_head"},
                         "forces": {"module": "equiformerV2_vector_head"},
                         "stress": {"module": "rank2_symmetric_head", **STRESS}},
                        ("energy", "forces", "stress_isotropic", "stress_anisotropic")),
    # the other options of the heads: sigma encoding, edge-level MLPs, sums, mean energy, the whole tensor
    "dens_sigma_edge_level_extensive": (
        {"model": "equiformer_v2_dens_backbone", "use_noise_schedule_sigma_encoding": True},
        {"energy": {"module": "eqV2_DeNS_scalar_head", "reduce": "mean"},
         "forces": {"module": "eqV2_DeNS_vector_head"},
         "stress": {"module": "dens_rank2_symmetric_head", **STRESS, "edge_level_mlp": True, "extensive": True,
                    "avg_num_nodes": 7.0, "num_mlp_layers": 3}},
        ("energy", "forces", "stress_isotropic", "stress_anisotropic")),
    "hydra_whole_tensor": ({"model": "equiformer_v2_backbone"},
                           {"energy": {"module": "equiformer_v2_energy_head"},
                            "forces": {"module": "equiformer_v2_force_head"},
                            "stress": {"module": "rank2_symmetric_head", "output_name": "stress", "decompose": False,
                                       "edge_level_mlp": True, "extensive": True}},
                           ("energy", "forces", "stress")),
}


def fairchem_model(case: str, means: dict[str, float] | None = None, float64: bool = False):
    """(checkpoint dict as fairchem's trainer saves it, reference(atoms) -> (E, F, stress 3x3));
    means: normaliser means other than the default ones; float64: the reference in float64 with its float32-only
    steps made float64 (`float64_fairchem`)."""
    from fairchem.core.models.base import HydraModel
    from fairchem.core.modules.normalization.element_references import create_element_references
    from fairchem.core.modules.normalization.normalizer import create_normalizer

    from diagnostics.recipe_parity import import_fairchem as import_trainer  # stubs its import-only dependencies

    OCPTrainer = import_trainer().OCPTrainer

    backbone, heads, targets = CASES[case]
    outputs = dict(OUTPUTS) if CASES[case][1]["stress"].get("decompose") else {
        **OUTPUTS, "stress": {"level": "system", "property": "stress"}}
    model_cfg = {"backbone": {**BACKBONE, **backbone}, "heads": heads, "otf_graph": True,
                 "pass_through_head_outputs": True}
    torch.manual_seed(0)
    model = HydraModel(**{k: _copy(v) for k, v in model_cfg.items()}).eval()
    fr.perturb_(model, seed=41)
    if float64 and hasattr(model.backbone, "force_embedding"):
        fold_dens_biases(model.backbone)
    gen = torch.Generator().manual_seed(42)
    # the trainer evaluates with the EMA weights; the raw weights differ, so a wrong EMA mapping shows
    shadow = [p.detach().clone() for p in model.parameters()]
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    names = [f"module.{k}" for k, _ in model.named_parameters()]
    for name in names:
        state[name] = state[name] + 0.05 * torch.randn(state[name].shape, generator=gen)
    scales = {"energy": (-0.3, 1.9), "forces": (0.0, 0.6), "stress_isotropic": (0.004, 0.03),
              "stress_anisotropic": (0.0005, 0.02), "stress": (0.001, 0.025)}
    means = {t: scales[t][0] for t in targets} | (means or {})
    normalizers = {t: {"mean": torch.tensor(means[t]), "rmsd": torch.tensor(scales[t][1])} for t in targets}
    refs = torch.zeros(119)
    refs[1:96] = -2.0 + torch.randn(95, generator=gen)
    elementrefs = {"energy": {"element_references": refs}}
    checkpoint = {"config": {"model": {"name": "hydra", **model_cfg}, "outputs": outputs, "dataset": {"train": {}}},
                  "state_dict": state, "ema": {"shadow_params": shadow, "num_updates": 10, "decay": 0.999},
                  "normalizers": normalizers, "elementrefs": elementrefs, "step": 11}

    trainer = types.SimpleNamespace(model=model, device="cpu", config={"outputs": outputs}, name="s2ef",
                                    normalizers={k: create_normalizer(state_dict=dict(v)) for k, v in normalizers.items()},
                                    elementrefs={"energy": create_element_references(state_dict=elementrefs["energy"])})
    OCPTrainer.load_task(trainer)
    trainer._denorm_preds = partial(OCPTrainer._denorm_preds, trainer)

    if float64:
        float64_constants(model)
        for module in [model, *trainer.normalizers.values(), *trainer.elementrefs.values()]:
            module.to(torch.float64)

    def reference(atoms):
        batch = fr.calculator_batch(atoms)  # as fairchem's OCPCalculator
        if float64:  # the positions AtomsToGraphs wraps, before it rounds them to float32
            from ase.geometry import wrap_positions

            cell = np.array(atoms.get_cell(complete=True))
            batch.pos = torch.tensor(wrap_positions(atoms.get_positions(), cell, pbc=atoms.pbc, eps=0))
            batch.cell = torch.tensor(cell).view(1, 3, 3)
        with fr.deterministic_frames(LEGACY, HYDRA), torch.no_grad(), float64_fairchem(float64):
            out = OCPTrainer._forward(trainer, batch)  # the stress parts denormalised and assembled here
            out = {k: trainer._denorm_preds(k, out[k], batch) for k in outputs}  # as OCPTrainer.predict
        return tuple(out[k].detach().double().numpy() for k in ("energy", "forces", "stress"))

    return checkpoint, reference


def fold_dens_biases(backbone) -> None:
    """The DeNS backbone's inference constants (the force / sigma encodings' biases, what they add for zero
    inputs) moved into its atom-embedding table as the converter moves them, rounded to float32 as the
    converted checkpoint stores them: the same function, in weights both sides then hold exactly (in float64 the
    rounding of the folded table alone moves forces by 6e-9)."""
    with torch.no_grad():
        table = backbone.sphere_embedding.weight.double()
        for name in ("force_embedding", "noise_schedule_sigma_embedding"):
            layer = getattr(backbone, name, None)
            if layer is not None and (name == "force_embedding" or backbone.use_noise_schedule_sigma_encoding):
                table = table + layer.bias.double().reshape(1, -1)
                layer.bias.zero_()
        backbone.sphere_embedding.weight.copy_(table.float())


def float64_constants(model) -> None:
    """fairchem's constants that it builds in float32 whatever the model's dtype, rebuilt in float64: the S2-grid
    matrices (SO3_Grid, built in the default dtype), the Gaussian centres and width (GaussianSmearing's float32
    linspace) and the degree weights of its layer norms (balance_degree_weight, 1/((2l+1)(L+1)) in float32)."""
    from fairchem.core.models.equiformer_v2.so3 import SO3_Grid
    from fairchem.core.models.scn.smearing import GaussianSmearing

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, SO3_Grid):  # EquiformerV2 builds them with one resolution, "component"
                    assert child.lat_resolution == child.long_resolution
                    setattr(module, name, SO3_Grid(child.lmax, child.mmax, resolution=child.lat_resolution,
                                                   normalization="component"))
                weight = getattr(child, "balance_degree_weight", None)
                if weight is not None:  # 1 / ((2l + 1) (number of degrees)), float32 in fairchem
                    child.balance_degree_weight = 1.0 / torch.round(1.0 / weight.double())
                if isinstance(child, GaussianSmearing):  # GaussianSmearing(0, cutoff, 600, 2.0) in EquiformerV2
                    count, stop = child.offset.numel(), float(child.offset[-1])
                    child.offset = torch.linspace(0.0, stop, count, dtype=torch.float64)
                    child.coeff = -0.5 / (2.0 * stop / (count - 1)) ** 2
    finally:
        torch.set_default_dtype(previous)


@contextmanager
def float64_fairchem(enabled: bool):
    """fairchem's forward in float64 (enabled), its float32-only steps made float64: the default dtype float64
    (its Wigner-D blocks are written into default-dtype zeros) and get_pbc_distances' periodic offsets, which it
    computes as cell_offsets.float() @ cell.float().  Its neighbour selection (radius_graph_pbc, which casts the
    cell to float32) still runs in float32, on the positions rounded to float32: the same neighbours as eqv2's."""
    if not enabled:
        yield
        return
    import fairchem.core.models.base as base

    select, distances = base.radius_graph_pbc, base.get_pbc_distances

    base.radius_graph_pbc, base.get_pbc_distances = fr.float32_selection(select), fr.pbc_distances64
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)
        base.radius_graph_pbc, base.get_pbc_distances = select, distances


def _copy(value):
    return {k: _copy(v) for k, v in value.items()} if isinstance(value, dict) else value


def frames(tmp_path):
    """Bulk crystals (strained, rattled; an ideal one with neighbour ties) and slabs periodic in 3D."""
    rng = np.random.default_rng(3)
    copper = bulk("Cu", "fcc", a=3.62, cubic=True)
    copper.rattle(0.05, seed=1)
    copper.set_cell(np.array(copper.cell) @ (np.eye(3) + [[0.02, 0.01, 0], [0.01, -0.01, 0.005], [0, 0.005, 0.015]]),
                    scale_atoms=True)
    zno = bulk("ZnO", "wurtzite", a=3.25, c=5.21, u=0.38) * (2, 1, 1)  # forces do not vanish by symmetry
    zno.set_cell(np.array(zno.cell) @ (np.eye(3) + [[-0.02, 0.01, 0], [0.01, 0.01, 0], [0, 0, 0.03]]), scale_atoms=True)
    zno.rattle(0.1, seed=2)
    nacl = bulk("NaCl", "rocksalt", a=5.64) * (2, 1, 1)  # ideal: ties among equidistant neighbours
    nacl.positions[0] += [0.08, -0.05, 0.03]
    ideal = fcc111("Pt", size=(2, 2, 4), vacuum=6.0)  # unrattled ideal layers
    slab = fcc100("Cu", size=(2, 2, 4), vacuum=6.0)
    add_adsorbate(slab, molecule("CO"), 2.0, "ontop")
    top = slab.positions[:, 2] > slab.positions[:16, 2].max() - 0.1
    slab.positions[top] += rng.normal(scale=0.05, size=(int(top.sum()), 3))
    structures = [copper, zno, nacl, ideal, slab]
    for atoms in structures:
        atoms.pbc = True
    path = tmp_path / "frames.extxyz"
    ase.io.write(path, structures)
    return path, ase.io.read(path, index=":")  # the reference sees the positions eqv2 reads from the file


# Relative error allowed in float32 (both sides), as issue 26 asks.  It holds because a converted model
# reproduces fairchem's float32 round-off where these random-weight models amplify it (docs/fairchem.md,
# "float32 numerics"): positions wrapped into the cell in float64 before the float32 cast, the Gaussian centres
# from a float32 linspace, the edges' polar angle from acos (with fairchem's edge-frame roll pinned to eqv2's,
# fairchem_reference.deterministic_frames: its random roll alone moves its forces by ~1e-5).  Measured worst
# (python -m diagnostics.fairchem_f32_errors): E 3e-7, F 2.3e-6, stress 1.4e-6; before that, F 2.1e-5, S 1.8e-5.
TOLERANCE = 1e-5


def rel_err(ours, ref) -> float:
    return float(np.linalg.norm(np.asarray(ours) - ref) / np.linalg.norm(ref))


def convert(checkpoint, tmp_path):
    from eqv2.tools.convert import main

    src, dst = tmp_path / "fairchem.pt", tmp_path / "eqv2.pt"
    torch.save(checkpoint, src)
    assert main([str(src), str(dst)]) == 0
    return dst


@pytest.mark.parametrize("case", list(CASES))
def test_converted_omat_family_predicts_energy_forces_stress_as_fairchem(case, tmp_path):
    from ase.stress import full_3x3_to_voigt_6_stress

    checkpoint, reference = fairchem_model(case)
    dst = convert(checkpoint, tmp_path)
    path, structures = frames(tmp_path)
    out = tmp_path / "pred.npz"
    proc = subprocess.run([sys.executable, "-m", "eqv2.predict", "--checkpoint", str(dst), "--input", str(path),
                           "--output", str(out), "--device", "cpu"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    predicted = np.load(out)
    assert predicted["stress"].shape == (len(structures), 3, 3)
    calc = EquiformerV2Calculator(str(dst), device="cpu")
    assert "stress" in calc.implemented_properties
    start, worst = 0, {"energy": 0.0, "forces": 0.0, "stress": 0.0}
    for i, atoms in enumerate(structures):
        ref_e, ref_f, ref_s = reference(atoms)
        ref_s = ref_s.reshape(3, 3)
        errors = {"energy": rel_err(predicted["energy"][i:i + 1], ref_e.reshape(-1)),
                  "forces": rel_err(predicted["forces"][start:start + len(atoms)], ref_f),
                  "stress": rel_err(predicted["stress"][i], ref_s)}
        start += len(atoms)
        if i in (0, 3):  # the ASE calculator too: a strained bulk crystal and the ideal slab
            atoms.calc = calc
            errors["energy"] = max(errors["energy"], rel_err([atoms.get_potential_energy()], ref_e.reshape(-1)))
            errors["forces"] = max(errors["forces"], rel_err(atoms.get_forces(), ref_f))
            errors["stress"] = max(errors["stress"], rel_err(atoms.get_stress(), full_3x3_to_voigt_6_stress(ref_s)))
        worst = {k: max(worst[k], v) for k, v in errors.items()}
        assert max(errors.values()) <= TOLERANCE, (case, i, errors)
    print(f"{case}: worst relative errors {worst}")


@pytest.mark.parametrize("case", list(CASES))
def test_converted_omat_family_in_float64_is_fairchems_function(case, tmp_path):
    """In float64, with fairchem's float32-only steps made float64 (its S2-grid matrices, Gaussian centres and
    width, layer-norm degree weights, periodic offsets) and the wrapped positions not rounded, eqv2's float64
    path (a converted model with eqv2's own numerics, meta numerics: eqv2) computes fairchem's function: E, F
    and stress agree to 5e-9 relative on every frame. Measured: E 2e-16, F 8e-10, stress 2e-14. The forces'
    8e-10 comes from fairchem's acos of the polar angle, which in float64 still loses digits on the ideal
    slab's edges within 1e-8 rad of the polar axis (with eqv2 taking acos too: 4e-14). 5e-9 leaves a margin
    for libm's acos on other machines. What remains in float32 (test above) is round-off, not a difference
    of the functions. The DeNS constants are folded into the reference's weights as the converter folds
    them (fold_dens_biases)."""
    from eqv2.batch import AtomsBatch
    from eqv2.calculator import wrapped_positions
    from eqv2.checkpoint import load_model

    checkpoint, reference = fairchem_model(case, float64=True)
    dst = convert(checkpoint, tmp_path)
    payload = torch.load(dst, weights_only=True)
    assert payload["meta"]["numerics"] == "fairchem"
    payload["meta"]["numerics"] = "eqv2"  # the float64-built constants of eqv2's own models
    torch.save(payload, dst)
    potential = load_model(dst).to(torch.float64)
    _, structures = frames(tmp_path)
    worst = {"energy": 0.0, "forces": 0.0, "stress": 0.0}
    for i, atoms in enumerate(structures):
        ref_e, ref_f, ref_s = reference(atoms)
        batch = AtomsBatch.from_arrays([dict(positions=wrapped_positions(atoms), numbers=atoms.numbers,
                                             cell=np.array(atoms.cell), pbc=atoms.pbc)], float_dtype=torch.float64)
        with torch.no_grad():
            out = potential(batch)
        errors = {"energy": rel_err(out["energy"].numpy(), ref_e.reshape(-1)),
                  "forces": rel_err(out["forces"].numpy(), ref_f),
                  "stress": rel_err(out["stress"][0].numpy(), ref_s.reshape(3, 3))}
        worst = {k: max(worst[k], v) for k, v in errors.items()}
        assert max(errors.values()) <= 5e-9, (case, i, errors)
    print(f"{case} float64: worst relative errors {worst}")


def test_a_converted_omat_model_relaxes_a_crystal_cell_through_ase(tmp_path):
    """FIRE on ASE's FrechetCellFilter (volume only: hydrostatic_strain) with eqv2's stress from a converted
    DeNS model.  Random weights give a rough pressure-volume curve with no root near any given volume, so
    the test makes one: on fcc Cu it finds fairchem's steepest rise of the pressure with the lattice
    constant, shifts the isotropic stress normaliser's mean so that the pressure vanishes there (fairchem's
    own trainer adds that mean), strains the crystal past it and relaxes.  The stress the optimizer reads
    is compared with fairchem's at the start and the end; the cell must change and the pressure drop."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    def pressure(stress):  # ASE's sign: positive under tension
        return float(np.trace(np.asarray(stress).reshape(3, 3))) / 3.0

    def crystal(a):  # forces vanish by symmetry; the optimizer moves the cell
        return bulk("Cu", "fcc", a=a, cubic=True)

    means = {"stress_anisotropic": 0.0}
    _, scan = fairchem_model("dens_published", means)
    grid = np.arange(3.40, 3.72, 0.02)
    curve = np.array([pressure(scan(crystal(a))[2]) for a in grid])
    i = int(np.argmax(np.diff(curve)))  # the steepest rise: a stable volume once the pressure vanishes there
    means["stress_isotropic"] = 0.004 - np.sqrt(3.0) * (curve[i] + curve[i + 1]) / 2  # pressure = iso / sqrt(3)
    checkpoint, reference = fairchem_model("dens_published", means)
    calc = EquiformerV2Calculator(str(convert(checkpoint, tmp_path)), device="cpu")
    atoms = crystal(grid[i + 1] + 0.02)
    atoms.calc = calc
    start_stress, start_volume = atoms.get_stress(voigt=False), atoms.get_volume()
    assert rel_err(start_stress, reference(atoms)[2].reshape(3, 3)) <= TOLERANCE
    seen = []  # the stress the optimizer read at each step (the calculator's cached result)
    optimizer = FIRE(FrechetCellFilter(atoms, hydrostatic_strain=True), logfile=None)
    optimizer.attach(lambda: seen.append(atoms.get_stress(voigt=False)))
    assert optimizer.run(fmax=2e-3, steps=200), f"not converged: pressures {[pressure(s) for s in seen][-5:]}"
    print(f"relaxed in {optimizer.nsteps} steps: pressure {pressure(start_stress):.2e} -> {pressure(atoms.get_stress(voigt=False)):.2e} "
          f"eV/A^3, volume {start_volume:.3f} -> {atoms.get_volume():.3f} A^3")
    end_stress = atoms.get_stress(voigt=False)
    # near zero pressure the stress is small: compared in eV/Å^3 (float32 round-off ~1e-7 there)
    assert np.abs(end_stress - reference(atoms)[2].reshape(3, 3)).max() <= 1e-6
    assert abs(atoms.get_volume() - start_volume) / start_volume > 0.01
    assert abs(pressure(end_stress)) < 0.05 * abs(pressure(start_stress))
    assert abs(pressure(start_stress)) > 1e-3  # eV/Å^3: a real start (0.16 GPa)
