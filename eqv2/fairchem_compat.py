"""Reading fairchem/OCP EquiformerV2 checkpoints: hyperparameters and weights into eqv2's layout.

Two layouts exist: the legacy single model (`model.name: equiformer_v2`, keys `sphere_embedding...`,
`energy_block...`, `force_block...`) and the newer backbone + heads model (`model.name: hydra`,
keys `backbone....`, `output_heads.<name>.energy_block...`, `output_heads.<name>.force_block...`).
Either may carry a `module.` prefix from DistributedDataParallel.  Buffers of the reference (index
maps, grid matrices, radial basis centres) are recomputed by eqv2 and dropped; every parameter must
find its place and every eqv2 parameter must be filled, or conversion fails naming the keys.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from eqv2.config import from_dict
from eqv2.model.config import OC20_AVG_DEGREE, OC20_AVG_NUM_NODES, ModelConfig

# reference buffers that eqv2 recomputes (checked against the key's last component)
_BUFFER_NAMES = {
    "offset", "expand_index", "balance_degree_weight", "l_harmonic", "m_harmonic", "m_complex",
    "res_size", "to_m", "m_size", "to_grid_mat", "from_grid_mat", "mask_indices",
}
# hyperparameters that do not change the function eqv2 computes
_IGNORED_HPARAMS = {
    "name", "use_pbc", "use_pbc_single", "otf_graph", "num_sphere_samples", "num_distance_basis",
    "attn_activation", "ffn_activation", "activation_checkpoint",
    "use_energy_lin_ref", "regress_forces",
}

_RENAMES = [  # (pattern, replacement) applied in order to keys without layout prefixes
    (r"^sphere_embedding\.", "atom_embedding."),
    (r"^energy_block\.", "energy_head."),
    (r"^force_block\.", "force_head."),
    (r"\.ga\.", ".attention."),
    (r"(^|\.)(source_embedding|target_embedding)\.", r"\1edge_scalars.\2."),
    (r"\.rad_func\.", ".radial."),
    (r"\.so2_m_conv\.(\d+)\.fc\.", r".m_convs.\1."),
]


def model_config_from_fairchem(hparams: dict[str, Any]) -> ModelConfig:
    """Map a fairchem EquiformerV2 model config (legacy or hydra backbone) to `ModelConfig`."""
    hp = dict(hparams)
    if hp.get("name") == "hydra" or "backbone" in hp:
        heads = hp.get("heads") or {}
        hp = dict(hp["backbone"])
        hp["regress_forces"] = any("force" in str(h.get("module", name)) for name, h in heads.items()) if heads else True
    unsupported = {
        "share_atom_edge_embedding": False, "use_m_share_rad": False, "use_s2_act_attn": False,
        "load_energy_lin_ref": False, "distance_function": "gaussian",
    }
    for key, supported in unsupported.items():
        if key in hp and hp[key] != supported:
            raise ValueError(f"fairchem model option {key}={hp[key]!r} is not supported by eqv2 (only {supported!r})")
    for key in ("lmax_list", "mmax_list"):
        if key in hp and len(hp[key]) != 1:
            raise ValueError(f"fairchem model option {key}={hp[key]} has several resolutions; eqv2 supports one")
    known = set(ModelConfig.__dataclass_fields__) | _IGNORED_HPARAMS | set(unsupported) | {
        "lmax_list", "mmax_list", "use_gate_act", "use_sep_s2_act", "backbone", "heads", "model",
    }
    unknown = sorted(k for k in hp if k not in known)
    if unknown:
        raise ValueError(f"unknown fairchem EquiformerV2 option(s) {unknown}; refusing to guess their meaning")
    if hp.get("use_gate_act", False):
        activation = "gate"
    elif hp.get("use_sep_s2_act", True):
        activation = "separable_s2"
    else:
        activation = "s2"
    mapped = {
        "num_layers": hp.get("num_layers", 12),
        "lmax": hp.get("lmax_list", [6])[0],
        "mmax": hp.get("mmax_list", [2])[0],
        "activation": activation,
        "num_distance_basis": 600,  # the reference always uses 600 Gaussians
        "avg_num_nodes": hp.get("avg_num_nodes") or OC20_AVG_NUM_NODES,
        "avg_degree": hp.get("avg_degree") or OC20_AVG_DEGREE,
        "regress_forces": hp.get("regress_forces", True),
        # reference defaults where eqv2's defaults differ
        "attn_hidden_channels": hp.get("attn_hidden_channels", 128),
        "attn_alpha_channels": hp.get("attn_alpha_channels", 32),
        "ffn_hidden_channels": hp.get("ffn_hidden_channels", 512),
        "norm_type": hp.get("norm_type", "rms_norm_sh"),
        "use_grid_mlp": hp.get("use_grid_mlp", False),
        "grid_resolution": hp.get("grid_resolution"),
        "drop_path_rate": hp.get("drop_path_rate", 0.05),
        "max_neighbors": hp.get("max_neighbors", 500),
        "max_radius": hp.get("max_radius", 5.0),
        # which neighbours the reference's graph keeps among equidistant ones (eqv2.model.graph)
        "enforce_max_neighbors_strictly": bool(hp.get("enforce_max_neighbors_strictly", True)),
        "weight_init": hp.get("weight_init", "normal"),
    }
    for key in ("sphere_channels", "num_heads", "attn_value_channels", "edge_channels", "max_num_elements",
                "use_atom_edge_embedding", "use_attn_renorm", "alpha_drop", "proj_drop"):
        if key in hp:
            mapped[key] = hp[key]
    return from_dict(ModelConfig, mapped, prefix="fairchem model")


def _strip_layout(key: str) -> str | None:
    """Key without DDP/hydra prefixes, in legacy naming; None for keys outside the model."""
    key = re.sub(r"^(module\.)+", "", key)
    if key.startswith("backbone."):
        return key[len("backbone."):]
    match = re.match(r"^output_heads\.[^.]+\.((energy_block|force_block)\..*)$", key)
    if match:
        return match.group(1)
    if key.startswith("output_heads."):
        raise ValueError(f"unsupported fairchem output head parameter {key!r} (eqv2 has energy and force heads)")
    return key


def convert_state_dict(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a fairchem EquiformerV2 state dict to eqv2's names, checking shapes against `expected`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = _strip_layout(key)
        if name.split(".")[-1] in _BUFFER_NAMES or "mapping" in name.split(".") or name.startswith(("SO3_grid.", "SO3_rotation.", "mappingReduced.")):
            continue
        for pattern, repl in _RENAMES:
            name = re.sub(pattern, repl, name)
        if name not in expected:
            raise ValueError(f"fairchem parameter {key!r} (as {name!r}) has no counterpart in eqv2's model")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(f"fairchem parameter {key!r}: shape {tuple(value.shape)} != eqv2 {name} {tuple(expected[name].shape)}")
        out[name] = value.detach().clone()
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(f"the fairchem checkpoint lacks {len(missing)} eqv2 parameters, e.g. {missing[:5]}")
    return out


def parameter_names_in_order(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of trainable parameters in fairchem's `model.parameters()` order (state-dict order minus
    buffers), which is the order of the EMA's shadow parameters."""
    names = []
    for key in state_dict:
        name = _strip_layout(key)
        last = name.split(".")[-1]
        if last in _BUFFER_NAMES or "mapping" in name.split(".") or name.startswith(("SO3_grid.", "SO3_rotation.", "mappingReduced.")):
            continue
        if last == "energy_lin_ref":  # requires_grad=False: not tracked by the EMA
            continue
        names.append(key)
    return names


