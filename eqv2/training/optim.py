"""AdamW with the reference's weight-decay exclusions, and the cosine learning-rate schedule.

Weight decay pulls weights towards zero.  The exemptions are exactly fairchem's EquiformerV2
`no_weight_decay()`: the biases of linear layers (nn.Linear and the SO(3) linear layer) and every
parameter of a normalisation layer; everything else is decayed, embedding tables and the attention's
`alpha_dot` included.  The schedule is fairchem's EquiformerV2 cosine schedule as a function of the
optimizer step (not of epochs), so that it is identical however many ranks or micro-batches make up
a step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr: float = 4e-4  # peak learning rate (reference 2e-4 for S2EF-2M, 4e-4 for All+MD)
    weight_decay: float = 1e-3  # reference AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_steps: int | None = None  # length of the run in optimizer steps ...
    max_epochs: float | None = None  # ... or in passes over the training set (exactly one of the two)
    warmup_steps: int | None = None  # linear warm-up length in steps ...
    warmup_epochs: float | None = None  # ... or in epochs (reference: 0.1 on 2M, 0.01 on All+MD)
    warmup_factor: float = 0.2  # warm-up starts at lr × warmup_factor
    lr_min_factor: float = 0.01  # cosine decays to lr × lr_min_factor
    ema_decay: float | None = 0.999  # EMA of weights for evaluation and export; null disables
    ema_warmup: bool = False  # true: decay min(d, (1+n)/(10+n)) at update n; false: constant (the reference)

    def __post_init__(self) -> None:
        if (self.max_steps is None) == (self.max_epochs is None):
            raise ValueError("set exactly one of optim.max_steps and optim.max_epochs")
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ValueError("set at most one of optim.warmup_steps and optim.warmup_epochs")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        for key in ("max_steps", "max_epochs"):  # a run of no steps would "succeed" having trained nothing
            if (value := getattr(self, key)) is not None and not value > 0:
                raise ValueError(f"optim.{key} must be positive, got {value}")
        for key in ("warmup_steps", "warmup_epochs", "weight_decay"):
            if (value := getattr(self, key)) is not None and value < 0:
                raise ValueError(f"optim.{key} must be >= 0, got {value}")
        if not 0.0 <= self.warmup_factor <= 1.0 or not 0.0 <= self.lr_min_factor <= 1.0:
            raise ValueError(f"optim.warmup_factor and optim.lr_min_factor must be in [0, 1], got "
                             f"{self.warmup_factor} and {self.lr_min_factor}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in (0, 1), got {self.ema_decay}")

    def resolve_steps(self, steps_per_epoch: int | None) -> tuple[int, int]:
        """(total steps, warm-up steps), converting epochs with the data's steps per epoch."""
        def need() -> int:
            if not steps_per_epoch:
                raise ValueError("epoch-based optim settings need the training set size (manifest)")
            return steps_per_epoch

        # int(): fairchem's EquiformerV2 trainer truncates epochs × steps per epoch
        total = self.max_steps if self.max_steps is not None else max(1, int(self.max_epochs * need()))
        if self.warmup_steps is not None:
            warmup = self.warmup_steps
        elif self.warmup_epochs is not None:
            warmup = int(self.warmup_epochs * need())
        else:
            warmup = 0
        return total, min(warmup, total)


def _no_decay(module: nn.Module, param_name: str) -> bool:
    """fairchem's rule: non-weight parameters of linear layers, all parameters of norms.  Class-name
    match so that our own norms (SeparableLayerNorm, ...) and SO3Linear are covered without importing
    the model; `param_name` is the parameter's name inside `module` (not recursive)."""
    kind = type(module).__name__
    if isinstance(module, nn.Linear) or kind == "SO3Linear":
        return "weight" not in param_name
    return "Norm" in kind


def param_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict], list[str]]:
    """Two AdamW groups (decay / no decay); also returns the names of the no-decay parameters."""
    decay, no_decay, no_decay_names, seen = [], [], [], set()
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if _no_decay(module, p_name):
                no_decay.append(param)
                no_decay_names.append(full)
            else:
                decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]], no_decay_names


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = False,
                    backbone_lr_factor: float = 1.0) -> torch.optim.Optimizer:
    """fused: one CUDA kernel for the whole update (the parameters the engine steps must be on a GPU);
    backbone_lr_factor: fine-tuning's lower learning rate for all but the heads (eqv2/training/finetune.py)."""
    from eqv2.training.finetune import scale_backbone_lr

    groups = scale_backbone_lr(param_groups(model, cfg.weight_decay)[0], model, backbone_lr_factor)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def trainer_clipping(ds: dict) -> tuple[dict, float]:
    """(the DeepSpeed config the engine gets, the gradient-norm limit the trainer applies itself).

    At ZeRO stage 0 the trainer clips: DeepSpeed's stage-0 clipping takes one norm and one scaling per
    parameter tensor plus an all-reduce of the norm (892 tensors in the 153M model: ~1,800 kernel
    launches per step, counted by diagnostics/ds_step_ops.py), while the gradients are already averaged and
    identical on every rank, so `clip_gradients` gives the same result in a handful of multi-tensor
    kernels.  At stages 1-3 each rank holds only its partition of the averaged gradients, and under
    DeepSpeed's own `bf16` mode its optimizer steps from float32 copies of the gradients rather than
    `.grad`: there DeepSpeed's clipping stays."""
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    max_norm = float(ds.get("gradient_clipping", 0.0))
    if stage != 0 or max_norm <= 0 or ds.get("bf16", {}).get("enabled"):
        return ds, 0.0
    return {**ds, "gradient_clipping": 0.0}, max_norm


def clip_gradients(params, max_norm: float) -> torch.Tensor:
    """Global 2-norm of the gradients of `params` (before clipping); when `max_norm` > 0 the gradients
    are scaled by min(1, max_norm / (norm + 1e-6)), as DeepSpeed and torch clip.  Multi-tensor kernels
    and no host synchronisation: the scale is applied on the device whether or not it is below 1."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


def lr_factor(step: int, total_steps: int, warmup_steps: int, warmup_factor: float,
              lr_min_factor: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based).

    Linear from `warmup_factor` to 1 over the warm-up, then the cosine towards `lr_min_factor`.  As in
    the reference (fairchem's CosineLRLambda), step `warmup_steps` itself is the last warm-up step
    (factor 1.0), and the cosine's phase is step / total_steps (counted from step 0, not from the end
    of the warm-up), so with a short warm-up the hand-over is continuous to within
    cos(π·warmup/total).  Runs extended past their plan keep lr × lr_min_factor.
    """
    if warmup_steps > 0 and step <= warmup_steps:
        alpha = step / warmup_steps
        return warmup_factor * (1.0 - alpha) + alpha
    progress = min(1.0, step / max(1, total_steps))
    return lr_min_factor + 0.5 * (1.0 - lr_min_factor) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                    warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, cfg.warmup_factor,
                                          cfg.lr_min_factor))
