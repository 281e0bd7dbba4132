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
import json
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import eqv2 from the repository, not eqv2/ itself
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import torch
import torch._dynamo  # noqa: F401  (before zero.Init: its first import checks torch.Tensor.__new__, patched there)

from eqv2.config import ConfigError, save_yaml, to_dict
from eqv2.data import PlanError, SampleError, ShardError
from eqv2.model.graph import GraphInputError
from eqv2.training import checkpointing as ckpt
from eqv2.training.compile import CompileEvents, ShapeBuckets, compiled_graph_count
from eqv2.training.config import RunConfig, load_ds_config, load_run_config, resolve_ds_config
from eqv2.training.dist import DistInfo, all_gather_object, exit_process, init_distributed, shutdown
from eqv2.training.garbage import GarbageCollection
from eqv2.training.loss import EnergyForceLoss
from eqv2.training.monitor import StepLogger, run_summary
from eqv2.training.optim import lr_factor
from eqv2.training.probes import Probes
from eqv2.training.profiling import phase
from eqv2.training.resume import restore
from eqv2.training.run_state import Checkpointer, Evaluator, Progress
from eqv2.training.setup import (BuiltModel, RunData, build_data, build_engine, build_model, describe_launch,
                                 execution_plan, prepare_targets)
from eqv2.training.startup import StartupClock
from eqv2.training.signals import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, EXIT_REQUEUE, StopFlag
from eqv2.training.step import StepContext, take_step
from eqv2.training.wandb_log import WandbSink, require_wandb


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
        require_wandb(cfg.log.wandb)
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
    run_dir, ckpt_dir = Path(cfg.run_dir), Path(cfg.run_dir) / "checkpoints"
    launched = time.perf_counter()
    clock = StartupClock()  # launch to first step, by phase (training/startup.py)
    clock.mark("imports_init_s")

    # --- config: the resume point, decided before anything of the run directory is written and before
    # the engine exists (universal loading is an engine setting); then what the run fits
    resume = _open_run_dir(cfg, resume_arg, run_dir, dist)
    ds = resolve_ds_config(ds_cfg, run_dir, load_universal=bool(resume and resume.universal))
    gas = ds["gradient_accumulation_steps"]
    targets, pretrained = prepare_targets(cfg, resume)  # normalisers, energy references, graph statistics
    clock.mark("setup_s")

    # --- data, model, engine
    plan = execution_plan(cfg, ds, dist)  # kernels and shape buckets (eqv2/execution.py)
    data = build_data(cfg, dist, gas, plan)  # the loader workers pad batches to the plan's shape buckets
    clock.mark("data_s")
    built = build_model(cfg, ds, dist, pretrained, plan)
    clock.mark("model_s")
    engine, ema, max_grad_norm = build_engine(cfg, ds, dist, built)
    clock.mark("engine_s")
    loss_fn = EnergyForceLoss(cfg.loss, targets.normalizers, targets.reference_tensor(dist.device))
    if dist.is_main:
        print(describe_launch(dist, built, engine, ds, data), flush=True)

    # --- resume
    progress = Progress(*restore(resume, engine, ema, data.stream, dist)) if resume else Progress()
    if dist.is_main:  # resolved, self-contained configs of this launch, once every check has passed
        save_yaml(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(ds, indent=1))

    # --- loop
    logger, probes = _observers(cfg, dist, run_dir, engine, data, progress.step, built)
    step_ctx = StepContext.for_engine(engine, loss_fn, stop, float(dist.world_size * gas),
                                      cfg.loss.train_on_free_atoms, dist.device, max_grad_norm)
    # the step whose checkpoint this run directory holds already: the one resumed from, if it is here
    saved_step = progress.step if resume and resume.tag_dir.parent.resolve() == ckpt_dir.resolve() else -1
    checkpointer = Checkpointer(cfg, engine, ema, data.stream, targets, dist, ckpt_dir, data.total_steps, saved_step)
    evaluate_and_track = Evaluator(cfg, engine, ema, data.prepare, targets, dist, logger, checkpointer)
    if cfg.eval.at_start and progress.step == 0:
        evaluate_and_track(progress)
    engine.train()
    probes.on_start()
    clock.mark("resume_s")
    startup = None
    try:
        while progress.step < data.total_steps:
            for micro in _timed(_groups(data.stream.epoch_batches(progress.epoch), gas), logger):
                lr = _set_lr(engine, cfg, progress.step, data)
                torch.manual_seed(hash((cfg.seed, progress.step, dist.rank)) % 2**62)  # dropout masks survive resume
                probes.before_step(progress.step + 1, micro)
                with phase("batch_to_device"):
                    micro = [b.to(dist.device, non_blocking=True) for b in micro]
                log_now = logger.due(progress.step + 1)
                terms, counts, skipped, stop_now, grad_norm = take_step(step_ctx, micro, grad_norm_needed=log_now)
                progress.step += 1
                if clock is not None:  # the first step of this launch: start-up ends here
                    startup, clock = clock.first_step_done(dist.device), None
                    if dist.is_main:
                        StartupClock.write(run_dir, startup)
                probes.after_step(progress.step)
                progress.nonfinite += skipped > 0  # steps with at least one non-finite micro-batch
                if ema is not None and skipped < gas:
                    with phase("ema"):
                        ema.update()
                with phase("log"):
                    logger.add_step(terms, counts)
                if log_now:
                    extra = {"nonfinite_steps": progress.nonfinite}
                    if startup is not None:  # the first record of this launch carries its start-up phases
                        extra["startup"], startup = startup, None
                    if built.compiled:  # a count that keeps growing means recompilation (see docs/training.md)
                        extra["compiled_graphs"] = compiled_graph_count()
                    logger.log(progress.step, progress.epoch, lr, grad_norm, extra)
                if progress.nonfinite >= cfg.loss.max_nonfinite_steps:
                    raise NonFiniteError(
                        f"stopping: {progress.nonfinite} steps had a non-finite loss (loss.max_nonfinite_steps="
                        f"{cfg.loss.max_nonfinite_steps}); last good checkpoint: {ckpt.latest_tag(ckpt_dir)}")
                if cfg.eval.every_steps and progress.step % cfg.eval.every_steps == 0 \
                        and progress.step < data.total_steps:
                    evaluate_and_track(progress)
                if progress.step % cfg.checkpoint.every_steps == 0 or stop_now:
                    checkpointer.save(progress)
                if stop_now:
                    return _requeue(stop, run_dir, progress.step, dist)
                if progress.step >= data.total_steps:
                    break
            else:
                progress.epoch += 1  # the epoch's batches ran out (a remainder < grad accumulation is dropped)

        # --- final evaluation and checkpoint
        evaluate_and_track(progress)
        if cfg.checkpoint.save_at_end:
            checkpointer.save(progress)
        elif dist.is_main:
            print(f"eqv2.train: checkpoint.save_at_end=false: step {progress.step} is not saved", flush=True)
        if dist.is_main:
            print(run_summary(run_dir, ckpt_dir, progress.step, time.perf_counter() - launched,
                              ckpt.latest_tag(ckpt_dir)), flush=True)
        return EXIT_OK
    finally:
        probes.on_end()
        logger.close()
        data.stream.close()


