"""The fast inference path, applied to a loaded `Potential` from outside the model, checked against float32.

`eqv2.load_model` returns the reference path: float32, the paper modules, eager. `prepare(potential, device,
options)` gives the path the trainer runs, for prediction:
- the execution plan `choose_plan` picks for the device and precision (eqv2/execution.py): on CUDA in bf16 with
  direct forces the fused kernels (inference needs no second backward) and shape buckets of 64 atoms / 1,024
  edges; gradient-force models keep `check_plan`'s rules (no kernel whose backward is not differentiable again);
- bf16 autocast around the model, with the precision-sensitive parts (geometry, Wigner-D matrices, norm
  statistics, softmax, neighbour sums, energy sums) in float32, exactly as in training: the model itself keeps
  them there under autocast; outputs are float32;
- compilation of the model's repeated parts (eqv2/training/compile.py, the trainer's `apply_compile`), with
  CUDA graphs (Inductor mode reduce-overhead) where the plan has shape buckets: each bucket is recorded once and
  replayed; without buckets (CPU, float32) Inductor's default mode;
- no autograd graph for direct forces (`torch.no_grad`; gradient-force models take their one derivative).

The check: the first `check_batches` batches also run through an untouched float32 copy of the model, and the
largest |ΔE| per atom and |ΔF| are reported (`InferencePotential.checks`, printed by the CLIs). Above the
tolerance, precision "bf16" raises `PrecisionError`; precision "auto" (bf16 on CUDA, float32 elsewhere) falls
back to the float32 path with a warning, returning the float32 outputs of that batch. The copy is dropped after
the checks. Default tolerances: 0.01 eV/atom and 0.1 eV/Å on the largest differences (the trained demo model of
the tests, bf16 autocast on the CPU, first validation batch of 8 structures: 2.3e-3 eV/atom and 0.068 eV/Å).
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from eqv2.batch import AtomsBatch
from eqv2.execution import ExecutionPlan, apply_plan, choose_plan

PRECISIONS = ("auto", "fp32", "bf16")
COMPILE = ("auto", "on", "off")


class PrecisionError(ValueError):
    """The fast path's outputs differ from float32's by more than the tolerance (precision bf16 asked for)."""


@dataclass(frozen=True)
class InferenceOptions:
    """How a loaded model runs predictions.

    precision: "fp32" (the reference), "bf16" (autocast; refused if the check fails) or "auto" (bf16 on CUDA,
    fp32 elsewhere; a failed check falls back to fp32). compile: "auto" (on for CUDA bf16 with direct forces),
    "on", "off". kernels: "auto" (the plan's fused kernels and shape buckets) or "off" (the reference modules;
    for A/B runs). check_batches: batches compared against float32 (0: none; ignored in fp32).
    energy_tolerance (eV/atom) and forces_tolerance (eV/Å): the largest differences the check accepts."""
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    compile: Literal["auto", "on", "off"] = "auto"
    kernels: Literal["auto", "off"] = "auto"
    check_batches: int = 1
    energy_tolerance: float = 1e-2
    forces_tolerance: float = 1e-1

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.compile not in COMPILE:
            raise ValueError(f"compile must be one of {', '.join(COMPILE)}, got {self.compile!r}")
        if self.kernels not in ("auto", "off"):
            raise ValueError(f"kernels must be 'auto' or 'off', got {self.kernels!r}")
        if self.check_batches < 0 or self.energy_tolerance <= 0 or self.forces_tolerance <= 0:
            raise ValueError("check_batches must be >= 0 and the tolerances > 0, got "
                             f"{self.check_batches}, {self.energy_tolerance}, {self.forces_tolerance}")

    def resolved_precision(self, device: torch.device) -> str:
        if self.precision == "auto":
            return "bf16" if device.type == "cuda" else "fp32"
        return self.precision


FAST = InferenceOptions(precision="auto")  # the CLIs' default: fast on CUDA, checked on the first batch


@dataclass
class PrecisionCheck:
    """One batch run both ways: the largest |ΔE| per atom (eV) and |ΔF| (eV/Å, norm per atom)."""
    structures: int
    max_energy_per_atom: float
    max_forces: float
    mean_forces: float  # mean |dF| over the atoms (eV/Å), reported beside the max
    ok: bool

    def line(self, precision: str, options: InferenceOptions) -> str:
        verdict = "within" if self.ok else "OUTSIDE"
        return (f"precision check ({precision} vs fp32, {self.structures} structures): max |dE|/atom "
                f"{self.max_energy_per_atom:.2e} eV, max |dF| {self.max_forces:.2e} eV/A (mean {self.mean_forces:.1e}; "
                f"{verdict} the tolerance "
                f"{options.energy_tolerance:g} eV/atom, {options.forces_tolerance:g} eV/A)")


def compare(fast: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], batch: AtomsBatch,
            options: InferenceOptions) -> PrecisionCheck:
    natoms = batch.natoms.to(reference["energy"].device).double()
    de = float(((fast["energy"].double() - reference["energy"].double()).abs() / natoms).max())
    df = mf = 0.0
    if "forces" in reference and reference["forces"].numel():
        norms = (fast["forces"].double() - reference["forces"].double()).norm(dim=-1)
        df, mf = float(norms.max()), float(norms.mean())
    ok = de <= options.energy_tolerance and df <= options.forces_tolerance  # NaN: not ok
    return PrecisionCheck(int(batch.num_graphs), de, df, mf, ok)


def inference_plan(potential: nn.Module, device: torch.device, precision: str, kernels: str) -> ExecutionPlan:
    cfg = potential.config
    dtype = "bf16" if precision == "bf16" and kernels == "auto" else "fp32"
    return choose_plan(device_type=device.type, dtype=dtype, lmax=cfg.lmax, mmax=cfg.mmax, forces=cfg.forces)


class InferencePotential(nn.Module):
    """A `Potential` run by `InferenceOptions` (see the module docstring): `forward(batch)` returns what the
    Potential returns (eV, eV/Å, float32), computed by the fast path. `config`, `normalizers`, `meta` and
    `energy_references` are the Potential's."""

    def __init__(self, potential: nn.Module, device: torch.device, options: InferenceOptions,
                 log=None):
        super().__init__()
        self.options = options
        self.device = device
        self.precision = options.resolved_precision(device)
        self.log = log if log is not None else (lambda line: print(line, file=sys.stderr, flush=True))
        potential = potential.to(device).eval()
        checking = self.precision != "fp32" and options.check_batches > 0
        # an untouched float32 copy for the check (before the plan swaps kernels in and compile wraps forwards)
        self.reference = copy.deepcopy(potential) if checking else None
        self.plan = inference_plan(potential, device, self.precision, options.kernels)
        apply_plan(potential.model, self.plan)
        self.mode: str | None = None  # the compile mode, set by _compile
        self.compiled = self._compile(potential.model)
        self.potential = potential
        self.checks: list[PrecisionCheck] = []
        self.fell_back = False

    def _compile(self, model: nn.Module) -> list[str]:
        from eqv2.training.compile import CompileConfig, apply_compile

        want = self.options.compile
        direct = model.cfg.forces == "direct"
        if want == "auto":
            want = "on" if self.device.type == "cuda" and self.precision == "bf16" and direct else "off"
        if want == "off":
            return []
        if not direct:
            raise ValueError("compile 'on' is not supported for gradient-force models (forces: gradient); "
                             "use compile 'auto' or 'off'")
        buckets = bool(model.pad_atoms_multiple and model.pad_edges_multiple)
        mode = "reduce-overhead" if self.device.type == "cuda" and buckets else "default"
        self.mode = mode
        return apply_compile(model, CompileConfig(enabled=True, mode=mode))

    # what consumers read from a Potential
    @property
    def config(self):
        return self.potential.config

    @property
    def normalizers(self):
        return self.potential.normalizers

    @property
    def meta(self):
        return self.potential.meta

    @property
    def energy_references(self):
        return self.potential.energy_references

    def _run(self, potential: nn.Module, batch: AtomsBatch, low: bool) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=low):
            out = potential(batch)
        return {k: v.float() if v.dtype in (torch.bfloat16, torch.float16) else v for k, v in out.items()}

    def forward(self, batch: AtomsBatch) -> dict[str, torch.Tensor]:
        if self.fell_back:
            return self._run(self.potential, batch, False)
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous call's graph outputs may be reused
        grad = torch.enable_grad() if torch.is_grad_enabled() else torch.no_grad()
        with torch.no_grad() if self.config.forces == "direct" else grad:
            out = self._run(self.potential, batch, self.precision == "bf16")
            if self.reference is None:
                return out
            ref = self._run(self.reference, batch, False)
        check = compare(out, ref, batch, self.options)
        self.checks.append(check)
        if not check.ok and self.options.precision == "bf16":
            raise PrecisionError(check.line(self.precision, self.options)
                                 + "; run with precision fp32 (--precision fp32) or raise the tolerance")
        self.log(check.line(self.precision, self.options))
        if not check.ok:
            self.log("precision auto: falling back to the float32 path for every batch")
            self.potential, self.reference, self.fell_back, self.precision = self.reference, None, True, "fp32"
            return ref
        if len(self.checks) >= self.options.check_batches:
            self.reference = None  # checked: the float32 copy is no longer needed
        return out

    def describe(self) -> str:
        """One line: precision, kernels, compile mode."""
        kernels = [k for k in ("so2_fused_input_grad", "fused_rotation", "fused_s2_activation") if getattr(self.plan, k)]
        compiled = f"compiled ({self.mode})" if self.compiled else "eager"
        buckets = (f", shape buckets {self.plan.pad_atoms_multiple} atoms / {self.plan.pad_edges_multiple} edges"
                   if self.plan.pad_atoms_multiple else "")
        return (f"inference: {self.precision}, {compiled}, kernels: {', '.join(kernels) or 'reference'}{buckets}"
                + (" (fell back to fp32)" if self.fell_back else ""))


