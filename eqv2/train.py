"""Train EquiformerV2 with DeepSpeed.

    deepspeed eqv2/train.py --ds_config ds_configs/zero0_bf16.json --config configs/train/demo.yaml \
        [--set optim.lr=2e-4 ...] [--resume auto|PATH]

Also runs under torchrun, plain srun, mpirun (mpi4py) or as a single `python` process.  Reads top to
bottom: config -> distributed -> data -> model -> engine -> resume -> loop (step, log, eval, checkpoint,
signals) -> final evaluation and checkpoint.  Exit codes (for SLURM scripts): 0 done, 1 error,
2 bad config/input, 75 stopped by SIGUSR1/SIGTERM after a checkpoint (requeue with --resume auto).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import eqv2 from the repository, not eqv2/ itself
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import torch
import torch._dynamo  # noqa: F401  (before zero.Init: its first import checks torch.Tensor.__new__, patched there)

from eqv2.config import ConfigError, save_yaml, to_dict
from eqv2.data import PlanError, SampleError, ShardError
from eqv2.execution import apply_plan, run_plan
from eqv2.model.graph import GraphBuilder, GraphInputError
from eqv2.training import checkpointing as ckpt
from eqv2.training.activation_checkpointing import apply_activation_checkpointing
from eqv2.training.compile import CompileEvents, ShapeBuckets, apply_compile, compiled_graph_count
from eqv2.training.config import RunConfig, load_ds_config, load_run_config, resolve_ds_config
from eqv2.training.dist import DistInfo, all_gather_object, barrier, init_distributed, shutdown
from eqv2.training.ema import EMA
from eqv2.training.finetune import freeze, load_pretrained, read_pretrained
from eqv2.training.garbage import GarbageCollection
from eqv2.training.loss import EnergyForceLoss, Normalizers
from eqv2.training.metrics import S2EFMetrics
from eqv2.training.monitor import StepLogger, run_summary
from eqv2.training.optim import build_optimizer, lr_factor, trainer_clipping
from eqv2.training.probes import Probes
from eqv2.training.profiling import phase
from eqv2.training.targets import check_zero_stage, physical, resolve_targets
from eqv2.training.resume import restore
from eqv2.training.signals import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, EXIT_REQUEUE, StopFlag
from eqv2.training.step import StepContext, take_step
from eqv2.training.wandb_log import WandbSink


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train EquiformerV2 with DeepSpeed.")
    p.add_argument("--ds_config", required=True, help="DeepSpeed engine config JSON (ds_configs/*.json)")
    p.add_argument("--config", required=True, help="run config YAML (configs/train/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run config key, e.g. --set optim.lr=2e-4 (repeatable)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="auto: newest complete checkpoint of run_dir (fresh start if none); or a checkpoint path")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = StopFlag().install()  # first: a signal arriving during start-up must not be lost
    try:
        ds_cfg = load_ds_config(args.ds_config)
        cfg, raw = load_run_config(args.config, args.set, ds_cfg["train_micro_batch_size_per_gpu"])
    except ConfigError as err:
        print(f"eqv2.train: config error: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    dist = init_distributed()
    code = EXIT_ERROR
    try:
        code = train(cfg, ds_cfg, args.resume, dist, stop)
        return code
    except (ConfigError, FileNotFoundError, PlanError, SampleError, ShardError, GraphInputError,
            ckpt.CheckpointError) as err:  # bad input
        print(f"eqv2.train (rank {dist.rank}): {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except NonFiniteError as err:
        print(f"eqv2.train (rank {dist.rank}): {err}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    finally:
        shutdown(clean=code in (EXIT_OK, EXIT_REQUEUE))


class NonFiniteError(RuntimeError):
    """Too many non-finite losses: the run is diverging or the data is broken."""


def train(cfg: RunConfig, ds_cfg: dict, resume_arg: str | None, dist: DistInfo, stop: StopFlag) -> int:
    import deepspeed

    from eqv2.data import TrainStream, load_stats, num_val_batches
    from eqv2.data.stats import check_degree_graph
    from eqv2.model.equiformer_v2 import EquiformerV2

    run_dir, ckpt_dir = Path(cfg.run_dir), Path(cfg.run_dir) / "checkpoints"
    launched = time.perf_counter()

    # --- resume point, decided before anything of the run directory is written and before the engine
    # exists (universal loading is an engine setting)
    resume = _open_run_dir(cfg, resume_arg, run_dir, dist)
    ds = resolve_ds_config(ds_cfg, run_dir, load_universal=bool(resume and resume.universal))
    gas = ds["gradient_accumulation_steps"]

    # --- target normalisers and graph statistics
    stats_path = cfg.data.stats_path
    if not stats_path.is_file():
        raise ConfigError(f"data.stats: dataset stats file not found: {stats_path}")
    stats = load_stats(stats_path)
    # a fine-tuning run starts from pretrained weights, unless it resumes (then its own checkpoint wins)
    pretrained = read_pretrained(cfg.init.from_checkpoint, cfg.init.weights) \
        if cfg.init.from_checkpoint and not resume else None
    # a resumed run keeps the units (and energy references) its weights were trained in, a fine-tuning run
    # those of its pretrained model unless the config sets them; else the data stats' (training/targets.py)
    targets = resolve_targets(cfg, stats, str(stats_path), pretrained, resume.state if resume else None)
    normalizers, references = targets.normalizers, targets.reference_tensor(dist.device)
    if cfg.model_graph_stats_from_data and not resume and not cfg.init.from_checkpoint:
        try:  # avg_degree depends on the graph: it must be the model's cutoff and neighbour limit
            check_degree_graph(stats, cfg.model.max_radius, cfg.model.max_neighbors, str(stats_path),
                               cfg.data.train_manifest)
        except ValueError as err:
            raise ConfigError(f"model_graph_stats_from_data: {err}") from None
        cfg.model.avg_num_nodes, cfg.model.avg_degree = stats.avg_num_nodes, stats.avg_degree
    cfg.normalizers = normalizers

    # --- data
    # radius graphs built on the CPU in the loader workers, with the model's cutoff (data.build_graphs)
    graphs = GraphBuilder.for_model(cfg.model) \
        if cfg.data.build_graphs else None
    stream = TrainStream(cfg.data, dist.rank, dist.world_size, graphs)
    steps_per_epoch = stream.steps_in_epoch(0) // gas
    if steps_per_epoch < 1:
        raise ConfigError(f"data: an epoch has {stream.steps_in_epoch(0)} batches per rank, fewer than "
                          f"gradient_accumulation_steps={gas}")
    for _, split_cfg in cfg.data.val_splits():  # plan validation now: a bad split must fail before training
        num_val_batches(split_cfg, dist.world_size)
    total_steps, warmup_steps = cfg.optim.resolve_steps(steps_per_epoch)

    # --- model, optimizer, engine
    torch.manual_seed(cfg.seed)
    zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    check_zero_stage(cfg, zero_stage)
    # ZeRO-3: every parameter is partitioned as soon as its module is built, so no rank ever holds the
    # whole model; the initialisation steps that touch built submodules are then redone on gathered
    # parameters.  tensor_overrides=[]: only parameters are moved; the model's constant tables (Wigner
    # swaps, sphere grids) are still computed as written, in float64 on the host
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=zero_stage == 3, tensor_overrides=[]):
        model = EquiformerV2(cfg.model)
    plan = run_plan(cfg, ds, dist.device.type, zero_stage)  # kernels and shape buckets (eqv2/execution.py)
    model = apply_plan(model, plan)
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
    optimizer = build_optimizer(model, cfg.optim, fused=dist.device.type == "cuda",
                                backbone_lr_factor=cfg.init.backbone_lr_factor)
    engine_ds, max_grad_norm = trainer_clipping(ds)  # ZeRO-0: the trainer clips, with multi-tensor kernels
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=engine_ds)
    ema = EMA(engine.module, cfg.optim.ema_decay, cfg.optim.ema_warmup) if cfg.optim.ema_decay else None
    loss_fn = EnergyForceLoss(cfg.loss, normalizers, references)
    if dist.is_main:
        print(f"eqv2.train: {dist.launcher} launch, {dist.world_size} rank(s) on {dist.device.type}/{dist.backend}; "
              f"{num_params / 1e6:.2f}M parameters{f' ({frozen / 1e6:.2f}M frozen)' if frozen else ''}; ZeRO-{engine.zero_optimization_stage()}; "
              f"global batch {engine.train_batch_size()} = {ds['train_micro_batch_size_per_gpu']} x {gas} x "
              f"{dist.world_size}; {total_steps} steps ({steps_per_epoch}/epoch, warm-up {warmup_steps}); "
              f"activation checkpointing on blocks {wrapped}; compiled: {len(compiled)} parts", flush=True)

    # --- resume
    step, epoch, nonfinite, best = 0, 0, 0, None
    if resume:
        step, epoch, nonfinite, best = restore(resume, engine, ema, stream, dist)

    if dist.is_main:  # resolved, self-contained configs of this launch, once every check has passed
        save_yaml(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(ds, indent=1))

    # --- loop
    padded = bool(plan.pad_atoms_multiple or plan.pad_edges_multiple)
    buckets = ShapeBuckets(plan.pad_atoms_multiple, plan.pad_edges_multiple) if padded else None
    collector = GarbageCollection(cfg.gc)
    compile_events = CompileEvents() if compiled else None
    logger = StepLogger(run_dir, dist.device, dist.is_main, total_steps, step, cfg.log.every_steps,
                        cfg.log.progress_bar, engine.monitor, count_shape_buckets=padded,
                        compile_events=compile_events, collector=collector, data_stream=stream)
    if dist.is_main and cfg.log.wandb.enabled:
        logger.sinks.append(WandbSink(cfg.log.wandb, run_dir, to_dict(cfg)))
    probes = Probes.for_run(cfg.log.profile_steps, run_dir, dist.rank, dist.device, logger, collector,
                            compile_events, buckets)  # diagnostics: eqv2/training/probes.py
    step_ctx = StepContext.for_engine(engine, loss_fn, stop, float(dist.world_size * gas),
                                      cfg.loss.train_on_free_atoms, dist.device, max_grad_norm)

    def trainer_state() -> dict:  # collective: every rank's data position is gathered
        data_per_rank = all_gather_object(stream.state_dict())
        return {"step": step, "data": data_per_rank[0], "data_per_rank": data_per_rank,
                "normalizers": asdict(normalizers), "energy_references": targets.references,
                "energy_target": targets.energy_target,
                "world_size": dist.world_size, "zero_stage": engine.zero_optimization_stage(),
                "bf16": bool(engine.bfloat16_enabled()), "nonfinite_steps": nonfinite, "best": best,
                "total_steps": total_steps, "config": to_dict(cfg)}

    # the step whose checkpoint this run directory holds already: the one resumed from, if it is here
    saved_step = step if resume and resume.tag_dir.parent.resolve() == ckpt_dir.resolve() else -1

    def save() -> None:  # once per step: a best, periodic and final save of one step are one checkpoint
        nonlocal saved_step
        if saved_step != step:
            ckpt.save(engine, ckpt_dir, step, trainer_state(), ema.checkpoint_state(dist.rank) if ema else None,
                      cfg.checkpoint, best["tag"] if best else None, dist.rank)
            saved_step = step

    def evaluate_and_track() -> None:
        nonlocal best
        if not cfg.data.val_splits():
            return
        for name, split_cfg in cfg.data.val_splits():
            split_metrics = evaluate(engine, cfg, split_cfg, ema, normalizers, dist, graphs, references)
            logger.log_eval(step, name, split_metrics)
            if name == "val":  # the primary split picks the best checkpoint
                metrics = split_metrics
        value = metrics[cfg.eval.primary_metric]
        if cfg.checkpoint.save_best and (best is None or value < best["value"]):
            best = {"tag": ckpt.tag_for(step), "metric": cfg.eval.primary_metric, "value": value}
            save()
            if dist.is_main:
                ckpt.mark_best(ckpt_dir, best["tag"], best["metric"], value)

    if cfg.eval.at_start and step == 0:
        evaluate_and_track()
    engine.train()
    probes.on_start()
    try:
        while step < total_steps:
            for micro in _timed(_groups(stream.epoch_batches(epoch), gas), logger):
                # the trainer sets the lr, not a DeepSpeed `scheduler`: DeepSpeed's WarmupCosineLR starts its
                # cosine at the end of the warm-up, the reference's (lr_factor) runs it from step 0, and a
                # step whose every micro-batch is non-finite sets lr 0 for itself (training/step.py).
                # Clipping is DeepSpeed's `gradient_clipping`, applied by the trainer at ZeRO-0 only
                # (training/optim.py trainer_clipping says why)
                lr = cfg.optim.lr * lr_factor(step, total_steps, warmup_steps, cfg.optim.warmup_factor,
                                              cfg.optim.lr_min_factor)
                for group in engine.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                torch.manual_seed(hash((cfg.seed, step, dist.rank)) % 2**62)  # dropout masks survive resume
                probes.before_step(step + 1, micro)
                with phase("batch_to_device"):
                    micro = [b.to(dist.device, non_blocking=True) for b in micro]
                log_now = logger.due(step + 1)
                terms, counts, skipped, stop_now, grad_norm = take_step(
                    step_ctx, micro, grad_norm_needed=log_now)
                step += 1
                probes.after_step(step)
                nonfinite += skipped > 0  # steps with at least one non-finite micro-batch
                if ema is not None and skipped < gas:
                    with phase("ema"):
                        ema.update()
                with phase("log"):
                    logger.add_step(terms, counts)
                if log_now:
                    extra = {"nonfinite_steps": nonfinite}
                    if compiled:  # a count that keeps growing means recompilation (see docs/training.md)
                        extra["compiled_graphs"] = compiled_graph_count()
                    logger.log(step, epoch, lr, grad_norm, extra)
                if nonfinite >= cfg.loss.max_nonfinite_steps:
                    raise NonFiniteError(
                        f"stopping: {nonfinite} steps had a non-finite loss (loss.max_nonfinite_steps="
                        f"{cfg.loss.max_nonfinite_steps}); last good checkpoint: {ckpt.latest_tag(ckpt_dir)}")
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total_steps:
                    evaluate_and_track()
                if step % cfg.checkpoint.every_steps == 0 or stop_now:
                    save()
                if stop_now:
                    stop.write_record(run_dir, step, ckpt.tag_for(step), dist.is_main)  # for slurm/lib.sh
                    if dist.is_main:
                        why = signal.Signals(stop.signum).name if stop.requested else "signal on another rank"
                        print(f"eqv2.train: stop requested ({why}): checkpoint {ckpt.tag_for(step)} saved, "
                              f"exiting with {EXIT_REQUEUE} (requeue and --resume auto)", flush=True)
                    return EXIT_REQUEUE
                if step >= total_steps:
                    break
            else:
                epoch += 1  # the epoch's batches ran out (a remainder < grad accumulation is dropped)
        evaluate_and_track()
        if cfg.checkpoint.save_at_end:
            save()
        elif dist.is_main:
            print(f"eqv2.train: checkpoint.save_at_end=false: step {step} is not saved", flush=True)
        if dist.is_main:
            print(run_summary(run_dir, ckpt_dir, step, time.perf_counter() - launched, ckpt.latest_tag(ckpt_dir)),
                  flush=True)
        return EXIT_OK
    finally:
        probes.on_end()
        logger.close()
        stream.close()


def _open_run_dir(cfg: RunConfig, resume_arg: str | None, run_dir: Path, dist: DistInfo) -> ckpt.ResumePoint | None:
    """The checkpoint to resume from (None: a fresh start), after the checks that keep runs apart: a
    fresh run never writes into a directory holding a run, a resume never continues another model, and
    the checkpoint directory is writable before step 1 rather than at the first save."""
    resume_dir, damaged = ckpt.find_resume(resume_arg, run_dir)
    if resume_arg is None:
        _on_main(dist, lambda: ckpt.refuse_existing_run(run_dir))
    state = ckpt.read_state(resume_dir) if resume_dir else None
    if state is not None:
        if cfg.model_graph_stats_from_data:  # the resumed model keeps the statistics it was built with
            cfg.model.avg_num_nodes = state["config"]["model"]["avg_num_nodes"]
            cfg.model.avg_degree = state["config"]["model"]["avg_degree"]
        ckpt.check_same_model(state, to_dict(cfg.model), resume_dir)
    if dist.is_main:
        for warning in damaged:
            print(f"eqv2.train: warning: {warning}", file=sys.stderr, flush=True)
    _on_main(dist, lambda: ckpt.check_writable(run_dir / "checkpoints"))
    if state is None:
        if resume_arg == "auto" and dist.is_main:
            ckpt.set_aside_unsaved_attempt(run_dir)
        return None
    return ckpt.prepare_resume(resume_dir, state, dist.world_size, dist.rank)


def _on_main(dist: DistInfo, check) -> None:
    """Run `check` on rank 0 and raise its error on every rank: a check failing on one rank alone would
    leave the others waiting in the next collective."""
    error = None
    if dist.is_main:
        try:
            check()
        except (ConfigError, ckpt.CheckpointError) as err:
            error = (type(err), str(err))
    error = all_gather_object(error)[0]
    if error is not None:
        raise error[0](error[1])


def _timed(groups, logger):
    """Yield from `groups`, adding the seconds spent waiting for each item to `logger.data_wait_s`."""
    it = iter(groups)
    while True:
        start = time.perf_counter()
        try:
            with phase("data_wait"):
                item = next(it)
        except StopIteration:
            return
        logger.data_wait_s += time.perf_counter() - start
        yield item


def _groups(batches, size: int):
    """Consecutive groups of `size` micro-batches; an incomplete last group is dropped."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