def _observers(cfg: RunConfig, dist: DistInfo, run_dir: Path, engine, data: RunData, start_step: int,
               built: BuiltModel) -> tuple[StepLogger, Probes]:
    """The run's step logger (metrics.jsonl, the progress bar, W&B on the main rank) and its diagnostic
    probes (eqv2/training/probes.py: profiler, gc control, shape-bucket counter)."""
    plan = built.plan
    padded = bool(plan.pad_atoms_multiple or plan.pad_edges_multiple)
    buckets = ShapeBuckets(plan.pad_atoms_multiple, plan.pad_edges_multiple) if padded else None
    collector = GarbageCollection(cfg.gc)
    compile_events = CompileEvents() if built.compiled else None
    logger = StepLogger(run_dir, dist.device, dist.is_main, data.total_steps, start_step, cfg.log.every_steps,
                        cfg.log.progress_bar, engine.monitor, count_shape_buckets=padded,
                        compile_events=compile_events, collector=collector, data_stream=data.stream)
    if dist.is_main and cfg.log.wandb.enabled:
        logger.sinks.append(WandbSink(cfg.log.wandb, run_dir, to_dict(cfg)))
    probes = Probes.for_run(cfg.log.profile_steps, run_dir, dist.rank, dist.device, logger, collector,
                            compile_events, buckets, built.model, built.compiled)
    return logger, probes


def _set_lr(engine, cfg: RunConfig, step: int, data: RunData) -> float:
    """Sets the learning rate of the coming step on every parameter group (times its lr_scale).

    The trainer sets the lr, not a DeepSpeed `scheduler`: DeepSpeed's WarmupCosineLR starts its cosine
    at the end of the warm-up, the reference's (lr_factor) runs it from step 0, and a step whose every
    micro-batch is non-finite sets lr 0 for itself (training/step.py).  Clipping is DeepSpeed's
    `gradient_clipping`, applied by the trainer at ZeRO-0 only (training/optim.py trainer_clipping says why)."""
    lr = cfg.optim.lr * lr_factor(step, data.total_steps, data.warmup_steps, cfg.optim.warmup_factor,
                                  cfg.optim.lr_min_factor)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def _requeue(stop: StopFlag, run_dir: Path, step: int, dist: DistInfo) -> int:
    """After the checkpoint of a stop request: the record slurm/lib.sh reads, one line, EXIT_REQUEUE."""
    stop.write_record(run_dir, step, ckpt.tag_for(step), dist.is_main)
    if dist.is_main:
        why = signal.Signals(stop.signum).name if stop.requested else "signal on another rank"
        print(f"eqv2.train: stop requested ({why}): checkpoint {ckpt.tag_for(step)} saved, "
              f"exiting with {EXIT_REQUEUE} (requeue and --resume auto)", flush=True)
    return EXIT_REQUEUE


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


if __name__ == "__main__":
    exit_process(main())  # after main's own teardown (training/dist.py says why)
