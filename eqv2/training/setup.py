"""The trainer's start-up, in the order eqv2/train.py calls it: what the run fits (`prepare_targets`:
normalisers, energy references, graph statistics), how it executes (`execution_plan`: kernels and shape
buckets), the data it trains on (`build_data`: the loader workers build the radius graphs and pad to the
plan's shape buckets), the model (`build_model`: the one place that builds, initialises, freezes, compiles
and wraps the model) and the DeepSpeed engine (`build_engine`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from eqv2.batch import AtomsBatch
from eqv2.buckets import loader_prepare
from eqv2.config import ConfigError
from eqv2.execution import ExecutionPlan, apply_plan, run_plan
from eqv2.model.graph import GraphBuilder
from eqv2.training import checkpointing as ckpt
from eqv2.training.activation_checkpointing import apply_activation_checkpointing
from eqv2.training.compile import apply_compile
from eqv2.training.config import RunConfig
from eqv2.training.dist import DistInfo
from eqv2.training.ema import EMA
from eqv2.training.finetune import Pretrained, freeze, load_pretrained, read_pretrained
from eqv2.training.optim import build_optimizer, trainer_clipping
from eqv2.training.targets import Targets, check_zero_stage, resolve_targets


def prepare_targets(cfg: RunConfig, resume: ckpt.ResumePoint | None) -> tuple[Targets, Pretrained | None]:
    """The run's targets and, for a fine-tuning run that does not resume, its pretrained weights.

    A resumed run keeps the units (and energy references) its weights were trained in, a fine-tuning
    run those of its pretrained model unless the config sets them; else the data stats'
    (training/targets.py).  Sets `cfg.normalizers` and, with `model_graph_stats_from_data` on a fresh
    run, the model's average node count and degree from the stats."""
    from eqv2.data import load_stats
    from eqv2.data.stats import check_degree_graph

    stats_path = cfg.data.stats_path
    if not stats_path.is_file():
        raise ConfigError(f"data.stats: dataset stats file not found: {stats_path}")
    stats = load_stats(stats_path)
    # a fine-tuning run starts from pretrained weights, unless it resumes (then its own checkpoint wins)
    pretrained = read_pretrained(cfg.init.from_checkpoint, cfg.init.weights) \
        if cfg.init.from_checkpoint and not resume else None
    targets = resolve_targets(cfg, stats, str(stats_path), pretrained, resume.state if resume else None)
    if cfg.model_graph_stats_from_data and not resume and not cfg.init.from_checkpoint:
        try:  # avg_degree depends on the graph: it must be the model's cutoff and neighbour limit
            check_degree_graph(stats, cfg.model.max_radius, cfg.model.max_neighbors, str(stats_path),
                               cfg.data.train_manifest)
        except ValueError as err:
            raise ConfigError(f"model_graph_stats_from_data: {err}") from None
        cfg.model.avg_num_nodes, cfg.model.avg_degree = stats.avg_num_nodes, stats.avg_degree
    cfg.normalizers = targets.normalizers
    return targets, pretrained


def zero_stage_of(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def execution_plan(cfg: RunConfig, ds: dict, dist: DistInfo) -> ExecutionPlan:
    """The run's kernels and shape buckets (eqv2/execution.py run_plan), for the loader and the model."""
    return run_plan(cfg, ds, dist.device.type, zero_stage_of(ds))


@dataclass
class RunData:
    """This rank's training stream and the run's length in optimizer steps."""
    stream: object  # eqv2.data.TrainStream
    # what the loader workers do to each batch, also for validation: radius graphs (data.build_graphs), padded
    # to the plan's shape buckets if it has them (eqv2/buckets.py); None: nothing (the model builds the graph)
    prepare: Callable[[AtomsBatch], AtomsBatch] | None
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def build_data(cfg: RunConfig, dist: DistInfo, gas: int, plan: ExecutionPlan) -> RunData:
    """Opens this rank's training stream and plans every validation split (a bad split fails here,
    before training); `gas`: DeepSpeed's gradient_accumulation_steps."""
    from eqv2.data import TrainStream, num_val_batches

    # radius graphs built on the CPU in the loader workers, with the model's cutoff (data.build_graphs), and
    # there padded to the plan's shape buckets: the main process does no padding work
    prepare = loader_prepare(GraphBuilder.for_model(cfg.model) if cfg.data.build_graphs else None, plan)
    stream = TrainStream(cfg.data, dist.rank, dist.world_size, prepare)
    steps_per_epoch = stream.steps_in_epoch(0) // gas
    if steps_per_epoch < 1:
        raise ConfigError(f"data: an epoch has {stream.steps_in_epoch(0)} batches per rank, fewer than "
                          f"gradient_accumulation_steps={gas}")
    for _, split_cfg in cfg.data.val_splits():
        num_val_batches(split_cfg, dist.world_size)
    total_steps, warmup_steps = cfg.optim.resolve_steps(steps_per_epoch)
    return RunData(stream, prepare, steps_per_epoch, total_steps, warmup_steps)


@dataclass
class BuiltModel:
    model: torch.nn.Module
    zero_stage: int
    num_params: int  # the full size, also when ZeRO-3 partitions the parameters
    frozen: int  # parameters frozen by init.freeze
    compiled: list  # the compiled parts (apply_compile); empty: eager
    wrapped: list  # the blocks under activation checkpointing
    plan: ExecutionPlan  # the kernels and shape buckets applied (eqv2/execution.py)


def build_model(cfg: RunConfig, ds: dict, dist: DistInfo, pretrained: Pretrained | None,
                plan: ExecutionPlan) -> BuiltModel:
    """The EquiformerV2 of `cfg.model`, seeded by `cfg.seed`, initialised from `pretrained` (a
    fine-tuning run) and ready for the engine: running `plan`, partitioned at ZeRO-3, frozen, compiled and
    wrapped."""
    import deepspeed

    from eqv2.model.equiformer_v2 import EquiformerV2

    torch.manual_seed(cfg.seed)
    zero_stage = zero_stage_of(ds)
    check_zero_stage(cfg, zero_stage)
    # ZeRO-3: every parameter is partitioned as soon as its module is built, so no rank ever holds the
    # whole model; the initialisation steps that touch built submodules are then redone on gathered
    # parameters.  tensor_overrides=[]: only parameters are moved; the model's constant tables (Wigner
    # swaps, sphere grids) are still computed as written, in float64 on the host
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=zero_stage == 3, tensor_overrides=[]):
        model = EquiformerV2(cfg.model)
    model = apply_plan(model, plan)  # kernels; shape buckets for batches not padded by the loader
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
    compiled = apply_compile(model, cfg.compile, zero_stage) \
        if cfg.compile.resolve(dist.device, zero_stage, frozen) and cfg.model.forces == "direct" else []
    wrapped = apply_activation_checkpointing(model, cfg.activation_checkpointing)  # wraps the compiled forwards
    return BuiltModel(model, zero_stage, num_params, frozen, compiled, wrapped, plan)


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