@torch.no_grad()
def evaluate(engine, cfg: RunConfig, split_cfg, ema: EMA | None, normalizers: Normalizers, dist: DistInfo,
             graphs: GraphBuilder | None, references: torch.Tensor | None = None) -> dict:
    """Metrics of one validation split (`split_cfg`: its data config; EMA weights by default), exact
    over ranks, in the units of the data (energy references added back)."""
    from eqv2.data import val_batches

    metrics = S2EFMetrics(dist.device, cfg.loss.train_on_free_atoms, normalizers.energy_mean, references)
    engine.eval()
    with ema.swapped_in() if (ema is not None and cfg.eval.use_ema) else contextlib.nullcontext():
        for i, batch in enumerate(val_batches(split_cfg, dist.rank, dist.world_size, graphs)):
            if cfg.eval.max_batches and i >= cfg.eval.max_batches:
                break
            batch = batch.to(dist.device, non_blocking=True)
            torch.compiler.cudagraph_mark_step_begin()
            metrics.update(physical(engine(batch), batch, normalizers, references), batch)
    engine.train()
    return metrics.compute()


if __name__ == "__main__":
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Files are closed and the process group is torn down (main's `finally`).  Skip interpreter
    # finalisation: C++ objects torch leaves to it (gloo/TCPStore threads) can still abort a finished
    # rank with "terminate called without an active exception" (exit -6; seen in CI, ZeRO-3 on 2 CPU
    # ranks), turning a completed run into a failed one.
    os._exit(exit_code)
