#!/usr/bin/env python
"""Count what DeepSpeed adds to a training step per parameter tensor, for several ZeRO settings.

On a GPU every dispatched operation on a tensor is (at least) one kernel launch and some host time;
DeepSpeed's ZeRO-1/2 work is a Python loop over the parameter tensors (892 for the 153M model), so its
cost grows with their number rather than their size.  This tool builds the model of a config with
tiny channel widths (the same parameter tensors, little arithmetic), wraps it in a DeepSpeed engine on
one CPU rank, and counts the operations dispatched in `engine.backward` and `engine.step` beyond a
plain backward pass.  Operations that only make views (view, detach, slice, ...) cost host time but
launch nothing and are reported apart.

    python -m diagnostics.ds_step_ops --zero '{"stage": 0}' '{"stage": 2, "overlap_comm": true, "contiguous_gradients": true}'

Prints one JSON line per setting: launches and view operations in backward and in step, and the
most frequent launching operations.  The step is the trainer's: at stage 0 the trainer clips the
gradients itself (`trainer_clipping`), counted as part of the step; `--deepspeed-clipping` leaves
stage 0's clipping to DeepSpeed for comparison.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]

from eqv2.config import from_dict, load_yaml
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.training.optim import clip_gradients, trainer_clipping

VIEWS = {"view", "detach", "slice", "alias", "as_strided", "expand", "t", "transpose", "unsqueeze", "squeeze",
         "narrow", "select", "_reshape_alias", "reshape", "lift_fresh", "_unsafe_view", "split", "permute"}


class OpCount(TorchDispatchMode):
    """Operations dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def split(self) -> tuple[int, int]:
        """(launching operations, view operations)."""
        views = sum(n for name, n in self.counts.items() if name in VIEWS)
        return sum(self.counts.values()) - views, views


def measure(model_cfg: ModelConfig, zero: dict | None, port: int, deepspeed_clipping: bool = False) -> dict:
    """Counts for one setting (`zero` None: a plain torch AdamW step with foreach clipping)."""
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.manual_seed(0)
    model = EquiformerV2(model_cfg)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss():  # stands in for the forward pass: every parameter gets a gradient
        return sum((p * p).sum() for p in params)

    # the plain backward pass, counted before an engine puts its hooks on the parameters
    loss().backward()
    with OpCount() as plain:
        for p in params:
            p.grad = None
        loss().backward()
    for p in params:
        p.grad = None
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    if zero is None:
        def backward():
            optimizer.zero_grad(set_to_none=True)
            loss().backward()

        def step():
            torch.nn.utils.clip_grad_norm_(params, 100.0, foreach=True)
            optimizer.step()
    else:
        ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 100.0,
              "torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []},
              "zero_optimization": zero, "steps_per_print": 10**9}
        ds, max_grad_norm = (ds, 0.0) if deepspeed_clipping else trainer_clipping(ds)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)

        def backward():
            engine.backward(loss())

        def step():
            if max_grad_norm > 0:
                clip_gradients(params, max_grad_norm)
            engine.step()
    for _ in range(2):  # state and buffers exist from here on
        backward()
        step()
    with OpCount() as b:
        backward()
    with OpCount() as s:
        step()
    plain_launch, plain_views = plain.split()
    b_launch, b_views = b.split()
    s_launch, s_views = s.split()
    top = [(name, n) for name, n in (b.counts + s.counts - plain.counts).most_common() if name not in VIEWS][:6]
    return {"zero": zero, "deepspeed_clipping": deepspeed_clipping, "parameter_tensors": len(params), "backward_extra_launches": b_launch - plain_launch,
            "backward_extra_views": b_views - plain_views, "step_launches": s_launch, "step_views": s_views,
            "top_launching_ops": top}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="153M", help="model config name (configs/model/eqv2_<name>.yaml)")
    parser.add_argument("--zero", nargs="+", default=['{"stage": 0}'], metavar="JSON",
                        help="zero_optimization sections to compare; 'none': plain torch AdamW")
    parser.add_argument("--deepspeed-clipping", action="store_true",
                        help="at stage 0, DeepSpeed clips (not the trainer)")
    parser.add_argument("--port", type=int, default=29655)
    args = parser.parse_args(argv)
    tiny = dict(sphere_channels=8, attn_hidden_channels=8, ffn_hidden_channels=8, edge_channels=8,
                attn_alpha_channels=8, attn_value_channels=2)
    model_cfg = from_dict(ModelConfig, {**load_yaml(ROOT / "configs" / "model" / f"eqv2_{args.config}.yaml"), **tiny})
    for i, text in enumerate(args.zero):
        zero = None if text == "none" else json.loads(text)
        print(json.dumps(measure(model_cfg, zero, args.port + i, args.deepspeed_clipping)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
