#!/usr/bin/env python
"""Training-step benchmark of EquiformerV2: samples/s, atoms/s, peak memory, FLOPs and MFU.

One training step = forward, energy-MAE + force-L2MAE loss, backward, AdamW step.  Structures are
OC20-like adsorbate+slab systems built with ASE (fcc(111) slabs of several metals with small
adsorbates, 10 Å vacuum, rattled; sizes drawn so the mean is ~72 atoms), graphs with radius 12 Å
and <= 20 neighbours.  When fairchem-core 1.10.0 is importable (tests/model/fairchem_shim supplies
torch_scatter), its EquiformerV2 runs on the same batches in the same process (fp16 AMP with
GradScaler, as it trains) and the ratio is printed.

    python -m bench.model --configs 31M 153M --batch-sizes 4 8 --steps 20 [--impls eager compiled] [--reference]
        [--ac-every 0 2] [--memory-budget 0.5] [--mode reduce-overhead --pad 64 2048] [--cpp-wrapper] [--json out.json]
        [--profile ops.txt] [--graphs loader|model]

eqv2's graphs are built ahead on the CPU by default (`--graphs loader`), and padded there to the plan's shape
buckets, as the trainer's data-loader workers do (data.build_graphs), so the timed step starts from the graph;
fairchem builds its graph inside its forward pass (otf_graph), as its OC20 training configs do.

--forces direct gradient: also time gradient (conservative) forces, model.forces: gradient, whose force
loss needs a double backward; eager only (torch.compile cannot differentiate twice; the fused SO(2)
gradient and rotation kernels are off for it), printed as the ratio to the direct head's eager step:

    python -m bench.model --configs 31M 153M --batch-sizes 8 --impls eager compiled --forces direct gradient \
        --json $OUT/gradient_forces.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from eqv2.batch import AtomsBatch
from eqv2.buckets import loader_prepare
from eqv2.config import from_dict, load_yaml
from eqv2.execution import REFERENCE, ExecutionOverrides, ExecutionPlan, apply_plan, choose_plan
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2, count_parameters
from eqv2.model.graph import GraphBuilder
from eqv2.training.activation_checkpointing import ActivationCheckpointConfig, apply_activation_checkpointing
from eqv2.training.compile import CompileConfig, apply_compile

SLAB_SIZES = [(3, 3, 5), (4, 4, 4), (3, 4, 6), (4, 4, 5), (4, 5, 4), (3, 5, 6), (4, 4, 4)]  # 45..90, mean ~71 + adsorbate
METALS = ["Cu", "Pt", "Ag", "Ni", "Pd", "Au", "Al"]
ADSORBATES = ["CO", "OH", "H2O", "NH3", "CH3", "CH4", "O", "H"]


def oc20_like_structures(count: int, seed: int) -> list[dict]:
    from ase import Atoms
    from ase.build import add_adsorbate, fcc111, molecule

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        size = SLAB_SIZES[rng.integers(len(SLAB_SIZES))]
        slab = fcc111(METALS[rng.integers(len(METALS))], size=size, vacuum=10.0)
        name = ADSORBATES[rng.integers(len(ADSORBATES))]
        ads = Atoms(name) if len(name) == 1 else molecule(name)
        add_adsorbate(slab, ads, 2.0, "ontop")
        slab.rattle(0.05, seed=int(rng.integers(1 << 30)))
        n = len(slab)
        out.append(dict(positions=slab.positions, numbers=slab.numbers, cell=np.array(slab.cell), pbc=slab.pbc,
                        fixed=np.zeros(n, bool), energy=float(rng.normal()),
                        forces=rng.normal(size=(n, 3)).astype(np.float32)))
    return out


def make_batches(batch_size: int, count: int, seed: int) -> list[AtomsBatch]:
    structures = oc20_like_structures(batch_size * count, seed)
    return [AtomsBatch.from_arrays(structures[i * batch_size:(i + 1) * batch_size]) for i in range(count)]


def loss_fn(energy, forces, batch):
    e_loss = (energy.float() - batch.energy).abs().mean()
    f_loss = (forces.float() - batch.forces).norm(dim=1).mean()
    return 4.0 * e_loss + 100.0 * f_loss


def count_flops(step, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(batch)
    return float(counter.get_total_flops())


def time_steps(step, batches, warmup: int, device, warm_timed: bool = False) -> tuple[float, float, float, float]:
    """-> (seconds for the timed steps, peak GiB allocated during them, peak GiB reserved by the caching
    allocator, seconds for the warm-up incl. compilation).

    warm_timed: the warm-up also runs every timed batch twice.  CUDA graph trees run a new shape
    bucket's graphs once without recording, record them at the bucket's second step and replay them
    from the third; a training run meets its few dozen buckets early and replays them for the rest,
    so the timed steps measure replays, as training does."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for b in batches[:warmup] + (2 * batches[warmup:] if warm_timed else []):
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
        if not warm_timed:  # CUDA graphs allocate at recording only: their peak includes the warm-up
            torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    reserved = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else float("nan")
    return elapsed, peak, reserved, warmup_s


