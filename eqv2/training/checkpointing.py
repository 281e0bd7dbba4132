"""Crash-safe DeepSpeed checkpoints with trainer state, `--resume auto`, and resume on other rank counts.

Layout under ``<run_dir>/checkpoints``::

    latest                 one line: the tag of the newest *complete* checkpoint (atomically replaced)
    step_00001000/         DeepSpeed files (model, ZeRO shards) + ema.pt (ZeRO-3: ema_shard_<rank>.pt)
                           + trainer_state.json + COMPLETE
    step_00001000_universal/  written on demand when resuming on a different number of ranks

Why it is safe: a checkpoint is written into its own tag directory; only after every rank has finished
writing does rank 0 write the COMPLETE marker and then swap `latest` by rename, which is atomic on POSIX
file systems.  A save killed half-way therefore leaves `latest` pointing at the previous complete
checkpoint, and pruning of old checkpoints happens only after the swap.

Resume on another world size: ZeRO-1/2/3 and the bf16 optimizer store optimizer state partitioned per
rank.  When the saved world size differs, rank 0 converts the checkpoint once into DeepSpeed's universal
format (deepspeed.checkpoint.ds_to_universal) and the engine loads it with ``checkpoint.load_universal``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from eqv2.training.dist import barrier
from eqv2.training.ema import assemble_partitions

TAG_RE = re.compile(r"^step_(\d{8,})$")
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.pt"
EMA_SHARD = "ema_shard_{:05d}.pt"  # under ZeRO-3: each rank's partitions of the average
# ds_to_universal refuses checkpoints without this client-state entry; our models have no tensor or
# pipeline parallelism, so no parameter-merge patterns are needed.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # periodic save interval in optimizer steps (also saved at the end)
    keep_last: int = 2  # complete periodic checkpoints kept besides the best one
    save_best: bool = True  # keep the checkpoint with the best validation metric from pruning
    # false: no checkpoint when the last step is done (benchmarks: tools/scaling.py; a ZeRO-3 save of an
    # 8B model takes minutes); periodic, best and stop-signal saves are unaffected
    save_at_end: bool = True

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.keep_last < 1:
            raise ValueError("checkpoint.every_steps and checkpoint.keep_last must be >= 1")


@dataclass
class ResumePoint:
    tag_dir: Path  # the complete checkpoint chosen
    state: dict  # its trainer_state.json
    load_tag: str  # tag DeepSpeed loads (the universal copy when the rank count changed)
    universal: bool


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    _atomic(path, lambda fh: fh.write(text.encode()))


def _atomic_save(obj, path: Path) -> None:
    _atomic(path, lambda fh: torch.save(obj, fh))


def _atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write` into a temporary file, on disk before it replaces `path` (rename: all or nothing)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a COMPLETE marker, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names if it is complete, else the newest complete tag found by scanning."""
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (ckpt_dir / tag / COMPLETE).is_file():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def find_resume(resume: str | None, run_dir: Path) -> Path | None:
    """Resolve ``--resume``: None → fresh start, "auto" → latest in the run dir (fresh if none), or a path
    to a checkpoints directory or to one tag directory (must be complete)."""
    if resume is None:
        return None
    if resume == "auto":
        ckpt_dir = run_dir / "checkpoints"
        tag = latest_tag(ckpt_dir)
        return ckpt_dir / tag if tag else None
    path = Path(resume)
    if (path / COMPLETE).is_file():
        return path
    tag = latest_tag(path)
    if tag is None:
        raise FileNotFoundError(f"--resume {resume}: no complete checkpoint there (expected a tag "
                                f"directory with a {COMPLETE} marker or a directory holding such tags)")
    return path / tag


