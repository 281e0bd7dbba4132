"""eqv2 data: sharded WebDataset OC20 streams.  API (details in docs/data.md and eqv2.data.stream):

    TrainStream(cfg: DataConfig, rank, world_size)  .steps_in_epoch(e)  .epoch_batches(e)
                                                    .state_dict()  .load_state_dict(s)  .skipped
    val_batches(cfg, rank, world_size) -> Iterator[AtomsBatch];  num_val_batches(cfg, world_size)
    load_stats(path) -> DatasetStats (energy_mean, energy_std, forces_std, avg_num_nodes, avg_degree)
"""
from eqv2.data.config import DataConfig
from eqv2.data.format import SampleError
from eqv2.data.plan import PlanError
from eqv2.data.reader import ShardError
from eqv2.data.stats import DatasetStats, load_stats
from eqv2.data.stream import TrainStream, num_val_batches, val_batches

__all__ = ["DataConfig", "DatasetStats", "PlanError", "SampleError", "ShardError", "TrainStream",
           "load_stats", "num_val_batches", "val_batches"]
