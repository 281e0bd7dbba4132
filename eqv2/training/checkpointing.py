"""Crash-safe DeepSpeed checkpoints with trainer state, `--resume auto`, and resume on other rank counts.

Layout under ``<run_dir>/checkpoints``::

    latest                 one line: the tag of the newest *complete* checkpoint (atomically replaced)
    step_00001000/         DeepSpeed files (model, ZeRO shards) + ema.pt (ZeRO-3: ema_shard_<rank>.pt)
                           + trainer_state.json + COMPLETE (JSON: every file of the tag and its size)
    step_00001000_universal/  written on demand when resuming on a different number of ranks

Why it is safe: a checkpoint is written into its own tag directory; only after every rank has finished
writing does rank 0 write the COMPLETE marker and then swap `latest` by rename, which is atomic on POSIX
file systems.  A save killed half-way therefore leaves `latest` pointing at the previous complete
checkpoint, and pruning of old checkpoints happens only after the swap.  COMPLETE lists every file of
the checkpoint with its size, so a file truncated or replaced after the save (a full disk during a copy,
a partial rsync) is found before loading: `--resume auto` then names the file and falls back to the
previous complete checkpoint.

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

from eqv2.execution import EXECUTION_KEYS
from eqv2.training.dist import all_gather_object, barrier
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
    # false: no checkpoint when the last step is done (benchmarks: bench/scaling.py; a ZeRO-3 save of an
    # 8B model takes minutes); periodic, best and stop-signal saves are unaffected
    save_at_end: bool = True

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.keep_last < 1:
            raise ValueError("checkpoint.every_steps and checkpoint.keep_last must be >= 1")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (damaged, unreadable, of another run); the message names it."""


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


def _candidates(ckpt_dir: Path) -> list[str]:
    """Complete tags, the one `latest` names first, then the others newest first."""
    tags = complete_tags(ckpt_dir)[::-1]
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        named = pointer.read_text().strip()
        if named in tags:
            tags.remove(named)
            tags.insert(0, named)
    return tags


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names if it is complete, else the newest complete tag found by scanning."""
    tags = _candidates(ckpt_dir)
    return tags[0] if tags else None


def _file_sizes(tag_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != COMPLETE and not p.name.startswith(".")}


def damage(tag_dir: Path) -> str | None:
    """What is wrong with a complete checkpoint's files against the sizes its COMPLETE marker recorded
    (None: intact, or a marker from before sizes were recorded)."""
    try:
        recorded = json.loads((tag_dir / COMPLETE).read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return None
    for name, size in recorded.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, the save wrote {size} (truncated or replaced)"
    return None


def find_resume(resume: str | None, run_dir: Path) -> tuple[Path | None, list[str]]:
    """Resolve ``--resume``: None → fresh start, "auto" → latest in the run dir (fresh if none), or a path
    to a checkpoints directory or to one tag directory (must be complete and intact).

    Returns (tag directory or None, warnings): where the newest complete checkpoint of a directory is
    damaged, the next older intact one is taken and a warning names the damaged file."""
    if resume is None:
        return None, []
    path = run_dir / "checkpoints" if resume == "auto" else Path(resume)
    if resume != "auto" and (path / COMPLETE).is_file():  # one tag, asked for by name: no fallback
        if problem := damage(path):
            raise CheckpointError(f"--resume {resume}: checkpoint damaged: {problem}")
        return path, []
    warnings = []
    for tag in _candidates(path):
        if (problem := damage(path / tag)) is None:
            return path / tag, warnings
        warnings.append(f"checkpoint {path / tag} is damaged ({problem}); falling back to an older one")
    if warnings:
        raise CheckpointError(f"--resume {resume}: every complete checkpoint under {path} is damaged: "
                              + "; ".join(warnings))
    if resume == "auto":
        return None, []
    raise FileNotFoundError(f"--resume {resume}: no complete checkpoint there (expected a tag "
                            f"directory with a {COMPLETE} marker or a directory holding such tags)")


def prepare_resume(tag_dir: Path, state: dict, world_size: int, rank: int) -> ResumePoint:
    """If the rank count changed since `state` (the checkpoint's trainer state) was saved, make the
    universal copy (rank 0)."""
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


def load_engine(engine, resume: ResumePoint) -> None:
    """Collective: load the engine's model and optimizer state; a rank that fails makes every rank fail
    with the same message naming the checkpoint, instead of the others waiting in a collective."""
    error = None
    try:
        load_path, _ = engine.load_checkpoint(str(resume.tag_dir.parent), tag=resume.load_tag,
                                              load_module_strict=True, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            error = f"DeepSpeed found no checkpoint under {resume.tag_dir.parent / resume.load_tag}"
    except Exception as err:  # noqa: BLE001  (torch's and DeepSpeed's readers raise many kinds)
        error = " ".join(f"{type(err).__name__}: {err}".split())[:300]
    errors = [e for e in all_gather_object(error) if e]
    if errors:
        older = [t for t in complete_tags(resume.tag_dir.parent) if t < resume.tag_dir.name]
        hint = f"--resume {resume.tag_dir.parent / older[-1]}" if older else "a new run_dir"
        raise CheckpointError(f"checkpoint {resume.tag_dir} cannot be loaded ({errors[0]}); move it aside or "
                              f"continue from an earlier one with {hint}")


def check_same_model(state: dict, model: dict, tag_dir: Path) -> None:
    """A resume continues the checkpoint's model: every architecture key must match (kernel and padding
    choices may change); the differing keys are named."""
    saved = state["config"]["model"]
    differ = [f"model.{k}: checkpoint {saved.get(k)!r}, this config {v!r}" for k, v in model.items()
              if k not in EXECUTION_KEYS and saved.get(k, v) != v]
    if differ:
        raise CheckpointError(f"cannot resume from {tag_dir}: it holds another model ({'; '.join(differ)}); "
                              "use that run's config, or start a new run in another run_dir")


METRICS_FILE = "metrics.jsonl"


def refuse_existing_run(run_dir: Path) -> None:
    """A fresh start (no --resume) into a directory that holds a run would mix two runs' checkpoints,
    best.json and metrics: refused, naming what is there."""
    ckpt_dir = run_dir / "checkpoints"
    found = []
    if ckpt_dir.is_dir() and any(TAG_RE.match(p.name) for p in ckpt_dir.iterdir()):
        found.append(f"checkpoints in {ckpt_dir}")
    if (run_dir / METRICS_FILE).is_file() and (run_dir / METRICS_FILE).stat().st_size:
        found.append(f"{run_dir / METRICS_FILE}")
    if found:
        raise CheckpointError(f"run_dir {run_dir} already holds a run ({', '.join(found)}): continue it with "
                              "--resume auto, or give the new run another run_dir")


def set_aside_unsaved_attempt(run_dir: Path) -> None:
    """`--resume auto` found no checkpoint but an earlier attempt's metrics (it ended before its first
    save): keep them under another name, so that the fresh start's records are its own."""
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size:
        n = 1
        while (kept := run_dir / f"metrics.attempt{n}.jsonl").exists():
            n += 1
        os.replace(metrics, kept)
        print(f"eqv2.train: no checkpoint to resume from; the earlier attempt's records are kept as {kept}",
              file=sys.stderr, flush=True)