def _model_hparams(config: dict[str, Any]) -> dict[str, Any]:
    model = config.get("model")
    if isinstance(model, str):  # old OCP: model name + model_attributes
        if model != "equiformer_v2":
            raise ValueError(f"checkpoint model is {model!r}, not equiformer_v2")
        return dict(config.get("model_attributes") or {})
    if isinstance(model, dict):
        name = model.get("name")
        if name not in ("equiformer_v2", "hydra", None):
            raise ValueError(f"checkpoint model is {name!r}, not an EquiformerV2")
        if name == "hydra" and "equiformer_v2" not in str(model.get("backbone", {}).get("model", "")):
            raise ValueError(f"hydra backbone {model.get('backbone', {}).get('model')!r} is not equiformer_v2_backbone")
        return dict(model)
    raise ValueError("checkpoint config has no model section")


def _as_float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def normalizers_from_checkpoint(checkpoint: dict[str, Any]) -> dict[str, float]:
    """energy_mean / energy_std / forces_std from wherever this fairchem version kept them."""
    norms = checkpoint.get("normalizers") or {}
    if "target" in norms:
        forces = norms.get("grad_target", norms["target"])
        return {"energy_mean": _as_float(norms["target"]["mean"]), "energy_std": _as_float(norms["target"]["std"]),
                "forces_std": _as_float(forces["std"])}
    dataset = (checkpoint.get("config") or {}).get("dataset") or {}
    candidates = dataset if isinstance(dataset, list) else [dataset.get("train", {}), dataset]
    for entry in candidates:
        if not isinstance(entry, dict):
            continue
        transform = (entry.get("transforms") or {}).get("normalizer") or {}
        if "energy" in transform:
            forces = transform.get("forces", {})
            return {"energy_mean": _as_float(transform["energy"].get("mean", 0.0)),
                    "energy_std": _as_float(transform["energy"]["stdev"]),
                    "forces_std": _as_float(forces.get("stdev", transform["energy"]["stdev"]))}
        if entry.get("normalize_labels") and "target_std" in entry:
            return {"energy_mean": _as_float(entry.get("target_mean", 0.0)), "energy_std": _as_float(entry["target_std"]),
                    "forces_std": _as_float(entry.get("grad_target_std", entry["target_std"]))}
    raise ValueError("no target normalisers found in the checkpoint (normalizers / dataset config); "
                     "pass them explicitly (--energy-mean, --energy-std, --forces-std)")


