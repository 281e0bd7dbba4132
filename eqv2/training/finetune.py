"""Starting a run from a pretrained model (`init:` in the run config): fine-tuning.

    init:
      from_checkpoint: model_153M.pt    # an exported or converted model file, a run's checkpoints/
                                        # directory or one step_* directory of it
      weights: ema                      # run checkpoints: the EMA (default) or the live weights
      freeze_embeddings: false          # the atom embedding and the edge-degree embedding stay fixed
      freeze_blocks: 0                  # the first N Transformer blocks stay fixed
      backbone_lr_factor: 1.0           # everything but the energy and force heads learns at lr × factor
      reinit_heads: false               # the heads start from a fresh initialisation (the run's seed)
      energy_references: keep           # a model with per-element energy references: keep or refit them

Only the weights and the target normalisers come from the checkpoint: the optimizer, schedule, EMA and
data stream start afresh (`--resume` continues a run instead).  The architecture is the checkpoint's: a
run config may leave `model:` out, and a model key it sets must agree with the checkpoint (dropout
rates and execution choices may differ).  The normalisers are the checkpoint's unless the run config
sets `normalizers:`, so that before the first step the model predicts what the pretrained model does.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from eqv2.checkpoint import read_model_file
from eqv2.config import ConfigError
from eqv2.execution import EXECUTION_KEYS, paper_config
from eqv2.normalizers import renamed_legacy
from eqv2.training import checkpointing as ckpt

# may differ from the pretrained model's: they regularise training, the weights do not depend on them
TRAINING_KEYS = frozenset({"alpha_drop", "drop_path_rate", "proj_drop"})
HEADS = ("energy_head", "force_head")


@dataclass
class InitConfig:
    from_checkpoint: str | None = None  # null: a fresh initialisation from the seed
    weights: Literal["ema", "live"] = "ema"  # which weights of a run checkpoint
    freeze_embeddings: bool = False
    freeze_blocks: int = 0
    backbone_lr_factor: float = 1.0
    reinit_heads: bool = False
    # a pretrained model with energy references: keep them, or fit them on this run's data (targets.py)
    energy_references: Literal["keep", "refit"] = "keep"

    def __post_init__(self) -> None:
        if self.freeze_blocks < 0:
            raise ValueError(f"init.freeze_blocks must be >= 0, got {self.freeze_blocks}")
        if self.backbone_lr_factor < 0:
            raise ValueError(f"init.backbone_lr_factor must be >= 0, got {self.backbone_lr_factor}")
        if self.from_checkpoint is None and (self.freeze_embeddings or self.freeze_blocks or self.reinit_heads
                                             or self.backbone_lr_factor != 1.0 or self.energy_references != "keep"):
            raise ValueError("init.freeze_*, init.backbone_lr_factor, init.reinit_heads and init.energy_references "
                             "need init.from_checkpoint")


@dataclass
class Pretrained:
    model_config: dict  # ModelConfig fields
    state_dict: dict[str, torch.Tensor]
    normalizers: dict  # eqv2.normalizers.Normalizers fields
    source: str
    energy_references: list[float] | None = None  # eV by atomic number (data.energy_target fitted_references)


def read_pretrained(path: str, weights: str) -> Pretrained:
    """The weights, architecture and normalisers of a model file or a run checkpoint (CPU); the architecture
    without the execution keys of files written before the execution plan (eqv2/execution.py)."""
    p = Path(path)
    if p.is_dir():
        tag_dir, _ = ckpt.find_resume(str(p), p)
        state, sd = ckpt.run_weights(tag_dir, weights)
        n = renamed_legacy(state["normalizers"])  # run checkpoints before eqv2.normalizers: force_rms
        return Pretrained(paper_config(state["config"]["model"]), sd, n, f"{tag_dir} ({weights} weights)",
                          state.get("energy_references"))
    model_config, sd, norms, _, references = read_model_file(p)
    return Pretrained(paper_config(model_config), sd, asdict(norms), str(p), references)


def model_config_of(path: str) -> dict:
    """The architecture of the pretrained model at `path`, read without its weights where possible."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"init.from_checkpoint: not found: {p}")
    try:
        if p.is_dir():
            tag_dir, _ = ckpt.find_resume(str(p), p)
            return ckpt.read_state(tag_dir)["config"]["model"]
        return read_model_file(p)[0]
    except (ValueError, FileNotFoundError, ckpt.CheckpointError) as err:
        raise ConfigError(f"init.from_checkpoint: {err}") from err


