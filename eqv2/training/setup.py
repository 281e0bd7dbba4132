"""The trainer's start-up before the model exists: what it fits (normalisers, energy references, graph
statistics) and the data it trains on (eqv2/train.py calls `prepare_targets`, then `build_data`)."""

from __future__ import annotations

from dataclasses import dataclass

from eqv2.config import ConfigError
from eqv2.model.graph import GraphBuilder
from eqv2.training import checkpointing as ckpt
from eqv2.training.config import RunConfig
from eqv2.training.dist import DistInfo
from eqv2.training.finetune import Pretrained, read_pretrained
from eqv2.training.targets import Targets, resolve_targets


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


@dataclass
class RunData:
    """This rank's training stream and the run's length in optimizer steps."""
    stream: object  # eqv2.data.TrainStream
    graphs: GraphBuilder | None  # radius graphs built in the loader workers (data.build_graphs), else None
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def build_data(cfg: RunConfig, dist: DistInfo, gas: int) -> RunData:
    """Opens this rank's training stream and plans every validation split (a bad split fails here,
    before training); `gas`: DeepSpeed's gradient_accumulation_steps."""
    from eqv2.data import TrainStream, num_val_batches

    # radius graphs built on the CPU in the loader workers, with the model's cutoff (data.build_graphs)
    graphs = GraphBuilder.for_model(cfg.model) if cfg.data.build_graphs else None
    stream = TrainStream(cfg.data, dist.rank, dist.world_size, graphs)
    steps_per_epoch = stream.steps_in_epoch(0) // gas
    if steps_per_epoch < 1:
        raise ConfigError(f"data: an epoch has {stream.steps_in_epoch(0)} batches per rank, fewer than "
                          f"gradient_accumulation_steps={gas}")
    for _, split_cfg in cfg.data.val_splits():
        num_val_batches(split_cfg, dist.world_size)
    total_steps, warmup_steps = cfg.optim.resolve_steps(steps_per_epoch)
    return RunData(stream, graphs, steps_per_epoch, total_steps, warmup_steps)
