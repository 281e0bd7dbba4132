"""The trainer's model and DeepSpeed engine (eqv2/train.py calls `build_model`, then `build_engine`).

`build_model` is the one place that builds, initialises, freezes, compiles and wraps the model for
training: how it executes (compile, activation checkpointing) is decided there."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from eqv2.training.activation_checkpointing import apply_activation_checkpointing
from eqv2.training.compile import apply_compile
from eqv2.training.config import RunConfig
from eqv2.training.dist import DistInfo
from eqv2.training.ema import EMA
from eqv2.training.finetune import Pretrained, freeze, load_pretrained
from eqv2.training.optim import build_optimizer, trainer_clipping
from eqv2.training.setup import RunData
from eqv2.training.targets import check_zero_stage


@dataclass
class BuiltModel:
    model: torch.nn.Module
    zero_stage: int
    num_params: int  # the full size, also when ZeRO-3 partitions the parameters
    frozen: int  # parameters frozen by init.freeze
    compiled: list  # the compiled parts (apply_compile); empty: eager
    wrapped: list  # the blocks under activation checkpointing


def build_model(cfg: RunConfig, ds: dict, dist: DistInfo, pretrained: Pretrained | None) -> BuiltModel:
    """The EquiformerV2 of `cfg.model`, seeded by `cfg.seed`, initialised from `pretrained` (a
    fine-tuning run) and ready for the engine: partitioned at ZeRO-3, frozen, compiled and wrapped."""
    import deepspeed

    from eqv2.model.equiformer_v2 import EquiformerV2

    torch.manual_seed(cfg.seed)
    zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    check_zero_stage(cfg, zero_stage)
    # ZeRO-3: every parameter is partitioned as soon as its module is built, so no rank ever holds the
    # whole model; the initialisation steps that touch built submodules are then redone on gathered
    # parameters.  tensor_overrides=[]: only parameters are moved; the model's constant tables (Wigner
    # swaps, sphere grids) are still computed as written, in float64 on the host
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=zero_stage == 3, tensor_overrides=[]):
        model = EquiformerV2(cfg.model)
    if zero_stage == 3:
        model.init_partitioned(lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))
        # the engine does not move a partitioned model, so the host-built tables go to the device here
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                setattr(module, name, buffer.to(dist.device))
    if pretrained:
        gathered = (lambda ps: deepspeed.zero.GatheredParameters(ps, modifier_rank=0)) if zero_stage == 3 \
            else (lambda ps: contextlib.nullcontext())
        fresh = load_pretrained(model, pretrained, cfg.init, gathered)
        if dist.is_main:
            print(f"eqv2.train: initialised from {pretrained.source}"
                  f"{f'; {len(fresh)} head tensors kept fresh' if fresh else ''}", flush=True)
    frozen = freeze(model, cfg.init)  # resumed or not: frozen parts stay frozen
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ds_numel: ZeRO-3 full size
    # gradient forces: no compile by default (check_force_options refuses compile.enabled=true)
    compiled = apply_compile(model, cfg.compile) \
        if cfg.compile.resolve(dist.device, zero_stage) and cfg.model.forces == "direct" else []
    wrapped = apply_activation_checkpointing(model, cfg.activation_checkpointing)  # wraps the compiled forwards
    return BuiltModel(model, zero_stage, num_params, frozen, compiled, wrapped)


def build_engine(cfg: RunConfig, ds: dict, dist: DistInfo, built: BuiltModel) -> tuple[object, EMA | None, float]:
    """(the DeepSpeed engine, the EMA of its weights or None, the gradient-norm limit the trainer
    applies itself: at ZeRO-0 only, with multi-tensor kernels (optim.trainer_clipping); else 0)."""
    import deepspeed

    optimizer = build_optimizer(built.model, cfg.optim, fused=dist.device.type == "cuda",
                                backbone_lr_factor=cfg.init.backbone_lr_factor)
    engine_ds, max_grad_norm = trainer_clipping(ds)
    engine, _, _, _ = deepspeed.initialize(model=built.model, optimizer=optimizer, config=engine_ds)
    ema = EMA(engine.module, cfg.optim.ema_decay, cfg.optim.ema_warmup) if cfg.optim.ema_decay else None
    return engine, ema, max_grad_norm


def describe_launch(dist: DistInfo, built: BuiltModel, engine, ds: dict, data: RunData) -> str:
    """The trainer's one start-up line: launcher, ranks, model size, ZeRO stage, batch, steps."""
    frozen = f" ({built.frozen / 1e6:.2f}M frozen)" if built.frozen else ""
    return (f"eqv2.train: {dist.launcher} launch, {dist.world_size} rank(s) on {dist.device.type}/{dist.backend}; "
            f"{built.num_params / 1e6:.2f}M parameters{frozen}; ZeRO-{engine.zero_optimization_stage()}; "
            f"global batch {engine.train_batch_size()} = {ds['train_micro_batch_size_per_gpu']} x "
            f"{ds['gradient_accumulation_steps']} x {dist.world_size}; {data.total_steps} steps "
            f"({data.steps_per_epoch}/epoch, warm-up {data.warmup_steps}); "
            f"activation checkpointing on blocks {built.wrapped}; compiled: {len(built.compiled)} parts")