def profile_steps(step, batches, path: Path, title: str) -> None:
    """Append the torch profiler's op table (sorted by device time) for a few steps to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for b in batches:
            step(b)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    summary = f"{wall / len(batches) * 1e3:.1f} ms wall per step (profiler overhead included)"
    if torch.cuda.is_available():
        from torch.autograd import DeviceType

        from eqv2.training.profiling import busy_and_gaps_us
        busy, gaps = busy_and_gaps_us([(e.time_range.start, e.time_range.end) for e in prof.events()
                                       if e.device_type == DeviceType.CUDA])
        summary += f"; GPU busy {busy / len(batches) / 1e3:.1f} ms per step, longest idle gap {max(gaps, default=0) / 1e3:.1f} ms"
    with open(path, "a") as fh:
        fh.write(f"## {title}, {len(batches)} steps: {summary}\n{prof.key_averages().table(sort_by=sort, row_limit=60)}\n")


def eqv2_step_fn(cfg: ModelConfig, device, dtype, compiled: bool, ac_every: int = 0, mode: str = "default",
                 memory_budget: float = 1.0, cpp_wrapper: bool = False, plan: ExecutionPlan = REFERENCE,
                 weigh_custom_ops: bool = True):
    """One training step of `cfg` run by the execution `plan` (eqv2/execution.py), compiled or eager."""
    model = apply_plan(EquiformerV2(cfg), plan).to(device).train()
    if compiled:
        apply_compile(model, CompileConfig(enabled=True, mode=mode, activation_memory_budget=memory_budget,
                                           weigh_custom_ops=weigh_custom_ops,
                                           cpp_wrapper=cpp_wrapper))
    if ac_every:
        apply_activation_checkpointing(model, ActivationCheckpointConfig(enabled=True, every=ac_every))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)

    def step(batch):
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs (reduce-overhead): a new step
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(batch)
        loss = loss_fn(out["energy"], out["forces"], batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model, step


def reference_step_fn(cfg: ModelConfig, device):
    from tests.model import fairchem_reference as fr  # run as `python -m bench.model` from the repository

    legacy, _ = fr.import_fairchem()
    hp = fr.fairchem_hparams(cfg)
    hp["otf_graph"] = True
    model = legacy.EquiformerV2(**hp).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type)

    def step(batch):
        from torch_geometric.data import Data

        data = Data(pos=batch.pos, atomic_numbers=batch.atomic_numbers.float(), cell=batch.cell, natoms=batch.natoms,
                    batch=batch.batch)
        with torch.autocast(device.type, dtype=torch.float16):
            out = model(data)
        loss = loss_fn(out["energy"].reshape(-1), out["forces"], batch)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return model, step


def set_inductor_config(item: str) -> None:
    """KEY=VALUE (VALUE a Python literal, else a string) into torch._inductor.config; unknown keys fail."""
    import ast

    import torch._inductor.config as inductor_config

    key, sep, raw = item.partition("=")
    if not sep:
        raise SystemExit(f"--inductor {item!r}: expected KEY=VALUE")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    try:
        inductor_config.patch({key: value}).__enter__()  # for the rest of the process
    except (AttributeError, KeyError) as exc:
        raise SystemExit(f"--inductor {item!r}: torch._inductor.config has no {key!r} ({exc})") from None
    print(f"torch._inductor.config.{key} = {value!r}")


def overrides(args, gradient: bool = False) -> ExecutionOverrides:
    """The command line's execution-plan overrides; `gradient`: for the gradient-force runs, which leave the
    kernels whose backward is not differentiable again to the plan (off)."""
    def switch(value):
        return "auto" if value is None or gradient else value == "on"
    pad = args.pad or ("auto", "auto")
    return ExecutionOverrides(so2_fused_input_grad=switch(args.fused_input_grad),
                              so2_indexed_radial=switch(args.indexed_radial),
                              fused_rotation=switch(args.fused_rotation), fused_s2_activation=switch(args.fused_s2),
                              s2_kernel_form=args.s2_kernel_form or "auto",
                              rotation_align=args.rotation_align or "auto",
                              pad_atoms_multiple=pad[0], pad_edges_multiple=pad[1])


def plan_label(plan: ExecutionPlan) -> str:
    """The row-label suffix naming `plan`'s choices (as the rows were named before the plan existed)."""
    label = "-fusedgrad" if plan.so2_fused_input_grad else ""
    label += f"-align{plan.rotation_align}" if plan.rotation_align > 1 else ""
    label += "-idxrad" if plan.so2_indexed_radial else ""
    label += "-fusedrot" if plan.fused_rotation else ""
    label += f"-s2{plan.s2_kernel_form}" if plan.fused_s2_activation else "-s2einsum"
    label += f"-pad{plan.pad_atoms_multiple}x{plan.pad_edges_multiple}" if plan.pad_atoms_multiple else ""
    return label


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["31M", "153M"], help="31M 83M 153M")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8])
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--impls", nargs="*", choices=["eager", "compiled"], default=["compiled"],
                        help="eqv2 paths to time: eager (the reference path) and/or compiled (the training default on GPU)")
    parser.add_argument("--ac-every", nargs="+", type=int, default=[0],
                        help="activation checkpointing on every k-th block (0: off); several values: one run each")
    parser.add_argument("--mode", default="default",
                        choices=["default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"],
                        help="Inductor mode of the compiled impl (reduce-overhead, max-autotune: CUDA graphs, need --pad)")
    parser.add_argument("--memory-budget", type=float, default=1.0,
                        help="compile.activation_memory_budget of the compiled impl (one value per process)")
    parser.add_argument("--no-weigh-custom-ops", action="store_true",
                        help="compile.weigh_custom_ops=false: torch's default, custom ops free to recompute")
    # execution-plan overrides (eqv2/execution.py ExecutionOverrides); left out: the plan the trainer would choose
    parser.add_argument("--fused-input-grad", choices=["on", "off"], default=None,
                        help="execution.so2_fused_input_grad: input gradients from eqv2::so2_input_grad (default: auto)")
    parser.add_argument("--indexed-radial", choices=["on", "off"], default=None,
                        help="execution.so2_indexed_radial: the SO(2) radial products by column index tables (needs "
                             "the fused input grad; default: auto)")
    parser.add_argument("--fused-rotation", choices=["on", "off"], default=None,
                        help="execution.fused_rotation: the rotations fused with their gather and scatter (default: auto)")
    parser.add_argument("--fused-s2", choices=["on", "off"], default=None,
                        help="execution.fused_s2_activation: the fused S2 activation kernel (default: auto)")
    parser.add_argument("--s2-kernel-form", choices=["rows", "columns"], default=None,
                        help="execution.s2_kernel_form: the fused S2 kernels' tile orientation (default: auto)")
    parser.add_argument("--rotation-align", type=int, default=None,
                        help="execution.rotation_align: Wigner matrix rows padded to this many elements (default: auto)")
    parser.add_argument("--cpp-wrapper", action="store_true", help="compile.cpp_wrapper: kernels launched from C++")
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                        help="set torch._inductor.config KEY (e.g. max_pointwise_cat_inputs=3) for this process: "
                             "A/B of Inductor settings on the device")
    parser.add_argument("--pad", nargs=2, type=int, default=None, metavar=("ATOMS", "EDGES"),
                        help="shape buckets: pad atom and edge counts to these multiples (execution.pad_*_multiple; "
                             "default: auto, 64 / 1024 on CUDA in bf16; 0 0: off)")
    parser.add_argument("--graphs", choices=["loader", "model"], default="loader",
                        help="loader: radius graphs built ahead on the CPU, as the trainer's data-loader workers do "
                             "(data.build_graphs, outside the timed step); model: built in the model's forward pass")
    parser.add_argument("--reference", action="store_true", help="also run fairchem-core 1.10.0 on the same batches")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100 SXM: 989)")
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--profile", type=Path, help="also profile 3 eqv2 steps per setting; op table written here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--forces", nargs="+", choices=["direct", "gradient"], default=["direct"],
                        help="model.forces: the direct head and/or gradient forces (eager only)")
    args = parser.parse_args(argv)
    for item in args.inductor:
        set_inductor_config(item)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    results = []
    t0 = time.perf_counter()
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    for name in args.configs:
        cfg = from_dict(ModelConfig, load_yaml(ROOT / "configs" / "model" / f"eqv2_{name}.yaml"))
        plan = choose_plan(device_type=device.type, dtype=args.dtype, lmax=cfg.lmax, mmax=cfg.mmax,
                           graph_ahead=args.graphs == "loader", overrides=overrides(args))
        for bs in args.batch_sizes:
            batches = make_batches(bs, args.warmup + args.steps, args.seed)
            if args.graphs == "loader":  # fairchem builds its graphs in its forward pass (otf_graph), as it trains
                prepare = loader_prepare(GraphBuilder.for_model(cfg), plan)  # graphs and shape buckets, as the
                batches = [prepare(b) for b in batches]  # trainer's loader workers build them
            batches = [b.to(device) for b in batches]
            atoms = sum(int(b.natoms.sum()) for b in batches[args.warmup:])
            budget = f"-mb{args.memory_budget:g}" if args.memory_budget < 1.0 else ""
            budget += "-s2free" if args.no_weigh_custom_ops and args.memory_budget < 1.0 else ""
            extra = budget + ("-cppwrap" if args.cpp_wrapper else "")
            fused = plan_label(plan) + ("-graphinmodel" if args.graphs == "model" else "")
            runs = [(f"eqv2-{impl}" + (f"-ac{k}" if k else "") + (extra if impl == "compiled" else "") + fused,
                     lambda impl=impl, k=k: eqv2_step_fn(cfg, device, dtype, impl == "compiled", k, args.mode,
                                                         args.memory_budget, args.cpp_wrapper, plan,
                                                         not args.no_weigh_custom_ops))
                    for impl in args.impls for k in args.ac_every if "direct" in args.forces]
            # gradient forces: eager, with the plan chosen for them (no kernel whose backward is not
            # differentiable again)
            gradient_cfg = dataclasses.replace(cfg, forces="gradient")
            gradient_plan = choose_plan(device_type=device.type, dtype=args.dtype, lmax=cfg.lmax, mmax=cfg.mmax,
                                        forces="gradient", graph_ahead=args.graphs == "loader",
                                        overrides=overrides(args, gradient=True))
            runs += [(f"eqv2-eager" + (f"-ac{k}" if k else "") + plan_label(gradient_plan) + "-gradient",
                      lambda k=k: eqv2_step_fn(gradient_cfg, device, dtype, False, k, plan=gradient_plan))
                     for k in args.ac_every if "gradient" in args.forces]
            if args.reference:
                runs.append(("fairchem-1.10.0", lambda: reference_step_fn(cfg, device)))
            row = {"config": name, "batch": bs, "mean_atoms": atoms / (bs * args.steps)}
            torch.manual_seed(args.seed)
            # the model's FLOPs: eager and unpadded (padding atoms and edges are not model work)
            eager_model, eager_step = eqv2_step_fn(cfg, device, dtype, compiled=False)
            flops = count_flops(eager_step, batches[0]) / bs
            # the architecture's FLOPs per structure and per atom of these batches (bench/run.py's MFU)
            row["eqv2_tflop_per_sample"] = flops / 1e12
            row["eqv2_tflop_per_atom"] = flops * bs / (atoms_first := int(batches[0].natoms.sum())) / 1e12
            row["flop_atoms"] = atoms_first
            del eager_model, eager_step
            for label, build in runs:
                torch.manual_seed(args.seed)
                try:
                    model, step = build()
                    warm_timed = args.mode == "reduce-overhead" and label.startswith("eqv2-compiled")
                    elapsed, peak, reserved, warmup_s = time_steps(step, batches, args.warmup, device, warm_timed)
                except torch.cuda.OutOfMemoryError:
                    row[label] = {"error": "out of memory"}
                    print(f"{name} batch {bs} {label}: out of memory")
                    continue
                except Exception as exc:  # one failing setting must not lose the others' results
                    traceback.print_exc()
                    row[label] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                    print(f"{name} batch {bs} {label}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    continue
                if args.profile and label.startswith("eqv2"):
                    profile_steps(step, batches[:3], args.profile, f"{label} {name} batch {bs}")
                sps = bs * args.steps / elapsed
                if label.startswith("eqv2-compiled"):
                    from torch._dynamo.utils import counters
                    print(f"{label}: dynamo {dict(counters['stats'])}", flush=True)
                mfu = flops * sps / (args.peak_tflops * 1e12)
                row[label] = {"params": count_parameters(model), "samples_per_s": sps, "atoms_per_s": atoms / elapsed,
                              "peak_gib": peak, "reserved_gib": reserved, "tflop_per_sample": flops / 1e12, "mfu": mfu,
                              "warmup_s": warmup_s}
                print(f"{name} batch {bs} {label}: {sps:.2f} samples/s, {atoms / elapsed:.0f} atoms/s, "
                      f"peak {peak:.1f} GiB (reserved {reserved:.1f}), {flops / 1e12:.3f} TFLOP/sample, MFU {100 * mfu:.2f}% "
                      f"(warm-up {warmup_s:.0f} s) [t={time.perf_counter() - t0:.0f} s]", flush=True)
                del model, step
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            for label in [k for k in row if k.endswith("-gradient") and "samples_per_s" in row[k]]:
                direct = next((v for k, v in row.items() if k.startswith("eqv2-eager") and not k.endswith("-gradient")
                               and isinstance(v, dict) and "samples_per_s" in v
                               and re.findall(r"-ac\d+", k) == re.findall(r"-ac\d+", label)), None)
                if direct:
                    row[label]["throughput_vs_direct_eager"] = row[label]["samples_per_s"] / direct["samples_per_s"]
                    row[label]["peak_vs_direct_eager"] = row[label]["peak_gib"] / direct["peak_gib"]
                    print(f"{name} batch {bs}: {label} / direct eager = {row[label]['throughput_vs_direct_eager']:.2f}x "
                          f"throughput, {row[label]['peak_vs_direct_eager']:.2f}x peak memory")
            ref = row.get("fairchem-1.10.0", {}).get("samples_per_s")
            for label in [k for k in row if k.startswith("eqv2-")]:
                if ref and "samples_per_s" in row[label]:
                    row[label]["speedup_vs_fairchem"] = row[label]["samples_per_s"] / ref
                    print(f"{name} batch {bs}: {label} / fairchem = {row[label]['speedup_vs_fairchem']:.2f}x")
            results.append(row)
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "torch": torch.__version__, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
