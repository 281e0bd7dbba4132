"""fairchem's backbone + heads ("hydra") EquiformerV2 models in eqv2's terms: which heads convert, with
which options, and where their weights go (used by eqv2/fairchem_compat.py).

Backbones: `equiformer_v2_backbone` and the DeNS backbone `equiformer_v2_dens_backbone` of the OMat24 /
MPtrj / sAlex models.  At inference (no noisy positions, no force input) the DeNS backbone is the plain
one plus constants added to every atom's degree-0 features before the edge-degree embedding: its force
encoding (an SO(3) linear layer) of zero forces leaves its bias, and, with
`use_noise_schedule_sigma_encoding`, the sigma embedding (a linear layer) of sigma = 0 leaves its bias.
Both are folded into the atom-embedding table, which then computes the same function.

Heads (registry names or class paths, as configs name them): energy (`equiformer_v2_energy_head`,
`equiformerV2_scalar_head`, `eqV2_DeNS_scalar_head`), forces (`equiformer_v2_force_head`,
`equiformerV2_vector_head`, `eqV2_DeNS_vector_head`, whose denoising block serves only noisy inputs and
is dropped) and stress (`rank2_symmetric_head`, `dens_rank2_symmetric_head`: eqv2/model/rank2_head.py).
`use_denoising` changes only what the heads output for noisy inputs.
"""
from __future__ import annotations

import re
from typing import Any

import torch

# fairchem class names of its configs' class paths -> registry names
_CLASS_NAMES = {
    "EquiformerV2Backbone": "equiformer_v2_backbone", "EqV2DeNSBackbone": "equiformer_v2_dens_backbone",
    "EquiformerV2EnergyHead": "equiformer_v2_energy_head", "EquiformerV2ForceHead": "equiformer_v2_force_head",
    "EqV2ScalarHead": "equiformerV2_scalar_head", "EqV2VectorHead": "equiformerV2_vector_head",
    "DeNSScalarHead": "eqV2_DeNS_scalar_head", "DeNSVectorHead": "eqV2_DeNS_vector_head",
    "Rank2SymmetricTensorHead": "rank2_symmetric_head", "DeNSRank2Head": "dens_rank2_symmetric_head",
}
BACKBONES = ("equiformer_v2_backbone", "equiformer_v2_dens_backbone")
DENS_BACKBONE_OPTIONS = ("use_force_encoding", "use_noise_schedule_sigma_encoding")
_RANK2_OPTIONS = {"output_name": "stress", "decompose": False, "edge_level_mlp": False, "num_mlp_layers": 2,
                  "use_source_target_embedding": False, "extensive": False, "avg_num_nodes": 1.0,
                  "default_norm_type": "layer_norm_sh"}
# module -> (role, its weights' prefix, options with their defaults, options with the only value eqv2 supports)
HEADS: dict[str, tuple[str, str, dict[str, Any], dict[str, Any]]] = {
    "equiformer_v2_energy_head": ("energy", "energy_block", {"reduce": "sum"}, {}),
    "equiformerV2_scalar_head": ("energy", "energy_block", {"reduce": "sum"}, {"output_name": "energy"}),
    "eqV2_DeNS_scalar_head": ("energy", "scalar_block", {"reduce": "sum", "use_denoising": True},
                              {"output_name": "energy"}),
    "equiformer_v2_force_head": ("forces", "force_block", {}, {}),
    "equiformerV2_vector_head": ("forces", "force_block", {}, {"output_name": "forces"}),
    "eqV2_DeNS_vector_head": ("forces", "vector_block", {}, {"output_name": "forces"}),
    "rank2_symmetric_head": ("stress", "", dict(_RANK2_OPTIONS), {}),
    "dens_rank2_symmetric_head": ("stress", "", {**_RANK2_OPTIONS, "use_denoising": True}, {}),
}
_DROPPED_PREFIXES = ("denoising_pos_block.",)  # weights used only on noisy inputs
HYDRA_KEYS = {"name", "backbone", "heads", "otf_graph", "pass_through_head_outputs", "freeze_backbone",
              "finetune_config"}


def registry_name(module: Any) -> Any:
    """'fairchem.core.models....EqV2DeNSBackbone' -> 'equiformer_v2_dens_backbone'; other names unchanged."""
    if isinstance(module, str) and module.startswith("fairchem.") and "." in module:
        return _CLASS_NAMES.get(module.rsplit(".", 1)[1], module)
    return module