def prepare_resume(tag_dir: Path, world_size: int, rank: int) -> ResumePoint:
    """Read the trainer state and, if the rank count changed, make the universal copy (rank 0)."""
    state = json.loads((tag_dir / STATE_FILE).read_text())
    partitioned = state["zero_stage"] > 0 or state["bf16"]
    universal = partitioned and state["world_size"] != world_size
    load_tag = tag_dir.name
    if universal:
        load_tag = f"{tag_dir.name}_universal"
        out = tag_dir.parent / load_tag
        if rank == 0 and not (out / COMPLETE).is_file():
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                   "--input_folder", str(tag_dir), "--output_folder", str(out), "--num_extract_workers", "1",
                   "--num_merge_workers", "1"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"converting {tag_dir} to a universal checkpoint failed:\n{proc.stderr[-3000:]}")
            _atomic_write(out / COMPLETE, "universal\n")
        barrier()
    return ResumePoint(tag_dir, state, load_tag, universal)


def save(engine, ckpt_dir: Path, step: int, trainer_state: dict, ema_state: dict | None,
         cfg: CheckpointConfig, best_tag: str | None, rank: int) -> str:
    """Collective: every rank calls it.  Returns the tag written (or already present)."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if latest_tag(ckpt_dir) == tag:  # already saved at this step (e.g. periodic save == final save)
        return tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tag_dir, ignore_errors=True)  # leftovers of a save killed half-way
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={**UNIVERSAL_INFO, "trainer": trainer_state},
                           save_latest=False)
    sharded = ema_state is not None and "partition" in ema_state  # ZeRO-3: every rank writes its part
    if sharded:
        _atomic_save(ema_state, tag_dir / EMA_SHARD.format(rank))
    barrier()  # every rank's shards are on disk before the checkpoint is declared complete
    if rank == 0:
        if ema_state is not None and not sharded:
            _atomic_save(ema_state, tag_dir / EMA_FILE)
        _atomic_write(tag_dir / STATE_FILE, json.dumps(trainer_state, indent=1))
        _atomic_write(tag_dir / COMPLETE, f"{tag}\n")
        _atomic_write(ckpt_dir / "latest", f"{tag}\n")
        _prune(ckpt_dir, cfg.keep_last, keep={tag, best_tag})
    barrier()
    return tag


def _prune(ckpt_dir: Path, keep_last: int, keep: set) -> None:
    tags = complete_tags(ckpt_dir)
    for tag in tags[:-keep_last]:
        if tag not in keep:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
            shutil.rmtree(ckpt_dir / f"{tag}_universal", ignore_errors=True)
    # incomplete directories older than the newest complete one are dead saves: remove them too
    newest = int(TAG_RE.match(tags[-1]).group(1)) if tags else -1
    for p in ckpt_dir.iterdir():
        m = TAG_RE.match(p.name)
        if m and not (p / COMPLETE).is_file() and int(m.group(1)) < newest:
            shutil.rmtree(p, ignore_errors=True)


def mark_best(ckpt_dir: Path, tag: str, metric: str, value: float) -> None:
    _atomic_write(ckpt_dir / "best.json", json.dumps({"tag": tag, "metric": metric, "value": value}))


def load_ema_shards(tag_dir: Path) -> list[dict] | None:
    """The ZeRO-3 EMA shards of a checkpoint, indexed by rank and memory-mapped (nothing is read
    until used); None when the checkpoint has a full ema.pt or no EMA."""
    first = tag_dir / EMA_SHARD.format(0)
    if not first.is_file():
        return None
    shards = [torch.load(first, map_location="cpu", weights_only=True, mmap=True)]
    for r in range(1, shards[0]["world_size"]):
        path = tag_dir / EMA_SHARD.format(r)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the checkpoint's EMA was written by "
                                    f"{shards[0]['world_size']} ranks")
        shards.append(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return shards


def load_ema(tag_dir: Path) -> dict | None:
    """The full EMA state dict ({decay, updates, shadow: {name: tensor}}), from ema.pt or reassembled
    from the ZeRO-3 shards; None when the run kept no EMA."""
    path = tag_dir / EMA_FILE
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    shards = load_ema_shards(tag_dir)
    return assemble_partitions(shards) if shards is not None else None
