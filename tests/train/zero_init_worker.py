"""Worker for test_zero_init.py (under torchrun): the trainer's ZeRO-3 construction of a small model.

Builds the model inside `deepspeed.zero.Init` (as eqv2/train.py does for ZeRO-stage 3), redoes the
initialisation steps on gathered parameters (`init_partitioned`), and writes to OUT: the size of this
rank's shard of every parameter, the gathered parameters, and the same model built without ZeRO.
Usage: zero_init_worker.py OUT
"""
import sys

import torch


import deepspeed

from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.training.dist import exit_process, init_distributed, shutdown

CFG = dict(num_layers=2, lmax=3, mmax=2, sphere_channels=16, attn_hidden_channels=16, num_heads=2,
           attn_alpha_channels=8, attn_value_channels=8, ffn_hidden_channels=16, edge_channels=16,
           num_distance_basis=32, max_radius=5.0)
DS = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}

if __name__ == "__main__":
    dist = init_distributed()
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=DS, tensor_overrides=[]):
        model = EquiformerV2(ModelConfig(**CFG))
    model.init_partitioned(lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))
    shards = {name: p.ds_tensor.numel() for name, p in model.named_parameters()}
    full = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            full[name] = p.detach().cpu().clone()
    torch.manual_seed(0)
    plain = {name: p.detach().clone() for name, p in EquiformerV2(ModelConfig(**CFG)).named_parameters()}
    gathered = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, shards)
    if dist.rank == 0:
        torch.save({"shards": gathered, "zero_init": full, "plain": plain}, sys.argv[1])
    shutdown(clean=True)
    exit_process(0)  # without interpreter finalisation (eqv2/training/dist.py says why)
