"""The shipped run configs parse strictly and carry the published optimisation settings."""
from pathlib import Path

import pytest

from eqv2.training.config import load_ds_config, load_run_config
from tests.train.conftest import REPO, data_args

PUBLISHED = {  # lr, weight decay, λE, λF, EMA (upstream EquiformerV2 OC20 configs)
    "oc20_all_md_153M": (4e-4, 1e-3, 4.0, 100.0, 0.999),
    "oc20_all_md_31M": (4e-4, 1e-3, 4.0, 100.0, 0.999),
    "oc20_2M_83M": (2e-4, 1e-3, 2.0, 100.0, 0.999),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_oc20_configs(name, demo_data):
    sets = [a for a in data_args(demo_data) if a != "--set"]
    cfg, _ = load_run_config(REPO / "configs" / "train" / f"{name}.yaml", sets, micro_batch=4)
    o, l = cfg.optim, cfg.loss
    assert (o.lr, o.weight_decay, l.energy_coef, l.force_coef, o.ema_decay) == PUBLISHED[name]
    assert (o.warmup_factor, o.lr_min_factor) == (0.2, 0.01)


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_ds_configs(path: Path):
    if "tensorboard" in path.read_text():
        pytest.importorskip("tensorboard", reason="the GPU configs log to TensorBoard")
    ds = load_ds_config(path)
    assert ds["gradient_clipping"] == 100.0  # reference clip_grad_norm
