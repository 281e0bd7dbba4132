"""ZeRO-3 builds the model partitioned (deepspeed.zero.Init, 2 real ranks): no rank holds whole
parameters, and the initialisation matches the reference rules of the unpartitioned model."""
from pathlib import Path

import torch

from tests.train.conftest import run_worker

WORKER = Path(__file__).with_name("zero_init_worker.py")


def test_partitioned_construction_shards_parameters_and_keeps_the_reference_init(tmp_path):
    out = tmp_path / "zinit.pt"
    run_worker(WORKER, 2, [str(out)])
    res = torch.load(out)
    plain, zinit = res["plain"], res["zero_init"]
    assert plain.keys() == zinit.keys()
    total = sum(p.numel() for p in plain.values())
    for shards in res["shards"]:  # each rank holds about half of every parameter
        assert sum(shards.values()) <= total // 2 + len(shards)
    for name, ref in plain.items():
        got = zinit[name]
        assert got.shape == ref.shape, name
        if bool((ref == ref.flatten()[0]).all()):  # zero biases, identity norms: exactly the same constant
            assert torch.equal(got, ref), name
        elif ref.numel() >= 64:  # uniform draws: same bound (an init step lost under ZeRO would change it)
            ratio = float(got.abs().max() / ref.abs().max())
            assert 0.85 < ratio < 1.18, (name, ratio)
    assert not torch.equal(zinit["blocks.0.attention.so2_conv_1.m_convs.0.weight"],
                           plain["blocks.0.attention.so2_conv_1.m_convs.0.weight"])  # drawn, not copied