def read_state(tag_dir: Path) -> dict:
    try:
        return json.loads((tag_dir / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{tag_dir / STATE_FILE}: unreadable trainer state ({err})") from err


def save(engine, ckpt_dir: Path, step: int, trainer_state: dict, ema_state: dict | None,
         cfg: CheckpointConfig, best_tag: str | None, rank: int) -> str:
    """Collective: every rank calls it.  Writes the checkpoint of `step` (replacing any earlier one of
    that step) and returns its tag."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
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
        _atomic_write(tag_dir / COMPLETE, json.dumps({"tag": tag, "files": _file_sizes(tag_dir)}, indent=1))
        _atomic_write(ckpt_dir / "latest", f"{tag}\n")
        _prune(ckpt_dir, cfg.keep_last, keep={tag, best_tag})
    barrier()
    return tag


def check_writable(ckpt_dir: Path) -> None:
    """Before step 1: the checkpoint directory can be created and written (rank 0; a file is written,
    synced and removed), so that a typo or a read-only mount is not found at the first save."""
    probe = ckpt_dir / f".write_probe{os.getpid()}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(probe, "probe\n")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"checkpoint directory {ckpt_dir} is not writable: {err.strerror or err}") from err


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


def run_weights(tag_dir: Path, weights: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(trainer state, model state dict) of a run checkpoint, on the CPU whatever the world size.

    weights "ema": the averaged weights the trainer evaluates (over the live buffers and any frozen
    parameters); "live": the fp32 master copy (ZeRO 1-3: gathered from the optimizer shards with
    DeepSpeed's zero_to_fp32; ZeRO-0: the module state)."""
    state = read_state(tag_dir)
    if state["zero_stage"] == 0:
        sd = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if weights == "ema":
        ema = load_ema(tag_dir)
        if ema is None:
            raise CheckpointError(f"{tag_dir} has no EMA (optim.ema_decay was null); use the live weights")
        sd = {**sd, **ema["shadow"]}
    elif weights != "live":
        raise ValueError(f"weights must be 'ema' or 'live', got {weights!r}")
    return state, sd