def convert_checkpoint(checkpoint: dict[str, Any], weights: str = "ema"):
    """fairchem checkpoint dict -> (ModelConfig, eqv2 state dict, fairchem normalisers or None, notes).

    weights: "ema" uses the EMA shadow parameters when the checkpoint has them (what fairchem
    evaluates with), "raw" the plain state dict.
    """
    from eqv2.model.equiformer_v2 import EquiformerV2

    if "state_dict" not in checkpoint or "config" not in checkpoint:
        raise ValueError("not a fairchem checkpoint: needs 'state_dict' and 'config' entries")
    cfg = model_config_from_fairchem(_model_hparams(checkpoint["config"]))
    state = dict(checkpoint["state_dict"])
    notes = {"weights": "raw"}
    ema = checkpoint.get("ema")
    if weights == "ema" and ema and ema.get("shadow_params"):
        names = parameter_names_in_order(state)
        shadow = ema["shadow_params"]
        if len(shadow) != len(names):
            raise ValueError(f"EMA has {len(shadow)} tensors but the state dict {len(names)} trainable parameters")
        for name, value in zip(names, shadow):
            if tuple(value.shape) != tuple(state[name].shape):
                raise ValueError(f"EMA tensor for {name} has shape {tuple(value.shape)}, expected {tuple(state[name].shape)}")
            state[name] = value
        notes["weights"] = "ema"
    elif weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    expected = EquiformerV2(cfg).state_dict()
    converted = convert_state_dict(state, expected)
    try:
        norms = normalizers_from_checkpoint(checkpoint)
    except ValueError:
        norms = None
    return cfg, converted, norms, notes
