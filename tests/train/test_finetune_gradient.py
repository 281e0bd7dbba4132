"""Direct -> gradient fine-tuning (`init.from_checkpoint` of a direct-force model into a `model.forces:
gradient` run): the run config may switch forces to gradient, the direct force head is dropped with one
log line and every other weight (energy backbone and head) is loaded."""
from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from eqv2.config import ConfigError
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.training.finetune import InitConfig, Pretrained, load_pretrained, merge_model_config

TINY = dict(num_layers=2, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8, attn_alpha_channels=4,
            attn_value_channels=2, ffn_hidden_channels=8, edge_channels=8, num_heads=2, num_distance_basis=8)


def _direct() -> tuple[dict, EquiformerV2]:
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY)
    return asdict(cfg), EquiformerV2(cfg)


def test_the_run_config_may_switch_a_direct_model_to_gradient_forces_only():
    config, _ = _direct()
    assert merge_model_config({"forces": "gradient"}, config, "ck")["forces"] == "gradient"
    gradient = {**config, "forces": "gradient"}
    with pytest.raises(ConfigError, match=r"model.forces='direct' \(the checkpoint has 'gradient'\)"):
        merge_model_config({"forces": "direct"}, gradient, "ck")
    with pytest.raises(ConfigError, match="model.lmax=3"):
        merge_model_config({"forces": "gradient", "lmax": 3}, config, "ck")


def test_a_direct_checkpoint_loads_into_a_gradient_model_without_its_force_head(capsys):
    config, direct = _direct()
    torch.manual_seed(1)
    model = EquiformerV2(ModelConfig(**merge_model_config({"forces": "gradient"}, config, "ck")))
    sd = direct.state_dict()
    assert any(n.startswith("force_head.") for n in sd)
    pretrained = Pretrained(config, sd, {}, "pretrained.pt")
    load_pretrained(model, pretrained, InitConfig(from_checkpoint="pretrained.pt"), lambda ps: _null())
    out = capsys.readouterr().out
    n_head = sum(1 for n in sd if n.startswith("force_head."))
    assert f"dropped the direct force head ({n_head} tensors)" in out, out
    loaded = model.state_dict()
    assert set(loaded) == {n for n in sd if not n.startswith("force_head.")}
    for name, tensor in loaded.items():
        torch.testing.assert_close(tensor, sd[name], rtol=0, atol=0, msg=name)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
