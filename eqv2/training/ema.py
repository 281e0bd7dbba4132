"""Exponential moving average of the weights, used for evaluation and export (reference decay 0.999).

The average is kept in fp32 on the parameters' device, one tensor per *local* parameter storage: the
full parameter under ZeRO 0-2, the rank's flat partition (`ds_tensor`) under ZeRO-3, so ZeRO-3 never has
to gather the model to update it.  `swapped_in` exchanges the live weights with the averages for
evaluation; under ZeRO-3 swapping the partitions is enough because the forward pass gathers from them.
For checkpoints the average is converted to a full, rank-count-independent state dict.
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
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [_storage(p).detach().float().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step after an optimizer step: shadow ← d·shadow + (1−d)·weight (fused, no host sync).

        As the reference (torch_ema with num_updates), the decay ramps up as min(d, (1+n)/(10+n)) so that
        the average is not dominated by the random initial weights early in training.
        """
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        live = [_storage(p).float() for p in self.params]
        torch._foreach_lerp_(self.shadow, live, 1.0 - decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily load the averaged weights into the model (e.g. for evaluation).

        ZeRO-3 keeps parameters below its persistence threshold gathered between forwards; their
        full tensor is swapped too (gathered from the EMA partitions), else the forward would use the
        live weights for them.
        """
        persistent = [i for i, p in enumerate(self.params) if getattr(p, "ds_persist", False)]
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

    # --- checkpointing: full tensors, independent of the number of ranks -------------------------
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
            full = shadow[name].to(self.shadow[i].device, torch.float32)
            if hasattr(p, "ds_tensor"):
                rank = torch.distributed.get_rank()
                n = p.ds_tensor.numel()
                flat = torch.zeros(n * torch.distributed.get_world_size(), device=full.device)
                flat[: full.numel()] = full.reshape(-1)
                full = flat[rank * n: (rank + 1) * n]
            elif full.shape != self.shadow[i].shape:
                raise ValueError(f"EMA tensor {name}: checkpoint shape {tuple(full.shape)} "
                                 f"!= model shape {tuple(self.shadow[i].shape)}")
            self.shadow[i].copy_(full.view_as(self.shadow[i]))
        self.updates = int(state.get("updates", 0))
        barrier()
