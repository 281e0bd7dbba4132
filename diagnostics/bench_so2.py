"""Microbenchmark of one compiled SO(2) convolution (paper Sec. 3.3) under Inductor settings (issue 6).

The attention's first SO(2) convolution of the 153M model (L_max 6, M_max 3, 2 x 128 input channels,
radial weights from 600 + 256 edge scalars) is compiled alone and timed forward + backward under bf16
autocast at a realistic edge count.  Compiling one module takes seconds, not the minutes of the whole
model, so Inductor settings can be compared within a short device call.

    python -m diagnostics.bench_so2 --edges 11500 --variants dynamic dynamic-int32 static --profile

Variants: `dynamic` compiles with symbolic sizes (as the trainer does after the first batch);
`dynamic-int32` adds Inductor's `assume_32bit_indexing`; `static` specialises on the edge count;
`dynamic-fused` and `static-fused` take the input gradient from `eqv2::so2_input_grad`
(eqv2/kernels/fused_so2.py `FusedSO2Convolution`) instead of autograd's concatenation of per-order gradients.
`rotation` and `rotation-aligned` time the edge rotation instead (Sec. 3.3: the per-edge Wigner-D
products into and out of the edge frame, [E, K, (L+1)^2] x [E, (L+1)^2, C] and back, forward +
backward, bf16), with the matrices stored unpadded or with rows padded to 16 bytes
(`rotation_matrices(align=8)`).  Prints microseconds per forward + backward and, with --profile, the
three slowest kernels.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from eqv2.kernels.fused_so2 import FusedSO2Convolution
from eqv2.model.so2_convolution import SO2Convolution
from eqv2.model.so3 import CoefficientLayout, EdgeRotation, WignerD, rotation_matrices
from eqv2.training.compile import inductor_options

from bench.model import set_inductor_config

VARIANTS = {"dynamic": (True, {}, False), "dynamic-int32": (True, {"assume_32bit_indexing": True}, False),
            "static": (False, {}, False), "dynamic-fused": (True, {}, True), "static-fused": (False, {}, True),
            "rotation": 1, "rotation-aligned": 8}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(device: torch.device, lmax: int, mmax: int, channels: int, hidden: int) -> SO2Convolution:
    layout = CoefficientLayout(lmax, mmax)
    conv = SO2Convolution(2 * channels, hidden, layout, [600 + 2 * channels, 128, 128], extra_m0_channels=8 * 64)
    return conv.to(device)


def step(conv, x, scalars):
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y, extra = conv(x, scalars)
    (y.float().square().sum() + extra.float().sum()).backward()


def rotation_step(args, device: torch.device, align: int):
    """Forward + backward of rotate -> rotate_inv for the 153M edge count (sphere channels wide)."""
    layout = CoefficientLayout(args.lmax, args.mmax)
    wigner = WignerD(args.lmax).to(device)(torch.randn(args.edges, 3, device=device))
    rotation = EdgeRotation(*rotation_matrices(wigner, layout, torch.bfloat16, align=align))
    x = torch.randn(args.edges, (args.lmax + 1) ** 2, args.channels, device=device, dtype=torch.bfloat16,
                    requires_grad=True)

    def run():
        rotation.rotate_inv(rotation.rotate(x)).float().square().sum().backward()
    return run


def time_variant(name: str, args, device: torch.device) -> dict:
    if name.startswith("rotation"):
        return time_steps(name, args, device, rotation_step(args, device, VARIANTS[name]), 0.0)
    dynamic, extra_opts, fused = VARIANTS[name]
    torch.manual_seed(0)
    conv = build(device, args.lmax, args.mmax, args.channels, args.hidden)
    if fused:
        FusedSO2Convolution.swap_into(conv, indexed_radial=False)
    k = conv.layout.num_reduced
    compiled = torch.compile(conv.forward, dynamic=dynamic, fullgraph=True,
                             options={**inductor_options("default"), **extra_opts})

    def inputs(edges):
        x = torch.randn(edges, k, 2 * args.channels, device=device, dtype=DTYPES[args.input_dtype], requires_grad=True)
        return x, torch.randn(edges, 600 + 2 * args.channels, device=device)

    conv.forward = compiled
    t0 = time.perf_counter()
    for edges in (args.edges - max(1, min(512, args.edges // 2)), args.edges):  # a second size: a dynamic compile serves both
        step(conv, *inputs(edges))
    sync(device)
    compile_s = time.perf_counter() - t0
    x, scalars = inputs(args.edges)
    return time_steps(name, args, device, lambda: step(conv, x, scalars), compile_s)


def time_steps(name: str, args, device: torch.device, run, compile_s: float) -> dict:
    for _ in range(3):
        run()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        run()
    sync(device)
    out = {"variant": name, "edges": args.edges, "us_per_fwd_bwd": (time.perf_counter() - t0) / args.iters * 1e6,
           "compile_s": compile_s}
    if args.profile:
        with torch.profiler.profile() as prof:
            for _ in range(3):
                run()
            sync(device)
        attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        rows = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)[:3]
        out["top"] = [(e.key[:70], round(getattr(e, attr) / 3, 1)) for e in rows]
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edges", type=int, default=11500, help="about 153M's edge count at batch 8")
    p.add_argument("--lmax", type=int, default=6)
    p.add_argument("--mmax", type=int, default=3)
    p.add_argument("--channels", type=int, default=128, help="sphere channels (the input has twice as many)")
    p.add_argument("--hidden", type=int, default=64, help="attention hidden channels")
    p.add_argument("--input-dtype", choices=sorted(DTYPES), default="fp32",
                   help="dtype of the rotated edge features (bf16 in the model under autocast)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Inductor option for every variant (value parsed as a Python literal)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["dynamic", "static"])
    p.add_argument("--profile", action="store_true", help="also list the three slowest kernels")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    for item in args.inductor:
        set_inductor_config(item)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for name in args.variants:
        torch._dynamo.reset()
        try:
            r = time_variant(name, args, device)
        except Exception as exc:  # one failing setting does not lose the others
            r = {"variant": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                         "torch": torch.__version__, "results": results}, indent=1))
    if any("error" in r for r in results):
        raise SystemExit("some variants failed (see their 'error')")


if __name__ == "__main__":
    main()
