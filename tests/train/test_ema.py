"""EMA of weights: the update rule, swapping for evaluation, and the full state dict."""
import pytest
import torch
from torch import nn

from eqv2.training.ema import EMA


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_update_matches_formula_and_swap_restores(warmup):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=warmup)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        # constant decay as fairchem's trainer; the optional warm-up is torch_ema's num_updates ramp
        d = min(0.9, (1 + k) / (10 + k)) if warmup else 0.9
        for n, p in model.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.detach()
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped_in():
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[n])
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), live[n])

    state = ema.full_state_dict()
    other = EMA(nn.Linear(3, 2), decay=0.999)
    other.load_full_state_dict(state)
    assert other.updates == 5
    for a, b in zip(other.shadow, ema.shadow):
        assert torch.equal(a, b)
