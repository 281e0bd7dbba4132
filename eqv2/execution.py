"""How a model is executed, chosen and applied from outside the model (issue 25).

`ModelConfig` holds the paper's hyperparameters only; this module decides everything else.  `choose_plan`
picks an `ExecutionPlan` from the device, dtype, L_max / M_max, ZeRO stage and forces mode; a run config's
`execution:` section (`ExecutionOverrides`, every field "auto" by default, unknown keys rejected by name)
overrides single choices for experiments.  `apply_plan` makes a built `EquiformerV2` run that plan: it swaps the
custom-kernel classes of eqv2/kernels/ into its modules and sets its execution attributes (input checks, shape
buckets, Wigner row alignment, edge-rotation class), the way activation checkpointing and compilation are
applied (eqv2/training/).  `paper_config(d)` drops execution keys from a config saved before they moved here
(they never changed the function the model computes, so old checkpoints lose nothing).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

AUTO = "auto"


@dataclass(frozen=True)
class ExecutionPlan:
    """One complete choice of kernels and shape buckets; every field is a concrete value (no "auto")."""
    validate_inputs: bool = True  # host-side checks of structures and graph (off where the loader checked them)
    pad_atoms_multiple: int = 0  # shape buckets (0: off): an inert dummy structure pads each batch
    pad_edges_multiple: int = 0
    so2_fused_input_grad: bool = False  # eqv2::so2_input_grad custom op (backward not differentiable again)
    so2_indexed_radial: bool = False  # needs so2_fused_input_grad
    rotation_align: int = 1  # Wigner rows padded to this many elements (8: 16-byte bf16 rows)
    fused_rotation: bool = False  # Triton gather-rotate-scatter (CUDA bf16/fp16; backward not differentiable again)
    fused_s2_activation: bool = False  # Triton S2 activation (CUDA bf16/fp16; backward not differentiable again)
    s2_kernel_form: Literal["rows", "columns"] = "columns"  # the fused S2 kernels' tile orientation


KERNEL_LMAX, KERNEL_MMAX = 8, 4  # the range the Triton kernels are tested over (tests/kernels/, GPU and interpreter)
REFERENCE = ExecutionPlan()  # the paper modules as written: what CPU and float32 runs use
# every execution key; those a model config held before they moved here are dropped from old files
EXECUTION_KEYS = frozenset(f.name for f in dataclasses.fields(ExecutionPlan))
_NOT_TWICE_DIFFERENTIABLE = ("so2_fused_input_grad", "fused_rotation", "fused_s2_activation")


@dataclass(frozen=True)
class ExecutionOverrides:
    """A run config's `execution:` section: "auto" leaves the choice to `choose_plan`."""
    validate_inputs: bool | Literal["auto"] = AUTO
    pad_atoms_multiple: int | Literal["auto"] = AUTO
    pad_edges_multiple: int | Literal["auto"] = AUTO
    so2_fused_input_grad: bool | Literal["auto"] = AUTO
    so2_indexed_radial: bool | Literal["auto"] = AUTO
    rotation_align: int | Literal["auto"] = AUTO
    fused_rotation: bool | Literal["auto"] = AUTO
    fused_s2_activation: bool | Literal["auto"] = AUTO
    s2_kernel_form: Literal["auto", "rows", "columns"] = AUTO

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "execution") -> ExecutionOverrides:
        d = dict(d or {})
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
        for key, value in d.items():
            if value == AUTO:
                continue
            default = getattr(REFERENCE, key)
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = value in ("rows", "columns")
            if not ok:
                raise ValueError(f"{where}.{key}: expected 'auto' or a value like {default!r}, got {value!r}")
        return cls(**d)


def choose_plan(*, device_type: str, dtype: str, lmax: int, mmax: int, zero_stage: int = 0,
                forces: str = "direct", graph_ahead: bool = False,
                overrides: ExecutionOverrides | None = None) -> ExecutionPlan:
    """The fastest plan known to compute the same function for this run.

    device_type: "cuda" or "cpu"; dtype: "bf16", "fp16" or "fp32"; graph_ahead: the loader built and checked
    the graphs (the model's own input checks are then redundant host syncs).
    - CPU or fp32: the reference modules (the fused kernels are CUDA half-precision kernels).
    - CUDA bf16/fp16, direct forces: the fused SO(2) input gradient with indexed radial products, 16-byte
      Wigner rows, fused rotations, the fused S2 activation and shape buckets of 64 atoms / 1,024 edges.
    - Gradient forces: no kernel whose backward is not differentiable again (so2_fused_input_grad,
      fused_rotation, fused_s2_activation); an override asking for one is refused by name.
    - Any ZeRO stage: the same (compiled blocks run under ZeRO-3 as DeepSpeed leaf modules, training/compile.py,
      so shape buckets serve there too); the kernels are module classes and do not see the partitioning.
    - L_max / M_max: the Triton kernels (fused rotation, fused S2 activation) size their tiles from the
      coefficient counts and are tested up to L_max 8 / M_max 4 (tests/kernels/); beyond that range they are
      left off (the reference modules run) unless an override asks for them.  The fused SO(2) input gradient
      is torch operations per order m and serves every L_max / M_max.
    """
    if forces not in ("direct", "gradient"):
        raise ValueError(f"forces must be 'direct' or 'gradient', got {forces!r}")
    if dtype not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"dtype must be 'bf16', 'fp16' or 'fp32', got {dtype!r}")
    if not 0 <= mmax <= lmax:
        raise ValueError(f"mmax must be in [0, lmax]: lmax={lmax}, mmax={mmax}")
    auto: dict[str, Any] = dataclasses.asdict(REFERENCE)
    auto["validate_inputs"] = not graph_ahead
    if device_type == "cuda" and dtype in ("bf16", "fp16"):
        auto.update(pad_atoms_multiple=64, pad_edges_multiple=1024, rotation_align=8, s2_kernel_form="columns")
        if forces == "direct":
            triton_ok = lmax <= KERNEL_LMAX and mmax <= KERNEL_MMAX
            auto.update(so2_fused_input_grad=True, so2_indexed_radial=True, fused_rotation=triton_ok,
                        fused_s2_activation=triton_ok)
    chosen = dict(auto)
    for key, value in dataclasses.asdict(overrides or ExecutionOverrides()).items():
        if value != AUTO:
            chosen[key] = value
    if chosen["so2_indexed_radial"] and not chosen["so2_fused_input_grad"] \
            and not (overrides is not None and overrides.so2_indexed_radial is True):
        chosen["so2_indexed_radial"] = False  # the fused input gradient switched off: its indexed form with it
    plan = ExecutionPlan(**chosen)
    check_plan(plan, forces)
    return plan


