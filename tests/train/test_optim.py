"""AdamW parameter groups and the cosine/warm-up schedule."""
import math

import pytest
import torch
from torch import nn

from eqv2.training.optim import (OptimConfig, build_optimizer, clip_gradients, lr_factor, param_groups,
                                 trainer_clipping)


class SeparableLayerNorm(nn.Module):  # stands for the model's own norms, matched by class name
    def __init__(self):
        super().__init__()
        self.affine_weight = nn.Parameter(torch.ones(4))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.lin = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.sln = SeparableLayerNorm()
        self.out = nn.Linear(4, 1, bias=False)
        self.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)


def test_no_weight_decay_on_norms_and_linear_biases_as_fairchem():
    """fairchem's EquiformerV2.no_weight_decay(): linear biases and norm parameters; embeddings decay.
    (tests/train/test_recipe_parity.py compares the groups of the real model with fairchem's.)"""
    groups, no_decay = param_groups(Net(), weight_decay=1e-3)
    assert sorted(no_decay) == ["lin.bias", "ln.bias", "ln.weight", "sln.affine_weight"]
    decay = {g["name"]: g for g in groups}
    assert decay["decay"]["weight_decay"] == 1e-3 and decay["no_decay"]["weight_decay"] == 0.0
    assert len(decay["decay"]["params"]) == 3  # emb.weight, lin.weight, out.weight; frozen excluded
    opt = build_optimizer(Net(), OptimConfig(max_steps=10))
    assert isinstance(opt, torch.optim.AdamW)


def test_schedule_warmup_then_cosine():
    total, warm = 1000, 100
    f = [lr_factor(s, total, warm, 0.2, 0.01) for s in range(total + 50)]
    assert f[0] == pytest.approx(0.2)
    assert f[50] == pytest.approx(0.6)
    assert all(a < b for a, b in zip(f[:warm + 1], f[1:warm + 1]))  # linear rise
    assert f[warm] == 1.0  # the last warm-up step reaches the peak, as fairchem's CosineLRLambda (<=)
    assert f[warm + 1] == pytest.approx(0.01 + 0.495 * (1 + math.cos(math.pi * 0.101)))
    assert all(a >= b for a, b in zip(f[warm:total], f[warm + 1:total]))  # cosine decay
    assert f[total] == pytest.approx(0.01) and f[-1] == pytest.approx(0.01)  # floor after the plan


def test_steps_from_epochs_and_validation():
    cfg = OptimConfig(max_epochs=2.5, warmup_epochs=0.1)
    assert cfg.resolve_steps(40) == (100, 4)
    # fairchem truncates epochs × steps per epoch (int), it does not round
    assert OptimConfig(max_epochs=1.99, warmup_epochs=0.09).resolve_steps(10) == (19, 0)
    with pytest.raises(ValueError, match="training set size"):
        cfg.resolve_steps(None)
    with pytest.raises(ValueError, match="exactly one"):
        OptimConfig(max_steps=5, max_epochs=1.0)
    with pytest.raises(ValueError, match="ema_decay"):
        OptimConfig(max_steps=5, ema_decay=1.5)


def test_trainer_clips_only_at_stage_0_without_deepspeeds_bf16_mode():
    base = {"gradient_clipping": 100.0, "zero_optimization": {"stage": 0}}
    engine_ds, max_norm = trainer_clipping(base)
    assert (engine_ds["gradient_clipping"], max_norm) == (0.0, 100.0) and base["gradient_clipping"] == 100.0
    for ds in ({**base, "zero_optimization": {"stage": 2}}, {**base, "bf16": {"enabled": True}},
               {"zero_optimization": {"stage": 0}}):
        assert trainer_clipping(ds) == (ds, 0.0)


def test_clip_gradients_returns_the_norm_and_scales_only_above_the_limit():
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0])  # norm 5; one without
    assert float(clip_gradients(params, 10.0)) == pytest.approx(5.0)
    assert params[1].grad.tolist() == [0.0, 4.0]  # below the limit: untouched
    assert float(clip_gradients(params, 1.0)) == pytest.approx(5.0)
    assert params[0].grad.tolist() == pytest.approx([0.6, 0.0, 0.0], rel=1e-5)  # scaled to norm 1
    assert float(clip_gradients(params, 0.0)) == pytest.approx(1.0, rel=1e-5)  # 0: the norm only
