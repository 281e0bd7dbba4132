"""Exponential moving average of the weights, used for evaluation and export (reference decay 0.999).

As fairchem's trainer (its ExponentialMovingAverage built without `use_num_updates`), the decay is
constant from the first update; `optim.ema_warmup: true` ramps it as min(d, (1+n)/(10+n)) instead
(torch_ema's num_updates rule), so that early averages are not dominated by the initial weights.
The average is kept in fp32 (fp64 for fp64 parameters) on the parameters' device, one tensor per *local* parameter storage: the
full parameter under ZeRO 0-2, the rank's flat partition (`ds_tensor`) under ZeRO-3, so ZeRO-3 never has
to gather the model to update it.  `swapped_in` exchanges the live weights with the averages for
evaluation; under ZeRO-3 swapping the partitions is enough because the forward pass gathers from them.
For checkpoints, ZeRO 0-2 write the full average from rank 0 (`ema.pt`); under ZeRO-3 every rank writes
its own partitions (`ema_shard_<rank>.pt`), so no rank ever holds the whole average (a 10B model's is
40 GB, once per rank on the host before this).  The shards are reassembled per tensor when loaded on
another rank count or exported.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from eqv2.training.dist import barrier


def _storage(param: nn.Parameter) -> torch.Tensor:
    """The tensor this rank owns for `param`: the ZeRO-3 partition, else the parameter itself."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        self.decay = decay
        self.warmup = warmup  # ramp the decay with the number of updates (not the reference's default)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [_storage(p).detach().to(_shadow_dtype(p)).clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step after an optimizer step: shadow ← d·shadow + (1−d)·weight (fused, no host sync).

        d is the configured decay (as fairchem's trainer), or min(d, (1+n)/(10+n)) at update n with
        `warmup`."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        live = [_storage(p).to(s.dtype) for p, s in zip(self.params, self.shadow)]
        torch._foreach_lerp_(self.shadow, live, 1.0 - decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily load the averaged weights into the model (e.g. for evaluation).

        ZeRO-3 keeps parameters below its persistence threshold gathered between forwards; their
        full tensor is swapped too (gathered from the EMA partitions), else the forward would use the
        live weights for them (once gathered: before the first forward they are still partitioned only,
        and the forward will gather them from the swapped partitions).
        """
        persistent = [i for i, p in enumerate(self.params)
                      if getattr(p, "ds_persist", False) and p.data.numel() == p.ds_numel]
        saved = [_storage(p).detach().clone() for p in self.params]
        saved_full = {i: self.params[i].data.detach().clone() for i in persistent}
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                _storage(p).copy_(s)
            for i in persistent:
                self.params[i].data.copy_(self._gather(self.params[i], self.shadow[i]))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    _storage(p).copy_(s)
                for i, full in saved_full.items():
                    self.params[i].data.copy_(full)

    @staticmethod
    def _gather(param: nn.Parameter, part: torch.Tensor) -> torch.Tensor:
        """Full tensor of a ZeRO-3 parameter from every rank's flat partition (collective)."""
        parts = [torch.empty_like(part) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, part.contiguous())
        return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)

    # --- checkpointing -------------------------------------------------------------------------
    @property
    def partitioned(self) -> bool:
        """True under ZeRO-3 (the parameters are DeepSpeed-partitioned)."""
        return any(hasattr(p, "ds_tensor") for p in self.params)

    def checkpoint_state(self, rank: int) -> dict | None:
        """What `rank` writes to a checkpoint: under ZeRO-3 its own partitions (every rank), otherwise
        the full tensors (rank 0; None on the other ranks).  Not a collective call."""
        if not self.partitioned:
            return self.full_state_dict() if rank == 0 else None
        shadow, numel, shape, split = {}, {}, {}, {}
        for name, p, s in zip(self.names, self.params, self.shadow):
            split[name] = hasattr(p, "ds_tensor")
            shadow[name] = s.detach().cpu().clone()
            numel[name] = int(p.ds_numel) if split[name] else s.numel()
            shape[name] = list(p.ds_shape if split[name] else s.shape)
        return {"decay": self.decay, "updates": self.updates, "partition": rank,
                "world_size": torch.distributed.get_world_size(), "shadow": shadow, "numel": numel,
                "shape": shape, "split": split}

    def load_partitions(self, shards: list[dict]) -> None:
        """Load the partitions that `checkpoint_state` wrote on every rank (list indexed by rank, e.g.
        memory-mapped).  On the same rank count each rank copies its own; otherwise each tensor is
        reassembled from all shards and this rank's part cut from it."""
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        same = len(shards) == world
        for i, (name, p) in enumerate(zip(self.names, self.params)):
            if name not in shards[0]["shadow"]:
                raise KeyError(f"EMA shards lack parameter {name} (model changed since the checkpoint?)")
            if hasattr(p, "ds_tensor") and same and shards[0]["split"][name]:
                part = shards[rank]["shadow"][name]
            else:
                full = _assemble(shards, name)
                if tuple(full.shape) != tuple(p.ds_shape if hasattr(p, "ds_tensor") else p.shape):
                    raise ValueError(f"EMA tensor {name}: checkpoint shape {tuple(full.shape)} does not match the model")
                part = _own_partition(p, full) if hasattr(p, "ds_tensor") else full
            self.shadow[i].copy_(part.to(self.shadow[i].device, self.shadow[i].dtype).view_as(self.shadow[i]))
        self.updates = int(shards[0]["updates"])
        barrier()

    # --- full tensors, independent of the number of ranks ---------------------------------------
    def full_state_dict(self) -> dict:
        """{name: full fp32 tensor} on CPU; under ZeRO-3 gathers the partitions (collective call)."""
        tensors = {}
        for name, p, s in zip(self.names, self.params, self.shadow):
            if hasattr(p, "ds_tensor"):
                s = self._gather(p, s)
            tensors[name] = s.detach().cpu().clone()
        return {"decay": self.decay, "updates": self.updates, "shadow": tensors}

    def load_full_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        missing = [n for n in self.names if n not in shadow]
        if missing:
            raise KeyError(f"EMA state lacks parameters {missing[:5]} (model changed since the checkpoint?)")
        for i, (name, p) in enumerate(zip(self.names, self.params)):
            full = shadow[name].to(self.shadow[i].device, self.shadow[i].dtype)
            if hasattr(p, "ds_tensor"):
                full = _own_partition(p, full)
            elif full.shape != self.shadow[i].shape:
                raise ValueError(f"EMA tensor {name}: checkpoint shape {tuple(full.shape)} "
                                 f"!= model shape {tuple(self.shadow[i].shape)}")
            self.shadow[i].copy_(full.view_as(self.shadow[i]))
        self.updates = int(state.get("updates", 0))
        barrier()


def _shadow_dtype(param: nn.Parameter) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 parameters, fp64 for fp64 ones (the parity tests run in fp64)."""
    return torch.promote_types(param.dtype, torch.float32)


def _own_partition(param: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a full tensor of `param`: its flat values, zero-padded to the
    ranks' equal parts, cut at this rank's part."""
    n = param.ds_tensor.numel()
    flat = torch.zeros(n * torch.distributed.get_world_size(), dtype=full.dtype, device=full.device)
    flat[: full.numel()] = full.reshape(-1)
    rank = torch.distributed.get_rank()
    return flat[rank * n: (rank + 1) * n]


def _assemble(shards: list[dict], name: str) -> torch.Tensor:
    """The full tensor `name` from the partitions of every rank's shard."""
    first = shards[0]
    if not first["split"][name]:
        return first["shadow"][name]
    flat = torch.cat([shard["shadow"][name].reshape(-1) for shard in shards])
    return flat[: first["numel"][name]].view(first["shape"][name])


def assemble_partitions(shards: list[dict]) -> dict:
    """The full, rank-count-independent EMA state dict from the ZeRO-3 shards of every rank."""
    names = list(shards[0]["shadow"])
    return {"decay": shards[0]["decay"], "updates": shards[0]["updates"],
            "shadow": {name: _assemble(shards, name).clone() for name in names}}
