"""`ModelConfig`: every hyperparameter of EquiformerV2 (paper Sec. 4-5, Table 1a ablation switches).

Defaults are those of the published OC20 models; configs/model/eqv2_{31M,83M,153M}.yaml set the
rest.  Load with `eqv2.config.from_dict(ModelConfig, mapping)`, which rejects unknown keys.  How the model is
executed (kernels, shape buckets, input checks) is not a hyperparameter: eqv2/execution.py chooses it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# OC20 graph statistics the published models were trained with (reference constants).
OC20_AVG_NUM_NODES = 77.81317
OC20_AVG_DEGREE = 23.395238876342773


@dataclass
class Rank2HeadConfig:
    """The rank-2 symmetric tensor (stress) head of fairchem's OMat24 / MPtrj / sAlex models
    (`rank2_symmetric_head`; eqv2/model/rank2_head.py), named by its options there."""

    decompose: bool = False  # predict the isotropic (l=0) and anisotropic (l=2) parts (published: true)
    edge_level_mlp: bool = False  # MLP on each edge before averaging over an atom's edges (else after)
    num_mlp_layers: int = 2  # layers of each MLP (SiLU between)
    use_source_target_embedding: bool = False  # edge features from both atoms (published: true)
    extensive: bool = False  # sum over a structure's atoms (decompose: then / avg_num_nodes) instead of mean
    avg_num_nodes: float = 1.0  # the divisor of an extensive decomposed head

    def __post_init__(self) -> None:
        if self.num_mlp_layers < 1:
            raise ValueError(f"stress_head.num_mlp_layers must be >= 1, got {self.num_mlp_layers}")


@dataclass
class ModelConfig:
    num_layers: int = 12  # number of Transformer blocks
    lmax: int = 6  # L_max: highest degree of node irreps features
    mmax: int = 2  # M_max: highest order kept in rotated edge features (eSCN)
    sphere_channels: int = 128  # channels C of node irreps features (per degree)
    attn_hidden_channels: int = 64  # channels of the first SO(2) convolution in attention
    num_heads: int = 8  # attention heads
    attn_alpha_channels: int = 64  # channels of f_ij^(0) per head (attention logits)
    attn_value_channels: int = 16  # value channels per head
    ffn_hidden_channels: int = 128  # hidden channels of the feed-forward network
    edge_channels: int = 128  # hidden width of radial functions and atom-type edge embeddings
    num_distance_basis: int = 600  # Gaussian radial basis functions over [0, max_radius]
    max_num_elements: int = 90  # atomic-number embedding table size (Z < 90)
    use_atom_edge_embedding: bool = True  # source/target atom-type embeddings in edge scalars
    grid_resolution: int | None = 18  # sphere grid points per axis for S2 activations (None: 2(L+1))
    # Table 1a switches
    use_attn_renorm: bool = True  # attention re-normalisation (LayerNorm on f_ij^(0))
    activation: Literal["gate", "s2", "separable_s2"] = "separable_s2"  # message activation
    norm_type: Literal["layer_norm", "layer_norm_sh", "rms_norm_sh"] = "layer_norm_sh"  # LN | SLN | RMS-SLN
    use_grid_mlp: bool = True  # FFN: pointwise MLP on the sphere grid (else gate / S2 activation)
    # regularisation
    alpha_drop: float = 0.1  # dropout on attention weights
    drop_path_rate: float = 0.1  # stochastic depth on block outputs
    proj_drop: float = 0.0  # equivariant dropout after attention
    # graph
    max_radius: float = 12.0  # Å
    max_neighbors: int = 20  # per target atom, nearest first
    # true: exactly max_neighbors, ties at the cut broken by atom order (the published models); false:
    # fairchem's degeneracy-tolerant selection, which keeps every neighbour within 0.01 Å^2 (squared
    # distance) of the first one beyond the cap: invariant to rotations and atom order (graph.py)
    enforce_max_neighbors_strictly: bool = True
    # normalisers of the published models (OC20 statistics); recompute for other data
    avg_num_nodes: float = OC20_AVG_NUM_NODES  # energy = sum of node energies / avg_num_nodes
    avg_degree: float = OC20_AVG_DEGREE  # edge-degree embedding sum / avg_degree
    weight_init: Literal["uniform", "normal"] = "uniform"  # linear-layer weight initialisation
    regress_forces: bool = True  # direct force head (with forces: direct)
    # forces from the direct head (the paper) or as -dE/dpositions, with the stress from a strain of the cell
    # (eqv2/model/conservative.py; beyond the paper: conservative, for MD and cell relaxations; slower: a
    # double backward in training); a gradient model has no direct force head
    forces: Literal["direct", "gradient"] = "direct"
    # "polynomial": every edge's messages (edge-degree embedding, attention weights) scaled by a smooth
    # envelope that vanishes with two derivatives at max_radius (conservative.py), so the energy does not
    # jump when a neighbour crosses the cutoff (beyond the paper; for MD with gradient forces); "none": the paper
    cutoff_envelope: Literal["none", "polynomial"] = "none"
    # structure energy = sum of node energies / avg_num_nodes ("sum", the paper) or their mean ("mean")
    energy_reduce: Literal["sum", "mean"] = "sum"
    # direct stress head of the OMat24-family models (converted from fairchem; not trained by eqv2); None: none
    stress_head: Rank2HeadConfig | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.mmax <= self.lmax:
            raise ValueError(f"mmax must be in [0, lmax]: lmax={self.lmax}, mmax={self.mmax}")
        if self.forces == "gradient" and self.stress_head is not None:
            raise ValueError("stress_head with forces: gradient: the stress would come from both the head and the "
                             "strain derivative; use one (stress_head: null, or forces: direct)")
        if self.lmax < 1:
            raise ValueError(f"lmax must be >= 1 (degree-1 features carry the forces), got {self.lmax}")
        if self.num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {self.num_layers}")
        for name in ("sphere_channels", "num_heads", "attn_alpha_channels",
                     "attn_value_channels", "attn_hidden_channels", "ffn_hidden_channels",
                     "edge_channels", "num_distance_basis", "max_neighbors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_radius <= 0:
            raise ValueError(f"max_radius must be positive, got {self.max_radius}")
        if self.grid_resolution is not None and self.grid_resolution < 2 * (self.lmax + 1) - 2:
            raise ValueError(f"grid_resolution {self.grid_resolution} is too coarse for lmax {self.lmax}")