def merge_model_config(given: dict | None, pretrained: dict, path: str) -> dict:
    """The run's model config: the checkpoint's, with the keys the run config may change; a key that
    contradicts the checkpoint is an error naming it."""
    given = given or {}
    if not isinstance(given, dict):
        raise ConfigError(f"model: expected a mapping, got {type(given).__name__}")
    pretrained = paper_config(pretrained)  # kernel keys of a checkpoint from before the execution plan: dropped
    # direct -> gradient fine-tuning: the energy backbone and head carry over, the direct force head is dropped
    to_gradient = given.get("forces") == "gradient" and pretrained.get("forces", "direct") == "direct"
    differ = [f"model.{k}={v!r} (the checkpoint has {pretrained.get(k)!r})" for k, v in given.items()
              if k in pretrained and k not in EXECUTION_KEYS | TRAINING_KEYS and v != pretrained[k]
              and not (k == "forces" and to_gradient)]
    if differ:
        raise ConfigError(f"init.from_checkpoint {path}: the run config contradicts the pretrained model: "
                          f"{'; '.join(differ)}; leave these keys out (the architecture is the checkpoint's)")
    return {**pretrained, **given}


def load_pretrained(model: nn.Module, pretrained: Pretrained, cfg: InitConfig, gathered) -> list[str]:
    """Copy the pretrained weights into `model` (heads kept at their fresh values with reinit_heads).

    gathered(params): a context in which ZeRO-3-partitioned `params` are whole and rank 0's values are
    written back to every rank's partition (a no-op context for other stages); one parameter at a time,
    so no rank ever holds more than one whole tensor beside its partitions.  Returns the names kept fresh."""
    sd = pretrained.state_dict
    expected = set(model.state_dict())  # parameters and persistent buffers
    model_has_force_head = any(n.startswith("force_head.") for n in expected)
    dropped = [] if model_has_force_head else [n for n in sd if n.startswith("force_head.")]
    if dropped:  # a direct-force checkpoint into a forces: gradient model: forces come from the energy
        sd = {n: t for n, t in sd.items() if n not in dropped}
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"eqv2.train: init_from {pretrained.source}: dropped the direct force head ({len(dropped)} "
                  "tensors): model.forces: gradient takes forces from the energy", flush=True)
    fresh = [n for n in sd if cfg.reinit_heads and n.split(".")[0] in HEADS]
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"init.from_checkpoint {pretrained.source}: weights do not match the model "
                          f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in fresh:
                continue
            with gathered([param]):
                if tuple(param.shape) != tuple(sd[name].shape):
                    raise ConfigError(f"init.from_checkpoint {pretrained.source}: {name} has shape "
                                      f"{tuple(sd[name].shape)}, the model {tuple(param.shape)}")
                param.copy_(sd[name].to(param.dtype))
        for name, buffer in model.named_buffers():
            if name in sd:
                buffer.copy_(sd[name].to(buffer.device, buffer.dtype))
    return fresh


def freeze(model: nn.Module, cfg: InitConfig) -> int:
    """requires_grad off for the frozen parts (before the optimizer and the EMA are built); returns the
    number of frozen parameter elements."""
    parts = list(model.blocks[: cfg.freeze_blocks])
    if cfg.freeze_blocks > len(model.blocks):
        raise ConfigError(f"init.freeze_blocks={cfg.freeze_blocks}, but the model has {len(model.blocks)} blocks")
    if cfg.freeze_embeddings:
        parts += [model.atom_embedding, model.edge_degree_embedding]
    frozen = 0
    for part in parts:
        for param in part.parameters():
            param.requires_grad_(False)
            frozen += getattr(param, "ds_numel", param.numel())
    return frozen


def scale_backbone_lr(groups: list[dict], model: nn.Module, factor: float) -> list[dict]:
    """Split each optimizer group into its head and backbone parameters; the backbone's groups carry
    lr_scale=factor (the trainer sets lr × lr_scale every step)."""
    if factor == 1.0:
        return groups
    heads = {id(p) for name in HEADS if getattr(model, name, None) is not None
             for p in getattr(model, name).parameters()}
    out = []
    for group in groups:
        for part, scale in (("head", 1.0), ("backbone", factor)):
            params = [p for p in group["params"] if (id(p) in heads) == (part == "head")]
            if params:
                out.append({**group, "params": params, "name": f"{group['name']}_{part}", "lr_scale": scale})
    return out
