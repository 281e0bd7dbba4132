"""What the trainer's loop carries from step to step (`Progress`), and the two things it does besides
stepping: saving checkpoints (`Checkpointer`) and validating with best-checkpoint tracking
(`Evaluator`).  eqv2/train.py builds one of each after the engine."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from eqv2.batch import AtomsBatch
from eqv2.config import to_dict
from eqv2.training import checkpointing as ckpt
from eqv2.training.config import RunConfig
from eqv2.training.dist import DistInfo, all_gather_object
from eqv2.training.ema import EMA
from eqv2.training.loss import Normalizers
from eqv2.training.metrics import S2EFMetrics
from eqv2.training.targets import Targets, physical


@dataclass
class Progress:
    """Where the run is: optimizer steps taken, data epoch, steps with a non-finite loss, and the best
    checkpoint so far ({"tag", "metric", "value"} or None).  Saved in every checkpoint."""
    step: int = 0
    epoch: int = 0
    nonfinite: int = 0
    best: dict | None = None


class Checkpointer:
    """Saves the engine, the EMA and the trainer state under `ckpt_dir`, at most once per step: a best,
    periodic and final save of one step are one checkpoint.  `saved_step`: the step whose checkpoint
    `ckpt_dir` holds already (the one resumed from, if it is there; else -1)."""

    def __init__(self, cfg: RunConfig, engine, ema: EMA | None, stream, targets: Targets, dist: DistInfo,
                 ckpt_dir: Path, total_steps: int, saved_step: int) -> None:
        self.cfg, self.engine, self.ema, self.stream, self.targets, self.dist = cfg, engine, ema, stream, targets, dist
        self.ckpt_dir, self.total_steps, self.saved_step = ckpt_dir, total_steps, saved_step

    def trainer_state(self, progress: Progress) -> dict:
        """Collective: every rank's data position is gathered."""
        data_per_rank = all_gather_object(self.stream.state_dict())
        engine = self.engine
        return {"step": progress.step, "data": data_per_rank[0], "data_per_rank": data_per_rank,
                "normalizers": asdict(self.targets.normalizers), "energy_references": self.targets.references,
                "energy_target": self.targets.energy_target,
                "world_size": self.dist.world_size, "zero_stage": engine.zero_optimization_stage(),
                "bf16": bool(engine.bfloat16_enabled()), "nonfinite_steps": progress.nonfinite,
                "best": progress.best, "total_steps": self.total_steps, "config": to_dict(self.cfg)}

    def save(self, progress: Progress) -> None:
        if self.saved_step == progress.step:
            return
        best = progress.best
        ckpt.save(self.engine, self.ckpt_dir, progress.step, self.trainer_state(progress),
                  self.ema.checkpoint_state(self.dist.rank) if self.ema else None,
                  self.cfg.checkpoint, best["tag"] if best else None, self.dist.rank)
        self.saved_step = progress.step


class Evaluator:
    """Validates every split of `cfg.data` (`evaluate`), logs the metrics and, with
    checkpoint.save_best, saves and marks the checkpoint of a new best primary metric on split "val"."""

    def __init__(self, cfg: RunConfig, engine, ema: EMA | None, prepare: Callable[[AtomsBatch], AtomsBatch] | None,
                 targets: Targets, dist: DistInfo, logger, checkpointer: Checkpointer) -> None:
        self.cfg, self.engine, self.ema, self.prepare, self.dist = cfg, engine, ema, prepare, dist
        self.normalizers, self.references = targets.normalizers, targets.reference_tensor(dist.device)
        self.logger, self.checkpointer = logger, checkpointer  # logger: eqv2.training.monitor.StepLogger

    def __call__(self, progress: Progress) -> None:
        cfg = self.cfg
        if not cfg.data.val_splits():
            return
        for name, split_cfg in cfg.data.val_splits():
            split_metrics = evaluate(self.engine, cfg, split_cfg, self.ema, self.normalizers, self.dist,
                                     self.prepare, self.references)
            self.logger.log_eval(progress.step, name, split_metrics)
            if name == "val":  # the primary split picks the best checkpoint
                metrics = split_metrics
        value = metrics[cfg.eval.primary_metric]
        if cfg.checkpoint.save_best and (progress.best is None or value < progress.best["value"]):
            progress.best = {"tag": ckpt.tag_for(progress.step), "metric": cfg.eval.primary_metric, "value": value}
            self.checkpointer.save(progress)
            if self.dist.is_main:
                ckpt.mark_best(self.checkpointer.ckpt_dir, progress.best["tag"], progress.best["metric"], value)


@torch.no_grad()
def evaluate(engine, cfg: RunConfig, split_cfg, ema: EMA | None, normalizers: Normalizers, dist: DistInfo,
             prepare: Callable[[AtomsBatch], AtomsBatch] | None, references: torch.Tensor | None = None) -> dict:
    """Metrics of one validation split (`split_cfg`: its data config; EMA weights by default), exact
    over ranks, in the units of the data (energy references added back)."""
    from eqv2.data import val_batches

    metrics = S2EFMetrics(dist.device, cfg.loss.train_on_free_atoms, normalizers.energy_mean, references)
    engine.eval()
    with ema.swapped_in() if (ema is not None and cfg.eval.use_ema) else contextlib.nullcontext():
        for i, batch in enumerate(val_batches(split_cfg, dist.rank, dist.world_size, prepare)):
            if cfg.eval.max_batches and i >= cfg.eval.max_batches:
                break
            batch = batch.to(dist.device, non_blocking=True)
            torch.compiler.cudagraph_mark_step_begin()
            metrics.update(physical(engine(batch), batch, normalizers, references), batch)
    engine.train()
    return metrics.compute()
