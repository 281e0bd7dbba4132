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


@pytest.mark.parametrize("name,model", [("oc20_all_md_153M", "153M"), ("oc20_all_md_31M", "31M"), ("oc20_2M_83M", "83M")])
def test_published_runs_train_on_the_fast_path_with_the_published_architecture(name, model, demo_data):
    """model: {base: <published model YAML>}: the architecture is the file's; the execution plan the trainer
    chooses for it on a GPU in bf16 has the shape buckets and fused kernels; CUDA graphs are the training default."""
    from eqv2.config import from_dict, load_yaml
    from eqv2.execution import ExecutionOverrides, run_plan
    from eqv2.model.config import ModelConfig

    sets = [a for a in data_args(demo_data) if a != "--set"]
    cfg, resolved = load_run_config(REPO / "configs" / "train" / f"{name}.yaml", sets, micro_batch=4)
    published = from_dict(ModelConfig, load_yaml(REPO / "configs" / "model" / f"eqv2_{model}.yaml"))
    assert cfg.model == published and cfg.execution == ExecutionOverrides()
    plan = run_plan(cfg, {"torch_autocast": {"enabled": True}}, "cuda", zero_stage=1)
    assert (plan.pad_atoms_multiple, plan.pad_edges_multiple, plan.rotation_align) == (64, 1024, 8)
    assert plan.so2_fused_input_grad and plan.so2_indexed_radial and plan.fused_rotation and plan.fused_s2_activation
    assert cfg.compile.mode == "reduce-overhead"
    assert "base" not in resolved["model"]  # the saved config is self-contained


def test_model_base_errors_name_the_key(tmp_path, demo_data):
    from eqv2.config import ConfigError

    sets = [a for a in data_args(demo_data) if a != "--set"]
    run = (REPO / "configs" / "train" / "oc20_all_md_31M.yaml").read_text()
    bad = tmp_path / "run.yaml"
    bad.write_text(run.replace("base: configs/model/eqv2_31M.yaml", "base: configs/model/nope.yaml"))
    with pytest.raises(ConfigError, match="model.base: model config: file not found: configs/model/nope.yaml"):
        load_run_config(bad, sets, micro_batch=4)
    bad.write_text(run.replace("base: configs/model/eqv2_31M.yaml", "base: configs/model/eqv2_31M.yaml\n  lmaxx: 4"))
    with pytest.raises(ConfigError, match="model.lmaxx"):
        load_run_config(bad, sets, micro_batch=4)


@pytest.mark.parametrize("where", ["file", "--set"])
def test_an_execution_key_under_model_names_its_new_place(tmp_path, demo_data, where):
    """Kernel and padding keys moved from model: to execution: (run configs written before say model.<key>)."""
    from eqv2.config import ConfigError

    sets = [a for a in data_args(demo_data) if a != "--set"]
    run = (REPO / "configs" / "train" / "oc20_all_md_31M.yaml").read_text()
    bad = tmp_path / "run.yaml"
    if where == "file":
        bad.write_text(run.replace("base: configs/model/eqv2_31M.yaml",
                                   "base: configs/model/eqv2_31M.yaml\n  rotation_align: 8"))
    else:
        bad.write_text(run)
        sets.append("model.pad_atoms_multiple=64")
    key = "rotation_align" if where == "file" else "pad_atoms_multiple"
    with pytest.raises(ConfigError, match=f"^model.{key}: moved to execution.{key} "):
        load_run_config(bad, sets, micro_batch=4)
    bad.write_text(run + "execution:\n  rotation_align: 4\n  fused_rotations: true\n")
    with pytest.raises(ConfigError, match="unknown config key execution.fused_rotations"):
        load_run_config(bad, sets[:-1] if where == "--set" else sets, micro_batch=4)
    bad.write_text(run + "execution:\n  rotation_align: 4\n  fused_rotation: false\n")
    cfg, _ = load_run_config(bad, sets[:-1] if where == "--set" else sets, micro_batch=4)
    assert cfg.execution.rotation_align == 4 and cfg.execution.fused_rotation is False
    assert cfg.execution.so2_fused_input_grad == "auto"


def test_a_stress_head_is_refused_for_training_naming_the_key(demo_data):
    """The direct stress head comes with converted fairchem models; the trainer has no loss for it."""
    from eqv2.config import ConfigError

    sets = [*(a for a in data_args(demo_data) if a != "--set"), "model.stress_head={decompose: true}"]
    with pytest.raises(ConfigError, match="model.stress_head: the direct stress head is not trained"):
        load_run_config(REPO / "configs" / "train" / "demo.yaml", sets, micro_batch=4)
