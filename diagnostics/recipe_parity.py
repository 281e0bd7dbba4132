#!/usr/bin/env python
"""Step-by-step recipe parity: eqv2's training step against fairchem-core 1.10.0's, from the same weights.

Both sides start from one set of weights (fairchem's EquiformerV2 initialisation, converted with
eqv2.fairchem_compat) and train on the same batches in the same order.  eqv2's side is its trainer's
pieces: `EnergyForceLoss` with the step's global counts, `build_optimizer` (AdamW and its parameter
groups), `lr_factor` (set on the groups before each step, as eqv2/train.py does), `clip_gradients`
and `EMA`.  fairchem's side is its trainer's own code, called on a minimal trainer object:
`BaseTrainer.load_loss` / `load_optimizer`, `EquiformerV2ForcesTrainer.load_extras` (cosine
scheduler with epochs converted to steps, clipping, EMA), `OCPTrainer._forward` / `_compute_loss`
and `BaseTrainer._backward`, then `scheduler.step()` as `OCPTrainer.train` does.  After every step
the losses (energy, force, total), learning rate, gradient norm (before clipping), updated weights
and EMA weights are compared.  Dropout and stochastic depth are off; the reference's random roll
angle per edge is replaced by eqv2's deterministic edge frames (the models are invariant to it).

Examples:
    python -m diagnostics.recipe_parity                                 # small model, float64, 50 steps, CPU
    python -m diagnostics.recipe_parity --model configs/model/eqv2_31M.yaml --set num_layers=4 \\
        --dtype float32 --device cuda --steps 200 --batch-size 8 --json parity.json

Exit status 0 when every compared quantity agrees within --rtol (relative to its size), 1 otherwise.
Needs fairchem-core 1.10.0 (`pip install --no-deps fairchem-core==1.10.0`) and torch_geometric.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch


from eqv2.batch import AtomsBatch
from eqv2.config import ConfigError, apply_overrides, from_dict, load_yaml
from eqv2.fairchem_compat import convert_state_dict, fairchem_hparams
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.model.graph import GraphBuilder
from eqv2.training.ema import EMA
from eqv2.training.loss import EnergyForceLoss, LossConfig, Normalizers, global_counts
from eqv2.training.optim import OptimConfig, build_optimizer, clip_gradients, lr_factor, param_groups

SMALL = dict(num_layers=2, lmax=3, mmax=2, sphere_channels=16, attn_hidden_channels=16, num_heads=2,
             attn_alpha_channels=8, attn_value_channels=4, ffn_hidden_channels=16, edge_channels=16,
             max_radius=6.0, max_neighbors=12)
NO_DROPOUT = dict(alpha_drop=0.0, drop_path_rate=0.0, proj_drop=0.0)
# OC20 recipe (configs/train/oc20_*.yaml) at a short length: cosine over the run, 20 % warm-up
RECIPE = dict(lr=4e-4, weight_decay=1e-3, warmup_factor=0.2, lr_min_factor=0.01, ema_decay=0.999,
              energy_coef=4.0, force_coef=100.0, clip=100.0)


# fairchem-core is installed without its dependencies (its torch pin); these are imported by the trainer
# modules at load time only (numba: the balanced batch sampler's njit; wandb: the logger classes)
IMPORT_ONLY = ("numba", "wandb", "submitit.core.utils", "submitit.helpers")


class _Unused:
    """What a stubbed import-only name stands for (numba.njit is applied as a decorator: identity)."""

    def __new__(cls, fn=None, *args, **kwargs):
        return fn if callable(fn) else (lambda f: f)


def _stub_attribute(name: str):
    """A stub module's missing attribute: _Unused, except for dunder names (`__file__`, `__spec__`, ...),
    which stay missing so that tools walking sys.modules (torch.compile's Dynamo does) see no stand-in."""
    if name.startswith("__"):
        raise AttributeError(name)
    return _Unused


# --- importing fairchem ---------------------------------------------------------------------------
def import_fairchem():
    """fairchem's trainer and model modules.  fairchem imports torch_scatter at module level, which has
    no wheel for current torch; a stand-in with the one function EquiformerV2 uses (`scatter`, through
    torch_geometric) is registered first when it is missing."""
    try:
        import torch_scatter  # noqa: F401
    except ImportError:
        from torch_geometric.utils import scatter

        shim = types.ModuleType("torch_scatter")
        shim.scatter = lambda src, index, dim=-1, out=None, dim_size=None, reduce="sum": scatter(
            src, index, dim=dim, dim_size=dim_size, reduce=reduce)
        shim.segment_coo = shim.segment_csr = None
        sys.modules["torch_scatter"] = shim
    for name in IMPORT_ONLY:  # imported at module level by fairchem's trainer modules, never used here
        try:
            __import__(name.split(".")[0])
        except ImportError:
            for depth in range(1, name.count(".") + 2):
                part = ".".join(name.split(".")[:depth])
                stub = sys.modules.setdefault(part, types.ModuleType(part))
                stub.__path__ = []  # a package, so that its submodules import
                stub.__getattr__ = _stub_attribute
    import fairchem.core.models.equiformer_v2.equiformer_v2_deprecated as legacy
    from fairchem.core.models.equiformer_v2.trainers.forces_trainer import EquiformerV2ForcesTrainer
    from fairchem.core.modules.normalization.normalizer import Normalizer
    from fairchem.core.trainers.base_trainer import BaseTrainer
    from fairchem.core.trainers.ocp_trainer import OCPTrainer

    return types.SimpleNamespace(legacy=legacy, BaseTrainer=BaseTrainer, OCPTrainer=OCPTrainer,
                                 ForcesTrainer=EquiformerV2ForcesTrainer, Normalizer=Normalizer)


def eqv2_edge_frames(edge_vec: torch.Tensor) -> torch.Tensor:
    """[E, 3, 3] rotations taking each edge direction to +y with zero roll (eqv2's frames), in place
    of the reference's random roll."""
    from e3nn import o3

    d = edge_vec / edge_vec.norm(dim=1, keepdim=True)
    alpha = torch.atan2(d[:, 0], d[:, 2])
    beta = torch.atan2(torch.hypot(d[:, 0], d[:, 2]), d[:, 1])
    return o3.angles_to_matrix(alpha, beta, torch.zeros_like(alpha)).transpose(1, 2)


# --- data ------------------------------------------------------------------------------------------
def emt_structures(count: int, seed: int) -> list[dict]:
    """Adsorbate+slab structures with EMT energies and forces; bottom layer fixed, as in OC20."""
    from ase.build import add_adsorbate, fcc111
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        slab = fcc111(["Cu", "Pt", "Ag", "Ni", "Au"][i % 5], size=(2, 2, 2), vacuum=6.0)
        # cell on a 2^-12 Å grid: fairchem computes the periodic image offsets as float32(offsets) @
        # float32(cell) (common.utils.get_pbc_distances), which is then exact, also in a float64 run
        slab.set_cell(np.round(np.asarray(slab.cell) * 4096) / 4096, scale_atoms=False)
        add_adsorbate(slab, ["O", "C", "N", "H"][(i // 5) % 4], 1.8, ["ontop", "fcc", "hcp"][i % 3])
        fixed = slab.get_tags() == 2  # fcc111 tags layers from the top (2: bottom); the adsorbate has 0
        slab.positions[~fixed] += rng.normal(0, 0.1, (int((~fixed).sum()), 3))
        slab.calc = EMT()
        out.append({"positions": slab.positions.copy(), "numbers": slab.numbers.copy(),
                    "cell": np.asarray(slab.cell), "pbc": slab.pbc.copy(), "tags": np.where(fixed, 0, 1),
                    "fixed": fixed, "energy": slab.get_potential_energy(), "forces": slab.get_forces()})
    return out


def batches(structures: list[dict], batch_size: int, cfg: ModelConfig, dtype, device) -> list[AtomsBatch]:
    graphs = GraphBuilder(cfg.max_radius, cfg.max_neighbors, cfg.max_num_elements)
    out = []
    for k in range(0, len(structures) - batch_size + 1, batch_size):
        batch = AtomsBatch.from_arrays(structures[k:k + batch_size], float_dtype=dtype)
        batch = graphs(batch)
        out.append(batch.to(device))
    return out


def pyg_batch(batch: AtomsBatch):
    """The same batch as fairchem reads it (torch_geometric), with eqv2's graph precomputed."""
    from torch_geometric.data import Data

    data = Data(pos=batch.pos, atomic_numbers=batch.atomic_numbers.to(batch.pos.dtype), cell=batch.cell,
                natoms=batch.natoms, batch=batch.batch, edge_index=batch.edge_index,
                cell_offsets=batch.cell_offset.to(batch.pos.dtype),
                neighbors=torch.bincount(batch.batch[batch.edge_index[1]], minlength=batch.num_graphs),
                fixed=batch.fixed.long(), energy=batch.energy, forces=batch.forces, tags=batch.tags)
    data.num_graphs = batch.num_graphs
    return data


# --- the two trainers ------------------------------------------------------------------------------
class Eqv2Side:
    """eqv2's training step on one process, as eqv2/train.py's take_step without the engine."""

    def __init__(self, model: EquiformerV2, optim: OptimConfig, loss: LossConfig, norms: Normalizers,
                 total: int, warmup: int, clip: float):
        self.model, self.optim, self.total, self.warmup, self.clip = model, optim, total, warmup, clip
        self.optimizer = build_optimizer(model, optim)
        self.loss_fn = EnergyForceLoss(loss, norms)
        self.ema = EMA(model, optim.ema_decay, optim.ema_warmup)
        self.step = 0

    def train_step(self, batch: AtomsBatch) -> dict:
        lr = self.optim.lr * lr_factor(self.step, self.total, self.warmup, self.optim.warmup_factor,
                                       self.optim.lr_min_factor)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        counts = global_counts([batch], self.loss_fn.cfg.train_on_free_atoms, batch.pos.device)
        out = self.model(batch)
        loss, terms = self.loss_fn(out, batch, counts, 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.ema.update()
        self.step += 1
        return {"loss": float(terms["loss"]), "energy_loss": self.loss_fn.cfg.energy_coef * float(terms["energy_mae_norm"]),
                "force_loss": self.loss_fn.cfg.force_coef * float(terms["force_l2mae_norm"]), "lr": lr,
                "grad_norm": float(grad_norm)}

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters()}

    def ema_weights(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.ema.names, self.ema.shadow))


class FairchemSide:
    """fairchem's trainer methods on a minimal trainer object (no datasets, loggers or processes)."""

    def __init__(self, fc, model, norms: Normalizers, steps_per_epoch: int, warmup_epochs: float,
                 dtype: torch.dtype, device, own_frames: bool = False):
        """own_frames: keep the reference's random edge-frame roll (default: eqv2's zero-roll frames)."""
        self.fc, self.recorded, self.dtype, self.own_frames = fc, {}, dtype, own_frames
        self.trainer = t = types.SimpleNamespace()
        t.model = t._unwrapped_model = model
        t.device, t.scaler, t.step, t.elementrefs = device, None, 0, {}
        t.config = {
            "loss_functions": [{"energy": {"fn": "mae", "coefficient": RECIPE["energy_coef"]}},
                               {"forces": {"fn": "l2mae", "coefficient": RECIPE["force_coef"]}}],
            "optim": {"optimizer": "AdamW", "lr_initial": RECIPE["lr"], "weight_decay": RECIPE["weight_decay"],
                      "max_epochs": 1, "scheduler": "LambdaLR", "clip_grad_norm": RECIPE["clip"],
                      "ema_decay": RECIPE["ema_decay"],
                      "scheduler_params": {"lambda_type": "cosine", "warmup_factor": RECIPE["warmup_factor"],
                                           "warmup_epochs": warmup_epochs, "lr_min_factor": RECIPE["lr_min_factor"]}},
            "logger": "none",
        }
        t.output_targets = {"energy": {"level": "system"},
                            "forces": {"level": "atom", "train_on_free_atoms": True, "eval_on_free_atoms": True}}
        t.normalizers = {
            "energy": fc.Normalizer(mean=torch.tensor(norms.energy_mean, dtype=dtype),
                                    rmsd=torch.tensor(norms.energy_std, dtype=dtype)).to(device),
            "forces": fc.Normalizer(mean=torch.tensor(0.0, dtype=dtype),
                                    rmsd=torch.tensor(norms.forces_std, dtype=dtype)).to(device)}
        t.train_loader = range(steps_per_epoch)  # only its length is read (steps per epoch)
        t.logger = types.SimpleNamespace(log=lambda values, step=None, split=None: self.recorded.update(values))
        fc.BaseTrainer.load_loss(t)
        for target, info in t.loss_functions:  # record each term as fairchem computes it
            info["fn"] = _Recorder(info["fn"], self.recorded, f"{target}_loss", info["coefficient"])
        fc.BaseTrainer.load_optimizer(t)
        fc.ForcesTrainer.load_extras(t)

    def train_step(self, batch: AtomsBatch) -> dict:
        t, fc = self.trainer, self.fc
        lr = t.scheduler.get_lr()
        t.step += 1
        data = pyg_batch(batch)
        # fairchem creates some tensors without a dtype (e.g. the edge embedding's zero padding): in
        # float64 its model runs under float64 as the default dtype
        frames = contextlib.nullcontext() if self.own_frames else _deterministic_frames(fc.legacy)
        with frames, _default_dtype(self.dtype):
            out = fc.OCPTrainer._forward(t, data)
            loss = fc.OCPTrainer._compute_loss(t, out, data)
            fc.BaseTrainer._backward(t, loss)
        t.scheduler.step()
        return {"loss": float(loss), "energy_loss": float(self.recorded["energy_loss"]),
                "force_loss": float(self.recorded["forces_loss"]), "lr": lr,
                "grad_norm": float(self.recorded["grad_norm"])}

    def weights(self, expected: dict) -> dict[str, torch.Tensor]:
        return convert_state_dict(dict(self.trainer.model.named_parameters()), expected)

    def ema_weights(self, expected: dict) -> dict[str, torch.Tensor]:
        names = [n for n, p in self.trainer.model.named_parameters() if p.requires_grad]
        return convert_state_dict(dict(zip(names, self.trainer.ema.shadow_params)), expected)

    def no_decay_names(self, expected: dict) -> list[str]:
        """eqv2 names of the parameters fairchem's optimizer puts in its weight_decay 0 group."""
        ids = {id(p) for g in self.trainer.optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
        named = {n: p for n, p in self.trainer.model.named_parameters()}
        marks = {n: torch.tensor(float(id(p) in ids)).expand(p.shape) for n, p in named.items()}
        return sorted(n for n, v in convert_state_dict(marks, expected).items() if bool(v.flatten()[0]))


class _Recorder(torch.nn.Module):
    """Wraps a fairchem loss function, recording coefficient × its value (the term of the total)."""

    def __init__(self, fn, into: dict, key: str, coefficient: float):
        super().__init__()
        self.fn, self.into, self.key, self.coefficient = fn, into, key, coefficient

    def forward(self, pred, target, natoms):
        value = self.fn(pred, target, natoms=natoms)
        self.into[self.key] = self.coefficient * value.detach()
        return value


class _default_dtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.saved)


class _deterministic_frames:
    def __init__(self, legacy):
        self.module = legacy

    def __enter__(self):
        self.saved = self.module.EquiformerV2._init_edge_rot_mat
        self.module.EquiformerV2._init_edge_rot_mat = lambda _self, data, edge_index, vec: eqv2_edge_frames(vec)

    def __exit__(self, *exc):
        self.module.EquiformerV2._init_edge_rot_mat = self.saved


# --- the comparison --------------------------------------------------------------------------------
def max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest |a − b| over all tensors, relative to max(|b|) of that tensor; and which tensor."""
    worst, name = 0.0, ""
    for key, ref in b.items():
        scale = float(ref.abs().max()) or 1.0
        err = float((a[key].to(ref.dtype) - ref).abs().max()) / scale
        if err > worst:
            worst, name = err, key
    return worst, name


def run(model_cfg: ModelConfig, steps: int, batch_size: int, dtype: torch.dtype, device: str,
        seed: int = 0, warmup_fraction: float = 0.2, progress=None) -> dict:
    """Train both sides for `steps` steps; returns per-step records and the parameter-group check."""
    fc = import_fairchem()
    torch.manual_seed(seed)
    with _default_dtype(dtype):  # the reference builds its tables (Gaussian centres, grids) in it
        ref = fc.legacy.EquiformerV2(**fairchem_hparams(model_cfg))
    ref = ref.to(device, dtype).train()
    ours = EquiformerV2(model_cfg).to(device, dtype).train()
    ours.load_state_dict(convert_state_dict(ref.state_dict(), ours.state_dict()))

    structures = emt_structures(max(2 * batch_size, 10), seed)
    data = batches(structures, batch_size, model_cfg, dtype, device)
    energies = np.array([s["energy"] for s in structures])
    forces = np.concatenate([s["forces"] for s in structures])
    norms = Normalizers(float(energies.mean()), float(energies.std()), float(np.sqrt((forces ** 2).mean())))

    # one "epoch" is the whole run: fairchem's cosine spans max_epochs × steps per epoch
    optim = OptimConfig(lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"], max_epochs=1,
                        warmup_epochs=warmup_fraction, warmup_factor=RECIPE["warmup_factor"],
                        lr_min_factor=RECIPE["lr_min_factor"], ema_decay=RECIPE["ema_decay"])
    total, warmup = optim.resolve_steps(steps)
    eq = Eqv2Side(ours, optim, LossConfig(energy_coef=RECIPE["energy_coef"], force_coef=RECIPE["force_coef"]),
                  norms, total, warmup, RECIPE["clip"])
    fs = FairchemSide(fc, ref, norms, steps, warmup_fraction, dtype, device)
    expected = dict(ours.named_parameters())
    ours_no_decay = sorted(param_groups(ours, RECIPE["weight_decay"])[1])
    ref_no_decay = fs.no_decay_names(expected)
    records = []
    for step in range(steps):
        batch = data[step % len(data)]
        a, b = eq.train_step(batch), fs.train_step(batch)
        rec = {"step": step + 1, "eqv2": a, "fairchem": b}
        for key in a:
            rec[f"{key}_rel"] = abs(a[key] - b[key]) / max(abs(b[key]), 1e-30)
        rec["weights_rel"], rec["weights_worst"] = max_rel(eq.weights(), fs.weights(expected))
        rec["ema_rel"], rec["ema_worst"] = max_rel(eq.ema_weights(), fs.ema_weights(expected))
        records.append(rec)
        if progress:
            progress(rec)
    return {"steps": records, "total_steps": total, "warmup_steps": warmup,
            "no_decay_equal": ours_no_decay == ref_no_decay,
            "no_decay_only_eqv2": sorted(set(ours_no_decay) - set(ref_no_decay)),
            "no_decay_only_fairchem": sorted(set(ref_no_decay) - set(ours_no_decay))}


KEYS = ("loss", "energy_loss", "force_loss", "lr", "grad_norm", "weights", "ema")


def worst(result: dict) -> dict[str, float]:
    return {k: max(r[f"{k}_rel"] for r in result["steps"]) for k in KEYS}


def model_config(path: str | None, overrides: list[str]) -> ModelConfig:
    raw = {**SMALL} if path is None else load_yaml(path)
    apply_overrides(raw, overrides)
    return from_dict(ModelConfig, {**raw, **NO_DROPOUT}, prefix="model")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model YAML (default: a small 2-layer L3 model)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model key")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rtol", type=float, default=None, help="pass mark (default 1e-9 float64, 1e-3 float32)")
    p.add_argument("--json", default=None, help="write every step's numbers here")
    args = p.parse_args(argv)
    try:
        cfg = model_config(args.model, args.set)
    except (ConfigError, FileNotFoundError) as err:
        print(f"recipe_parity: {err}", file=sys.stderr)
        return 2
    if args.steps < 5 or args.batch_size < 1:
        p.error("--steps must be >= 5 and --batch-size >= 1")
    dtype = getattr(torch, args.dtype)
    rtol = args.rtol if args.rtol is not None else (1e-9 if dtype == torch.float64 else 1e-3)

    def show(rec):
        if rec["step"] % 10 == 0 or rec["step"] == 1:
            print(f"step {rec['step']:4d}  loss {rec['eqv2']['loss']:.6g} vs {rec['fairchem']['loss']:.6g}  "
                  + "  ".join(f"{k} {rec[f'{k}_rel']:.1e}" for k in KEYS), flush=True)

    result = run(cfg, args.steps, args.batch_size, dtype, args.device, args.seed, progress=show)
    w = worst(result)
    print("worst relative difference over the run: " + ", ".join(f"{k} {v:.2e}" for k, v in w.items()))
    print(f"weight-decay groups identical to fairchem's: {result['no_decay_equal']}"
          + ("" if result["no_decay_equal"] else f" (only eqv2: {result['no_decay_only_eqv2'][:5]}, "
                                                  f"only fairchem: {result['no_decay_only_fairchem'][:5]})"))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **result, "worst": w}, indent=1))
        print(f"recipe_parity: wrote {args.json}")
    ok = result["no_decay_equal"] and all(v <= rtol and math.isfinite(v) for v in w.values())
    print(f"recipe_parity: {'PASS' if ok else 'FAIL'} (rtol {rtol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
