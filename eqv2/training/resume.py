"""Resuming a run: the engine, EMA and data position restored from a checkpoint (eqv2/train.py)."""

from __future__ import annotations

from eqv2.training import checkpointing as ckpt
from eqv2.training.dist import DistInfo
from eqv2.training.ema import EMA


def restore(resume: ckpt.ResumePoint, engine, ema: EMA | None, stream,
            dist: DistInfo) -> tuple[int, int, int, dict | None]:
    """Loads `resume` into the engine, the EMA and this rank's data stream (eqv2.data.TrainStream);
    returns (step, epoch, non-finite steps so far, best checkpoint record)."""
    ckpt.load_engine(engine, resume)
    st = resume.state
    step, epoch, nonfinite, best = st["step"], st["data"]["epoch"], st["nonfinite_steps"], st["best"]
    if ema is not None:
        shards = ckpt.load_ema_shards(resume.tag_dir) if ema.partitioned else None
        if shards is not None:  # ZeRO-3 to ZeRO-3: no rank loads the whole average
            ema.load_partitions(shards)
        elif (ema_state := ckpt.load_ema(resume.tag_dir)) is not None:
            ema.load_full_state_dict(ema_state)
    if st["world_size"] == dist.world_size:
        # each rank continues its own part of the epoch exactly where the checkpoint was taken
        stream.load_state_dict(st["data_per_rank"][dist.rank])
    else:  # the per-rank sample order depends on the rank count: start the next epoch cleanly
        epoch += 1
        if dist.is_main:
            print(f"eqv2.train: world size changed {st['world_size']} -> {dist.world_size}; the rest of "
                  f"data epoch {epoch - 1} is skipped, training continues with epoch {epoch}", flush=True)
    if dist.is_main:
        print(f"eqv2.train: resumed from {resume.tag_dir} (step {step}, epoch {epoch}"
              f"{', universal' if resume.universal else ''})", flush=True)
    return step, epoch, nonfinite, best
