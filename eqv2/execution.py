"""How a model is executed, chosen from outside the model (issue 25, first part).

`ModelConfig` still carries the kernel and padding fields listed in `EXECUTION_KEYS` (the paper modules read
them); this module is the one place that decides them. `choose_plan` picks an `ExecutionPlan` from the device,
dtype, L_max / M_max, ZeRO stage and forces mode; a run config's `execution:` section (`ExecutionOverrides`,
every field "auto" by default, unknown keys rejected by name) overrides single choices for experiments.
`plan.model_config(cfg)` writes the plan into a model config; `paper_config(d)` drops the execution keys from a
saved config (they never change the function the model computes, so old checkpoints lose nothing).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from eqv2.model.config import EXECUTION_KEYS, ModelConfig

AUTO = "auto"


@dataclass(frozen=True)
class ExecutionPlan:
    """One complete choice of kernels and shape buckets; every field is a concrete value (no "auto")."""
    validate_inputs: bool = True  # host-side checks of structures and graph (off where the loader checked them)
    pad_atoms_multiple: int = 0  # shape buckets (0: off), applied where batches are built
    pad_edges_multiple: int = 0
    so2_fused_input_grad: bool = False  # eqv2::so2_input_grad custom op (backward not differentiable again)
    so2_indexed_radial: bool = False  # needs so2_fused_input_grad
    rotation_align: int = 1  # Wigner rows padded to this many elements (8: 16-byte bf16 rows)
    fused_rotation: bool = False  # Triton gather-rotate-scatter (CUDA bf16/fp16; backward not differentiable again)
    s2_kernel_form: Literal["rows", "columns"] = "columns"

    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        """`cfg` executed by this plan (ModelConfig's own checks reject impossible combinations)."""
        return dataclasses.replace(cfg, **dataclasses.asdict(self))


REFERENCE = ExecutionPlan()  # the paper modules as written: what CPU and float32 runs use


@dataclass(frozen=True)
class ExecutionOverrides:
    """A run config's `execution:` section: "auto" leaves the choice to `choose_plan`."""
    validate_inputs: bool | str = AUTO
    pad_atoms_multiple: int | str = AUTO
    pad_edges_multiple: int | str = AUTO
    so2_fused_input_grad: bool | str = AUTO
    so2_indexed_radial: bool | str = AUTO
    rotation_align: int | str = AUTO
    fused_rotation: bool | str = AUTO
    s2_kernel_form: str = AUTO

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
      Wigner rows, fused rotations and shape buckets of 64 atoms / 1,024 edges (the compiled trainer's shapes).
    - Gradient forces: no kernel whose backward is not differentiable again (so2_fused_input_grad,
      fused_rotation); an override asking for one is refused by name.
    lmax / mmax / zero_stage are recorded inputs: the kernels' own dispatch falls back where they do not apply.
    """
    if forces not in ("direct", "gradient"):
        raise ValueError(f"forces must be 'direct' or 'gradient', got {forces!r}")
    if dtype not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"dtype must be 'bf16', 'fp16' or 'fp32', got {dtype!r}")
    if not 0 <= mmax <= lmax:
        raise ValueError(f"mmax must be in [0, lmax]: lmax={lmax}, mmax={mmax}")
    auto: dict[str, Any] = dataclasses.asdict(REFERENCE)
    auto["validate_inputs"] = not graph_ahead
    fast = device_type == "cuda" and dtype in ("bf16", "fp16")
    if fast:
        auto.update(pad_atoms_multiple=64, pad_edges_multiple=1024, rotation_align=8, s2_kernel_form="columns")
        if forces == "direct":
            auto.update(so2_fused_input_grad=True, so2_indexed_radial=True, fused_rotation=True)
    chosen = dict(auto)
    for key, value in dataclasses.asdict(overrides or ExecutionOverrides()).items():
        if value != AUTO:
            chosen[key] = value
    if forces == "gradient":
        for key in ("so2_fused_input_grad", "fused_rotation"):
            if chosen[key]:
                raise ValueError(f"execution.{key}: not supported with forces: gradient (its backward is not "
                                 "differentiable again); leave it 'auto' or set it to false")
    if chosen["so2_indexed_radial"] and not chosen["so2_fused_input_grad"]:
        if overrides is not None and overrides.so2_indexed_radial is True:
            raise ValueError("execution.so2_indexed_radial needs so2_fused_input_grad (it is a form of that path)")
        chosen["so2_indexed_radial"] = False
    for key in ("pad_atoms_multiple", "pad_edges_multiple"):
        if chosen[key] < 0:
            raise ValueError(f"execution.{key} must be >= 0 (0: no padding), got {chosen[key]}")
    if chosen["rotation_align"] < 1:
        raise ValueError(f"execution.rotation_align must be >= 1 (1: no padding), got {chosen['rotation_align']}")
    return ExecutionPlan(**chosen)


def paper_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved model config without its execution keys: they choose kernels and padding, never the function,
    so dropping them from an old checkpoint changes no output (the loading run's plan decides them)."""
    return {k: v for k, v in saved.items() if k not in EXECUTION_KEYS}