def parse_heads(model: dict[str, Any], outputs: dict[str, Any] | None) -> tuple[dict[str, str], dict[str, Any]]:
    """Check a hydra model's heads: ({head name: role}, ModelConfig entries they set: regress_forces,
    energy_reduce, stress_head).  outputs: the checkpoint config's `outputs` section, if any."""
    unknown = sorted(set(model) - HYDRA_KEYS)
    if unknown:
        raise ValueError(f"unknown fairchem hydra option(s) {unknown}; refusing to guess their meaning")
    heads = model.get("heads") or {}
    if not heads or "backbone" not in model:
        raise ValueError("the hydra model config lacks its backbone or heads (taken from a finetune_config "
                         "starting checkpoint?); eqv2 needs both in the checkpoint's config")
    roles: dict[str, str] = {}
    settings: dict[str, dict[str, Any]] = {}
    for name, head in sorted(heads.items()):
        module = registry_name(head.get("module"))
        if module not in HEADS:
            raise ValueError(f"fairchem head {name!r}: module {head.get('module')!r} is not an EquiformerV2 head eqv2 "
                             f"converts ({', '.join(HEADS)})")
        role, _, defaults, fixed = HEADS[module]
        for key, value in head.items():
            if key == "module":
                continue
            if key not in defaults and key not in fixed:
                raise ValueError(f"fairchem head {name!r} ({module}): unknown option {key!r}")
            if key in fixed and value != fixed[key]:
                raise ValueError(f"fairchem head {name!r} ({module}): option {key}={value!r} is not supported by "
                                 f"eqv2 (only {fixed[key]!r})")
        roles[name] = role
        settings[name] = {**defaults, **{k: v for k, v in head.items() if k in defaults}}
    by_role = {role: [n for n, r in roles.items() if r == role] for role in ("energy", "forces", "stress")}
    if len(by_role["energy"]) != 1 or len(by_role["forces"]) > 1 or len(by_role["stress"]) > 1:
        raise ValueError(f"eqv2 converts one energy head, at most one force head and at most one stress head; the "
                         f"hydra model has energy heads {by_role['energy']}, force heads {by_role['forces']} and "
                         f"stress heads {by_role['stress']}")
    energy = settings[by_role["energy"][0]]
    if energy["reduce"] not in ("sum", "mean"):
        raise ValueError(f"fairchem head {by_role['energy'][0]!r}: option reduce={energy['reduce']!r} is not "
                         "supported (sum or mean)")
    entries: dict[str, Any] = {"regress_forces": bool(by_role["forces"]), "energy_reduce": energy["reduce"]}
    if by_role["stress"]:
        entries["stress_head"] = _stress_head(by_role["stress"][0], settings[by_role["stress"][0]], outputs)
    return roles, entries


def _stress_head(name: str, options: dict[str, Any], outputs: dict[str, Any] | None) -> dict[str, Any]:
    """The Rank2HeadConfig mapping of a stress head, checking that it predicts the trainer's stress."""
    out = options["output_name"]
    if out != "stress":
        raise ValueError(f"fairchem head {name!r}: option output_name={out!r} is not supported by eqv2 (only 'stress')")
    if options["decompose"] and outputs is not None and "stress" in outputs:
        parts = (outputs["stress"] or {}).get("decomposition") or {}
        dims = {k: (v or {}).get("irrep_dim") for k, v in parts.items()}
        if dims != {"stress_isotropic": 0, "stress_anisotropic": 2}:
            raise ValueError(f"outputs.stress.decomposition {dims} is not the isotropic (irrep_dim 0) + anisotropic "
                             f"(irrep_dim 2) parts that head {name!r} predicts")
    return {k: options[k] for k in ("decompose", "edge_level_mlp", "num_mlp_layers", "use_source_target_embedding",
                                    "extensive", "avg_num_nodes")}


def hydra_state(state: dict[str, torch.Tensor], heads: dict[str, Any], roles: dict[str, str],
                backbone: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A hydra state dict in the legacy model's naming (`energy_block.`, `force_block.`, `stress_head.`,
    backbone keys bare), the DeNS constants folded into `sphere_embedding.weight`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        bare = re.sub(r"^(module\.)+", "", key)
        if bare.startswith("backbone."):
            out[bare[len("backbone."):]] = value
            continue
        match = re.match(r"^output_heads\.([^.]+)\.(.*)$", bare)
        if not match or match.group(1) not in roles:
            raise ValueError(f"fairchem parameter {key!r} belongs to no head of the model config")
        name, rest = match.groups()
        role, prefix = roles[name], HEADS[registry_name(heads[name]["module"])][1]
        if rest.startswith(_DROPPED_PREFIXES):
            continue
        if role == "stress":
            out["stress_head." + rest] = value
        elif rest.startswith(prefix + "."):
            out[("energy_block." if role == "energy" else "force_block.") + rest[len(prefix) + 1:]] = value
        else:
            raise ValueError(f"fairchem parameter {key!r}: a {role} head {heads[name]['module']} has no {rest!r}")
    if registry_name(backbone.get("model")) == "equiformer_v2_dens_backbone":
        out = _fold_dens_constants(out, backbone)
    return out


def _fold_dens_constants(state: dict[str, torch.Tensor], backbone: dict[str, Any]) -> dict[str, torch.Tensor]:
    state = dict(state)
    biases = ["force_embedding.bias"]
    if backbone.get("use_noise_schedule_sigma_encoding", False):
        biases.append("noise_schedule_sigma_embedding.bias")
    for name in biases:
        if name not in state:
            raise ValueError(f"the DeNS backbone's checkpoint lacks {name!r}")
    table = state["sphere_embedding.weight"].detach().to(torch.float64)
    for name in biases:
        table = table + state.pop(name).detach().to(torch.float64).reshape(1, -1)
    state["sphere_embedding.weight"] = table.to(state["sphere_embedding.weight"].dtype)
    for name in ("force_embedding.weight", "force_embedding.expand_index", "noise_schedule_sigma_embedding.weight"):
        state.pop(name, None)  # they multiply the zero force / sigma inputs of inference
    leftover = sorted(k for k in state if k.startswith(("force_embedding.", "noise_schedule_sigma_embedding.")))
    if leftover:
        raise ValueError(f"DeNS backbone parameters {leftover} have no counterpart in eqv2")
    return state
