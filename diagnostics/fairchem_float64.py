"""Diagnostic (issue 26 precision): eqv2 vs fairchem-core 1.10.0 on the OMat24-family test models of
tests/model/test_fairchem_stress.py, per frame relative errors of E, F, stress and of the backbone's
intermediate node features (edge-degree embedding, each block, final norm; forward hooks on both).

    CASE=dens_published F64=1 python -m diagnostics.fairchem_float64

F64=1 (default) runs both models in float64 (fairchem: model.to(float64), default dtype float64 during
its forward so that its Wigner blocks, written into torch.zeros, stay float64; its graph selection still
runs in float32, as radius_graph_pbc casts the cell to float32, and the distances are then recomputed in
float64).  EXACT_POS=1 (default) gives fairchem its wrapped positions in float64 (AtomsToGraphs rounds
them to float32).  Switches for bisecting: GRID64=1 rebuilds fairchem's SO3_Grid matrices in float64,
EXACT_RBF=1 its Gaussian centres/width in float64 arithmetic, DEGREE64=1 its layer-norm degree weights, JD64=1 swaps its Jd.pt (no effect seen:
check that the shimmed fairchem reads that module).
Finding (session 16): with fairchem's three float32-only pieces made float64 (OFFSETS64=1, the default in
float64: get_pbc_distances' cell_offsets @ cell, which it casts to float32; EXACT_RBF=1: its Gaussian
centres and width built in float32; GRID64=1: its S2-grid matrices built in float32) the two functions
agree in float64 (hydra_published: edge-degree embedding 1e-14, E 2e-11, F 1.6e-8, stress 1.7e-9).
Without them float64 forces still differ by 2e-5: the float32 gap is those constants and the input
rounding (fairchem rounds positions wrapped into the cell, eqv2 the unwrapped ones), amplified by these
random models' sensitivity, not a difference of the functions.  In float32 (F64=0, hydra_published) the
worst force error is 2.1e-5; WRAP=1 (eqv2 given the wrapped positions) 1.2e-5; WRAP=1 plus eqv2's
Gaussian centres/width taken from float32 linspace as fairchem's (a temporary edit of
eqv2/model/radial.py, not committed) 8e-6, stress 1.2e-6, on every frame.
Session 17: conversion now follows fairchem there (wrapped positions, float32 Gaussian centres, acos polar
angle: docs/fairchem.md "float32 numerics"; per-frame float32 errors: python -m diagnostics.fairchem_f32_errors),
and the float64 remainder (F 1.6e-8) was a fourth float32-built constant, the layer norms'
balance_degree_weight: with DEGREE64=1 too, E 2e-16, F 7e-10, stress 3e-15 (tests/model/test_fairchem_stress.py
checks it at 1e-9)."""
import sys, torch, numpy as np  # noqa: E401
sys.argv=[sys.argv[0]]
import tests.model.test_fairchem_stress as T
import fairchem.core.models.equiformer_v2.equiformer_v2_dens  # noqa: F401  (registers the DeNS names)
from tests.model import fairchem_reference as fr
from eqv2.checkpoint import load_model
from eqv2.calculator import atoms_to_batch
import pathlib, tempfile, os  # noqa: E401
case = os.environ.get("CASE","dens_published")
DT = torch.float64 if os.environ.get("F64","1")=="1" else torch.float32
ckpt, reference = T.fairchem_model(case)
# grab trainer via closure
cl = {n: c.cell_contents for n, c in zip(reference.__code__.co_freevars, reference.__closure__)}
trainer, outputs, OCPTrainer = cl["trainer"], cl["outputs"], cl["OCPTrainer"]
if os.environ.get("GRID64")=="1":
    from fairchem.core.models.equiformer_v2.so3 import SO3_Grid
    torch.set_default_dtype(torch.float64)
    n=0
    for mod in list(trainer.model.modules()):
        for cname, ch in list(mod.named_children()):
            if isinstance(ch, SO3_Grid):
                res = ch.lat_resolution if ch.lat_resolution == ch.long_resolution else None
                new = SO3_Grid(ch.lmax, ch.mmax, resolution=res, normalization="component"); setattr(mod, cname, new); n+=1
    torch.set_default_dtype(torch.float32); print("rebuilt grids", n)
if os.environ.get("JD64", "0") == "1" and DT == torch.float64:  # fairchem's Jd.pt holds float32 values
    import fairchem.core.models.equiformer_v2.wigner as FW
    from eqv2.model.so3 import _swap_matrices
    jd = _swap_matrices(len(FW._Jd) - 1)
    print("Jd max diff", max(float((a.double() - b).abs().max()) for a, b in zip(FW._Jd, jd)))
    FW._Jd[:] = list(jd)
if os.environ.get("EXACT_RBF") == "1":  # fairchem's Gaussian centres and width from float64 arithmetic
    from fairchem.core.models.scn.smearing import GaussianSmearing
    for m in trainer.model.modules():
        if isinstance(m, GaussianSmearing):
            n = m.offset.numel(); stop = float(m.offset[-1])
            m.offset = torch.linspace(0.0, stop, n, dtype=torch.float64)
            w = (-0.5 / m.coeff) ** 0.5 / (float(m.offset[1] - m.offset[0]))
            m.coeff = -0.5 / (round(w, 4) * stop / (n - 1)) ** 2