def check_plan(plan: ExecutionPlan, forces: str) -> None:
    """Refuse, by execution key, a plan that cannot run (the only copy of these checks)."""
    if forces == "gradient":
        for key in _NOT_TWICE_DIFFERENTIABLE:
            if getattr(plan, key):
                raise ValueError(f"execution.{key}: not supported with forces: gradient (its backward is not "
                                 "differentiable again); leave it 'auto' or set it to false")
    if plan.so2_indexed_radial and not plan.so2_fused_input_grad:
        raise ValueError("execution.so2_indexed_radial needs so2_fused_input_grad (it is a form of that path)")
    for key in ("pad_atoms_multiple", "pad_edges_multiple"):
        if getattr(plan, key) < 0:
            raise ValueError(f"execution.{key} must be >= 0 (0: no padding), got {getattr(plan, key)}")
    if plan.rotation_align < 1:
        raise ValueError(f"execution.rotation_align must be >= 1 (1: no padding), got {plan.rotation_align}")


def apply_plan(model: nn.Module, plan: ExecutionPlan) -> nn.Module:
    """Make the built EquiformerV2 `model` run `plan`, in place; returns it.  Parameters, their names and the
    state dict do not change (checkpoints stay interchangeable between plans); a model given another plan
    later runs that one.  Apply it before compilation and activation checkpointing (they wrap the forwards)."""
    from eqv2.buckets import install_bucket_hooks
    from eqv2.kernels.fused_rotation import FusedEdgeRotation
    from eqv2.kernels.fused_s2_activation import FusedS2Grid
    from eqv2.kernels.fused_so2 import FusedSO2Convolution
    from eqv2.model.activation import S2Grid
    from eqv2.model.so2_convolution import SO2Convolution
    from eqv2.model.so3 import EdgeRotation

    check_plan(plan, model.cfg.forces)
    model.validate_inputs = plan.validate_inputs
    install_bucket_hooks(model, plan)  # shape buckets: forward hooks, outputs for the real structures only
    # the buckets also as attributes, for callers that read them from the model (its forward does not)
    model.pad_atoms_multiple, model.pad_edges_multiple = plan.pad_atoms_multiple, plan.pad_edges_multiple
    model.rotation_align = plan.rotation_align
    model.rotation_type = FusedEdgeRotation if plan.fused_rotation else EdgeRotation
    for module in model.modules():
        if isinstance(module, SO2Convolution):
            if plan.so2_fused_input_grad:
                FusedSO2Convolution.swap_into(module, plan.so2_indexed_radial)
            else:
                module.__class__ = SO2Convolution
        elif isinstance(module, S2Grid):
            if plan.fused_s2_activation:
                FusedS2Grid.swap_into(module, plan.s2_kernel_form)
            else:
                module.__class__ = S2Grid
    model.plan = plan
    return model


def plan_of(model: nn.Module) -> ExecutionPlan:
    """The plan `model` runs (the reference if none was applied)."""
    return getattr(model, "plan", REFERENCE)


def run_plan(cfg, ds: dict, device_type: str, zero_stage: int) -> ExecutionPlan:
    """The trainer's plan: from its device, the ds_config's autocast dtype, the model's L_max / M_max and forces
    mode, the ZeRO stage, whether the loader builds the graphs, and the run config's `execution:` overrides."""
    autocast = ds.get("torch_autocast", {})
    dtype = "bf16" if autocast.get("enabled") else "fp32"
    try:
        return choose_plan(device_type=device_type, dtype=dtype, lmax=cfg.model.lmax, mmax=cfg.model.mmax,
                           zero_stage=zero_stage, forces=cfg.model.forces, graph_ahead=cfg.data.build_graphs,
                           overrides=cfg.execution)
    except ValueError as err:
        from eqv2.config import ConfigError
        raise ConfigError(str(err)) from err


def moved_model_key(model: dict | None) -> str | None:
    """The error for an execution key given under a run config's `model:` (where it was before), or None."""
    if not isinstance(model, dict):
        return None
    for key in sorted(EXECUTION_KEYS & set(model)):
        return (f"model.{key}: moved to execution.{key} (how the model is executed is not part of the model; "
                "docs/execution.md)")
    return None


def paper_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved model config without its execution keys: they choose kernels and padding, never the function,
    so dropping them from an old checkpoint changes no output (the loading run's plan decides them)."""
    return {k: v for k, v in saved.items() if k not in EXECUTION_KEYS}
