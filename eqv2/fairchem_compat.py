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
from dataclasses import dataclass, field
from typing import Any

import torch

from eqv2.config import from_dict
from eqv2.fairchem_hydra import BACKBONES, DENS_BACKBONE_OPTIONS, hydra_state, parse_heads, registry_name
from eqv2.model.config import OC20_AVG_DEGREE, OC20_AVG_NUM_NODES, ModelConfig

# reference buffers that eqv2 recomputes (checked against the key's last component)
_BUFFER_NAMES = {
    "offset", "expand_index", "balance_degree_weight", "l_harmonic", "m_harmonic", "m_complex",
    "res_size", "to_m", "m_size", "to_grid_mat", "from_grid_mat", "mask_indices",
}
# hyperparameters that do not change the function eqv2 computes (docs/fairchem.md says why for each)
_IGNORED_HPARAMS = {
    "name", "use_pbc_single", "otf_graph", "num_sphere_samples", "num_distance_basis",
    "attn_activation", "ffn_activation", "activation_checkpoint", "regress_forces",
    # per-element energy references: read by `convert_checkpoint` (`Converted.energy_references`)
    "use_energy_lin_ref", "load_energy_lin_ref",
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


# fairchem EquiformerV2 models eqv2 does not convert, and what they are
_NOT_CONVERTED = {
    "equiformer_v2_dens_backbone": "the DeNS backbone, which converts only with its heads in a hydra model",
}


def _not_converted(module: str, what: str) -> ValueError:
    return ValueError(f"fairchem {what} {module!r} ({_NOT_CONVERTED[module]}) is not converted by eqv2 "
                      "(docs/fairchem.md lists what is)")


def model_config_from_fairchem(hparams: dict[str, Any], outputs: dict[str, Any] | None = None) -> ModelConfig:
    """Map a fairchem EquiformerV2 model config (legacy or hydra backbone + heads) to `ModelConfig`
    (outputs: the checkpoint config's `outputs` section, which says how a stress is assembled)."""
    hp = dict(hparams)
    heads: dict[str, Any] = {}
    if hp.get("name") == "hydra" or "backbone" in hp:
        _, heads = parse_heads(hp, outputs)
        hp = dict(hp["backbone"])
        model = registry_name(hp.get("model"))
        if model not in BACKBONES:
            raise ValueError(f"hydra backbone {hp.get('model')!r} is not an EquiformerV2 backbone ({', '.join(BACKBONES)})")
        for key in DENS_BACKBONE_OPTIONS if model == "equiformer_v2_dens_backbone" else ():
            if not isinstance(hp.pop(key, False), bool):
                raise ValueError(f"fairchem DeNS backbone option {key} must be true or false")
        hp["regress_forces"] = heads.pop("regress_forces")
    unsupported = {  # options eqv2 converts only with these values
        "share_atom_edge_embedding": False, "use_m_share_rad": False, "use_s2_act_attn": False,
        "distance_function": "gaussian", "use_pbc": True,
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
    mapped.update(heads)  # energy_reduce, stress_head
    return from_dict(ModelConfig, mapped, prefix="fairchem model")


def _strip_layout(key: str) -> str | None:
    """Key without DDP/hydra prefixes, in legacy naming; None for keys outside the model."""
    key = re.sub(r"^(module\.)+", "", key)
    if key.startswith("backbone."):
        return key[len("backbone."):]
    match = re.match(r"^output_heads\.[^.]+\.(.*)$", key)  # a head's own names (hydra_state maps them)
    return match.group(1) if match else key


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
        if name in _NOT_CONVERTED:
            raise _not_converted(name, "model")
        if name not in ("equiformer_v2", "hydra", None):
            raise ValueError(f"checkpoint model is {name!r}, not an EquiformerV2")
        return dict(model)
    raise ValueError("checkpoint config has no model section")


def _as_float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


# fairchem's stress normaliser targets -> eqv2.normalizers.StressNormalizers field prefixes
_STRESS_NORMALIZERS = {"stress_isotropic": "isotropic", "stress_anisotropic": "anisotropic", "stress": "tensor"}


def _scalar(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"the {name} normalizer has a {tuple(value.shape)} tensor; eqv2 supports scalar ones")
    return _as_float(value)


def normalizers_from_checkpoint(checkpoint: dict[str, Any]) -> dict[str, float]:
    """energy_mean / energy_std / forces_std from wherever this fairchem version kept them."""
    norms = checkpoint.get("normalizers") or {}
    if "energy" not in norms and set(norms) & {"forces", *_STRESS_NORMALIZERS}:
        # fairchem >= 1.0 denormalises only the targets it has a normaliser for (OMat24: forces and stress)
        norms = {**norms, "energy": {"mean": 0.0, "rmsd": 1.0}, "forces": norms.get("forces", {"mean": 0.0, "rmsd": 1.0})}
    if "energy" in norms:  # fairchem >= 1.0 trainers: Normalizer state dicts (mean, rmsd) per target
        forces = norms.get("forces", norms["energy"])
        if "forces" in norms and _as_float(forces.get("mean", 0.0)) != 0.0:
            raise ValueError(f"the forces normalizer has a non-zero mean {_as_float(forces['mean'])}; eqv2 scales "
                             "forces only")
        def scale(state):  # older Normalizer state dicts call it std
            return _as_float(state["rmsd"] if "rmsd" in state else state["std"])

        result = {"energy_mean": _as_float(norms["energy"]["mean"]), "energy_std": scale(norms["energy"]),
                  "forces_std": scale(forces)}
        stress = {}
        for name, field in _STRESS_NORMALIZERS.items():
            if name in norms:
                stress[f"{field}_mean"] = _scalar(norms[name].get("mean", 0.0), name)
                stress[f"{field}_std"] = _scalar(norms[name]["rmsd" if "rmsd" in norms[name] else "std"], name)
        if stress:
            result["stress"] = stress
        return result
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


@dataclass
class Converted:
    """A fairchem checkpoint in eqv2's terms."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    normalizers: dict[str, float] | None  # energy_mean, energy_std, forces_std; None: not in the checkpoint
    notes: dict[str, Any] = field(default_factory=dict)  # provenance for the model file's meta
    # per-element energy references fairchem adds at prediction, indexed by atomic number:
    model_references: list[float] | None = None  # the legacy model's energy_lin_ref, in normalised units
    trainer_references: list[float] | None = None  # the trainer's elementrefs["energy"], in eV

    def energy_references(self, energy_std: float) -> list[float] | None:
        """The references in eV with the energy normaliser's std: fairchem's legacy model adds its
        energy_lin_ref (E_ref / std) to the normalised energy, its trainer adds elementrefs after
        denormalising; both are a per-atom sum added to the energy in eV."""
        if self.model_references is None and self.trainer_references is None:
            return None
        refs = [0.0] * self.config.max_num_elements
        for z, value in enumerate(self.model_references or []):
            refs[z] += value * energy_std
        for z, value in enumerate(self.trainer_references or []):
            refs[z] += value
        return refs


def _reference_table(values: torch.Tensor, size: int, what: str) -> list[float]:
    """A per-element table cut or padded to eqv2's element table (entries beyond it must be 0)."""
    values = values.detach().reshape(-1).to(torch.float64)
    if values.numel() > size and bool((values[size:] != 0).any()):
        z = int((values[size:] != 0).nonzero()[0]) + size
        raise ValueError(f"{what} has a non-zero reference for atomic number {z}, beyond the model's element "
                         f"table (max_num_elements {size})")
    table = values[:size].tolist()
    return table + [0.0] * (size - len(table))


def _energy_references(checkpoint: dict[str, Any], hparams: dict[str, Any], hydra: bool,
                       state: dict[str, torch.Tensor], size: int,
                       notes: dict[str, Any]) -> tuple[list[float] | None, list[float] | None]:
    """(model references in normalised units, trainer references in eV), as fairchem 1.10 applies them
    (hparams: the legacy model's or the hydra backbone's); energy_lin_ref is removed from `state`."""
    lin_keys = [k for k in state if _strip_layout(k) == "energy_lin_ref"]
    lin = state.pop(lin_keys[0]) if lin_keys else None
    model_refs = None
    if hparams.get("load_energy_lin_ref") and lin is None:
        raise ValueError("load_energy_lin_ref is set but the checkpoint has no energy_lin_ref parameter")
    if lin is not None and hparams.get("use_energy_lin_ref") and not hydra:
        model_refs = _reference_table(lin, size, "energy_lin_ref")
        notes["energy_lin_ref"] = "added at prediction (use_energy_lin_ref)"
    elif lin is not None:  # fairchem does not add it: the legacy model without use_energy_lin_ref, any hydra head
        notes["energy_lin_ref"] = "not added at prediction, as in fairchem " + (
            "(hydra heads do not use it)" if hydra else "(use_energy_lin_ref false)")
    trainer_refs = None
    elementrefs = checkpoint.get("elementrefs") or {}
    unknown = sorted(set(elementrefs) - {"energy"})
    if unknown:
        raise ValueError(f"element references for {unknown} are not supported by eqv2 (only for the energy)")
    if "energy" in elementrefs:
        trainer_refs = _reference_table(torch.as_tensor(elementrefs["energy"]["element_references"]), size,
                                        "elementrefs['energy']")
        notes["element_references"] = "added at prediction (trainer elementrefs)"
    else:
        dataset = (checkpoint.get("config") or {}).get("dataset") or {}
        for entry in (dataset if isinstance(dataset, list) else [dataset, dataset.get("train", {})]):
            if isinstance(entry, dict) and (entry.get("transforms") or {}).get("element_references"):
                raise ValueError("the dataset config has transforms.element_references but the checkpoint "
                                 "stores no elementrefs: the references the model needs are not in the file")
    return model_refs, trainer_refs


def convert_checkpoint(checkpoint: dict[str, Any], weights: str = "ema") -> Converted:
    """fairchem checkpoint dict -> `Converted` (config, weights, normalisers, energy references).

    weights: "ema" uses the EMA shadow parameters when the checkpoint has them (what fairchem
    evaluates with), "raw" the plain state dict.
    """
    from eqv2.model.equiformer_v2 import EquiformerV2

    if "state_dict" not in checkpoint or "config" not in checkpoint:
        raise ValueError("not a fairchem checkpoint: needs 'state_dict' and 'config' entries")
    hparams = _model_hparams(checkpoint["config"])
    cfg = model_config_from_fairchem(hparams, checkpoint["config"].get("outputs"))
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
    hydra = hparams.get("name") == "hydra" or "backbone" in hparams
    model_refs, trainer_refs = _energy_references(checkpoint, hparams["backbone"] if hydra else hparams, hydra, state,
                                                  cfg.max_num_elements, notes)
    if hydra:
        roles, _ = parse_heads(hparams, checkpoint["config"].get("outputs"))
        state = hydra_state(state, hparams["heads"], roles, hparams["backbone"])
        if registry_name(hparams["backbone"].get("model")) == "equiformer_v2_dens_backbone":
            notes["dens"] = "DeNS backbone at inference: force-encoding constants folded into the atom embedding"
    notes["numerics"] = "fairchem"  # see use_fairchem_numerics
    expected = EquiformerV2(cfg).state_dict()
    converted = convert_state_dict(state, expected)
    try:
        norms = normalizers_from_checkpoint(checkpoint)
    except ValueError:
        norms = None
    return Converted(cfg, converted, norms, notes, model_refs, trainer_refs)


def wants_fairchem_numerics(meta: dict[str, Any]) -> bool:
    """Whether a model file asks for fairchem's constants: `meta["numerics"] == "fairchem"`, which conversion
    records; files converted before it was recorded (converted_from: fairchem) too."""
    return meta.get("numerics", "fairchem" if meta.get("converted_from") == "fairchem" else "eqv2") == "fairchem"


def use_fairchem_numerics(model) -> None:
    """Give a converted model the constants fairchem-core computes in float32 where eqv2 computes them in
    float64 (the Gaussian centres and width), and its polar angle of the edges from acos where eqv2 uses atan2
    (docs/fairchem.md, "float32 numerics").  Their values, not the
    function: float32 inference then reproduces fairchem's float32 round-off where it matters."""
    model.radial_basis.build_as_fairchem()
    model.wigner.fairchem_polar_angle = True


def fairchem_hparams(cfg) -> dict:
    """fairchem EquiformerV2 constructor arguments equivalent to an eqv2 ModelConfig (the converse of
    what the converter reads; the parity tests and tools build the reference with it)."""
    return dict(
        use_pbc=True, regress_forces=True, otf_graph=False, max_neighbors=cfg.max_neighbors,
        max_radius=cfg.max_radius, max_num_elements=cfg.max_num_elements, num_layers=cfg.num_layers,
        sphere_channels=cfg.sphere_channels, attn_hidden_channels=cfg.attn_hidden_channels,
        num_heads=cfg.num_heads, attn_alpha_channels=cfg.attn_alpha_channels,
        attn_value_channels=cfg.attn_value_channels, ffn_hidden_channels=cfg.ffn_hidden_channels,
        norm_type=cfg.norm_type, lmax_list=[cfg.lmax], mmax_list=[cfg.mmax],
        grid_resolution=cfg.grid_resolution, num_distance_basis=cfg.num_distance_basis,
        edge_channels=cfg.edge_channels, use_atom_edge_embedding=cfg.use_atom_edge_embedding,
        use_attn_renorm=cfg.use_attn_renorm, use_gate_act=cfg.activation == "gate",
        use_sep_s2_act=cfg.activation == "separable_s2", use_grid_mlp=cfg.use_grid_mlp,
        alpha_drop=cfg.alpha_drop, drop_path_rate=cfg.drop_path_rate, proj_drop=cfg.proj_drop,
        weight_init=cfg.weight_init, avg_num_nodes=cfg.avg_num_nodes, avg_degree=cfg.avg_degree,
    )