trainer.model.to(DT)
for v in list(trainer.normalizers.values()) + list(trainer.elementrefs.values()): v.to(DT)
tmp = pathlib.Path(tempfile.mkdtemp())
dst = T.convert(ckpt, tmp)
pot = load_model(str(dst), "cpu").eval().to(DT)
# NUMERICS=fairchem (default in float32): the converted model's fairchem constants (eqv2.fairchem_compat.
# use_fairchem_numerics, applied by load_model); eqv2 (default in float64): eqv2's own float64-built ones
if os.environ.get("NUMERICS", "eqv2" if DT == torch.float64 else "fairchem") == "eqv2":
    from eqv2.model.radial import GaussianRadialBasis
    cfg = pot.config
    pot.model.radial_basis = GaussianRadialBasis(cfg.max_radius, cfg.num_distance_basis)
    pot.model.wigner.fairchem_polar_angle = False
if os.environ.get("DEGREE64") == "1":  # fairchem's layer-norm degree weights 1/((2l+1)(L+1)), float32-built
    for m in trainer.model.modules():
        if getattr(m, "balance_degree_weight", None) is not None:
            m.balance_degree_weight = 1.0 / torch.round(1.0 / m.balance_degree_weight.double())
path, structures = T.frames(tmp)
from fairchem.core.datasets import data_list_collater
from fairchem.core.preprocessing import AtomsToGraphs
import fairchem.core.models.base as FB
FB.radius_graph_pbc = fr.float32_selection(FB.radius_graph_pbc)
if DT == torch.float64 and os.environ.get("OFFSETS64", "1") == "1":
    FB.get_pbc_distances = fr.pbc_distances64  # offsets in float64 (fairchem's own: cell_offsets @ cell in float32)
def ref(atoms):
    a2g = AtomsToGraphs(r_energy=False, r_forces=False, r_distances=False, r_pbc=True, r_edges=False)
    batch = data_list_collater([a2g.convert(atoms)], otf_graph=True)
    if os.environ.get("EXACT_POS", "1") == "1":  # fairchem's wrapped positions, not rounded to float32 first
        from ase.geometry import wrap_positions
        cell = np.array(atoms.get_cell(complete=True))
        batch.pos = torch.tensor(wrap_positions(atoms.get_positions(), cell, pbc=atoms.pbc, eps=0), dtype=DT)
        batch.cell = torch.tensor(cell, dtype=DT).view(1, 3, 3)
    batch.pos = batch.pos.to(DT); batch.cell = batch.cell.to(DT)
    with fr.deterministic_frames(T.LEGACY, T.HYDRA), torch.no_grad():
        out = OCPTrainer._forward(trainer, batch)
        out = {k: trainer._denorm_preds(k, out[k], batch) for k in outputs}
    return [out[k].detach().double().numpy() for k in ("energy","forces","stress")]
if DT == torch.float64: torch.set_default_dtype(torch.float64)
caught = {}
def hook(tag):
    def h(mod, inp, out):
        t = out.embedding if hasattr(out, "embedding") else out
        caught[tag] = t.detach().double().clone()
    return h
fb = trainer.model.backbone
for i, blk in enumerate(fb.blocks): blk.register_forward_hook(hook(f"fc_block{i}"))
fb.norm.register_forward_hook(hook("fc_norm"))
fb.edge_degree_embedding.register_forward_hook(hook("fc_edeg"))
eb = [m for n, m in pot.named_modules() if hasattr(m, "blocks") and hasattr(m, "norm")][0]
for i, blk in enumerate(eb.blocks): blk.register_forward_hook(hook(f"eq_block{i}"))
eb.norm.register_forward_hook(hook("eq_norm"))
if os.environ.get("DIST") == "1":  # the sorted edge lengths each side sees
    fb.distance_expansion.register_forward_hook(lambda m, i, o: caught.__setitem__("fd", i[0].detach().double().sort()[0]))
    eb.radial_basis.register_forward_hook(lambda m, i, o: caught.__setitem__("ed", i[0].detach().double().sort()[0]))
eb.edge_degree_embedding.register_forward_hook(hook("eq_edeg"))
for i, atoms in enumerate(structures):
    e,f,s = ref(atoms)
    b = atoms_to_batch([atoms])
    if os.environ.get("WRAP") == "1":  # eqv2 given the positions wrapped as fairchem's AtomsToGraphs wraps them
        from ase.geometry import wrap_positions
        atoms = atoms.copy(); atoms.positions = wrap_positions(atoms.positions, atoms.cell, pbc=atoms.pbc, eps=0)
    b.pos = torch.tensor(atoms.get_positions(), dtype=DT); b.cell = torch.tensor(np.array(atoms.get_cell(complete=True)), dtype=DT).view(1, 3, 3)  # not via float32
    with torch.no_grad(): o = pot(b)
    r = lambda a, c: float(np.linalg.norm(a.detach().double().numpy().reshape(c.shape)-c)/np.linalg.norm(c))
    if "fd" in caught:
        a, c = caught.pop("ed"), caught.pop("fd")
        from ase.neighborlist import neighbor_list
        exact = torch.tensor(np.sort(neighbor_list("d", atoms, float(c.max()) + 1e-3)))
        near = lambda d: float((d[:, None] - exact[None, :]).abs().min(dim=1)[0].max())
        print("    vs ASE float64 distances: eqv2 %.2e fairchem %.2e" % (near(a), near(c)))
        print("    distances", a.shape, c.shape, "max diff %.2e" % float((a - c).abs().max()) if a.shape == c.shape else "")
    for tag in sorted(k[3:] for k in caught if k.startswith("fc_")):
        a, c = caught["eq_"+tag], caught["fc_"+tag]
        if a.shape != c.shape: print(tag, a.shape, c.shape); continue
        print("   ", tag, "%.2e" % float((a-c).norm()/c.norm()))
    print(case, i, len(atoms), "E %.2e F %.2e S %.2e |F| %.3g |S| %.3g" % (r(o["energy"],e.reshape(-1)), r(o["forces"],f), r(o["stress"][0],s.reshape(3,3)), np.linalg.norm(f), np.linalg.norm(s)), flush=True)