def prepare(potential: nn.Module, device: str | torch.device, options: InferenceOptions = FAST,
            log=None) -> InferencePotential:
    """`potential` (a `Potential`, as `eqv2.load_model` returns) run by `options` on `device`; the model is
    changed in place (kernels swapped in, forwards compiled): keep using the returned object."""
    if isinstance(potential, InferencePotential):
        raise ValueError("this model is already prepared for inference")
    return InferencePotential(potential, torch.device(device), options, log)


def load_for_inference(path, device: str | torch.device, options: InferenceOptions = FAST,
                       log=None) -> InferencePotential:
    """`eqv2.load_model(path, device)` run by `options` (the fast path, checked, on CUDA by default)."""
    from eqv2.checkpoint import load_model

    return prepare(load_model(path, device), device, options, log)


def add_arguments(parser) -> None:
    """The CLIs' --precision, --compile, --check-precision and --precision-tolerance options."""
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: bf16 fast path (fused kernels, compiled, CUDA graphs) on CUDA, checked against "
                        "fp32 on the first batch and falling back to fp32 outside the tolerance; fp32 elsewhere. "
                        "bf16: the same, refused outside the tolerance. fp32: the reference path")
    parser.add_argument("--compile", choices=COMPILE, default="auto", dest="compile_mode",
                        help="torch.compile of the model's blocks (auto: on for CUDA bf16)")
    parser.add_argument("--check-precision", type=int, default=1, metavar="N",
                        help="compare the first N batches with the fp32 path (0: no check)")
    parser.add_argument("--precision-tolerance", type=float, nargs=2, default=(1e-2, 1e-1),
                        metavar=("EV_PER_ATOM", "EV_PER_A"), help="largest max |dE|/atom and max |dF| accepted")


def options_from_args(args) -> InferenceOptions:
    return InferenceOptions(precision=args.precision, compile=args.compile_mode, check_batches=args.check_precision,
                            energy_tolerance=args.precision_tolerance[0], forces_tolerance=args.precision_tolerance[1])
