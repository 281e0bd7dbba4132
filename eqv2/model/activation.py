"""Activations on irreps features (paper Sec. 4.1 "Separable S^2 Activation", Fig. 2).

- `S2Grid`: projection of spherical-harmonic coefficients to values on a lat x long sphere grid and
  back (e3nn's ToS2Grid / FromS2Grid, "component" normalisation, resolution 18x18 in the published
  models).  Where only orders |m| <= M_max are kept (rotated edge features), degrees l > M_max are
  rescaled by sqrt((2l+1)/(2 M_max+1)), as in the reference.
- `S2Activation`: to grid, SiLU pointwise, back to coefficients.
- `SeparableS2Activation`: degree 0 gets its own SiLU on separate gating scalars, degrees > 0 go
  through the S2 activation (the paper's proposal).
- `GateActivation`: Equiformer's gate: SiLU on degree 0, sigmoid gates (one per degree > 0 and
  channel) on the rest.
- `SmoothLeakyReLU`: the attention non-linearity (negative slope 0.2).

A pointwise non-linearity on a finite grid is equivariant only up to the grid's sampling error;
the SO(2)/SO(3) linear parts and gate activation are exactly equivariant (see tests).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from eqv2.model.so3 import CoefficientLayout, degree_index, float64_constants


@functools.lru_cache(maxsize=None)
def _grid_matrices(lmax: int, mmax: int, resolution: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[lat, long, (L+1)^2] evaluation and quadrature matrices in float64, degrees l > M_max
    rescaled by sqrt((2l+1)/(2 M_max+1)).  Memoised: every block of a model shares them, and e3nn
    takes ~0.3 s to build each."""
    from e3nn import o3

    lat = resolution or 2 * (lmax + 1)
    lon = resolution or (2 * (mmax + 1) + 1 if lmax == mmax else 2 * mmax + 1)
    with float64_constants():
        to_grid = o3.ToS2Grid(lmax, (lat, lon), normalization="component")
        from_grid = o3.FromS2Grid((lat, lon), lmax, normalization="component")
    to_mat = torch.einsum("mbi,am->bai", to_grid.shb.double(), to_grid.sha.double())
    from_mat = torch.einsum("am,mbi->bai", from_grid.sha.double(), from_grid.shb.double())
    degree = degree_index(lmax)
    # .double(): an integer tensor divided by a Python float is in the *default* dtype (float32), which
    # limited float64 models to ~1e-8 (found by diagnostics/recipe_parity.py against fairchem in float64)
    rescale = torch.where(
        degree > mmax, torch.sqrt((2 * degree + 1).double() / (2.0 * mmax + 1)),
        torch.ones(degree.shape, dtype=torch.float64)
    )
    return to_mat * rescale, from_mat * rescale


class S2Grid(nn.Module):
    """Coefficients [Z, K, C] <-> grid values [Z, G, C], G = lat * long points.

    `coefficients` lists, in order, the full l-primary index of each of the K coefficients the
    features hold (all (L+1)^2 for node features, the kept m-primary ones for edge features).
    """

    def __init__(self, lmax: int, mmax: int, resolution: int | None, coefficients: torch.Tensor):
        super().__init__()
        to_mat, from_mat = _grid_matrices(lmax, mmax, resolution)
        g = to_mat.shape[0] * to_mat.shape[1]
        # kept in float64 so float64 models are exact; cast to the feature dtype on use
        self.register_buffer("to_grid_mat", to_mat[:, :, coefficients].reshape(g, -1), persistent=False)  # [G, K]
        self.register_buffer("from_grid_mat", from_mat[:, :, coefficients].reshape(g, -1), persistent=False)  # [G, K]

    # einsum, not matmul: matmul broadcasts the [G, K] matrix into Z small batched products, einsum
    # makes one [G, K] x [K, Z*C] product (its [G, Z, C] result is viewed as [Z, G, C], and
    # from_grid reads that view back as [G, Z*C] without a copy).
    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """[Z, K, C] -> [Z, G, C]"""
        return torch.einsum("gk,zkc->zgc", self.to_grid_mat.to(x.dtype), x)

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """[Z, G, C] -> [Z, K, C]"""
        return torch.einsum("gk,zgc->zkc", self.from_grid_mat.to(grid.dtype), grid)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        """[Z, K, C] -> from_grid(SiLU(to_grid(x))) [Z, K, C]: two einsums (the execution plan may swap in
        eqv2/kernels/fused_s2_activation.py's FusedS2Grid, which does not write the [Z, G, C] grid)."""
        return self.from_grid(nn.functional.silu(self.to_grid(x)))


def node_grid(lmax: int, resolution: int | None) -> S2Grid:
    """Grid for full node features in l-primary order."""
    return S2Grid(lmax, lmax, resolution, torch.arange((lmax + 1) ** 2))


def edge_grid(layout: CoefficientLayout, resolution: int | None) -> S2Grid:
    """Grid for rotated edge features in the layout's m-primary order."""
    return S2Grid(layout.lmax, layout.mmax, resolution, layout.reduced_to_full)


class S2Activation(nn.Module):
    """SiLU applied pointwise on the sphere grid to all degrees."""

    def forward(self, x: torch.Tensor, grid: S2Grid) -> torch.Tensor:
        return grid.silu(x)


class SeparableS2Activation(nn.Module):
    """Degree 0 from SiLU(gating scalars); degrees > 0 from the S2 activation of x (Sec. 4.1)."""

    def forward(self, scalars: torch.Tensor, x: torch.Tensor, grid: S2Grid) -> torch.Tensor:
        """scalars [Z, C], x [Z, K, C] (coefficient 0 is degree 0) -> [Z, K, C]."""
        vectors = grid.silu(x)
        return torch.cat([nn.functional.silu(scalars).unsqueeze(1), vectors.narrow(1, 1, x.shape[1] - 1)], dim=1)


class GateActivation(nn.Module):
    """Equiformer's gate: SiLU on degree 0, sigmoid(gates) scaling each degree > 0 per channel."""

    def __init__(self, lmax: int, degree_of_coefficient: torch.Tensor):
        super().__init__()
        self.lmax = lmax
        # gate row (l - 1) for every coefficient after the first (degree 0)
        self.register_buffer("gate_index", degree_of_coefficient[1:] - 1, persistent=False)

    def forward(self, gates: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """gates [Z, L*C], x [Z, K, C] -> [Z, K, C]."""
        gates = torch.sigmoid(gates).view(gates.shape[0], self.lmax, -1).index_select(1, self.gate_index)
        return torch.cat([nn.functional.silu(x.narrow(1, 0, 1)), x.narrow(1, 1, x.shape[1] - 1) * gates], dim=1)


class SmoothLeakyReLU(nn.Module):
    """x * ((1+a)/2 + (1-a)/2 * (2 sigmoid(x) - 1)), a = 0.2: a smooth leaky ReLU."""

    def __init__(self, negative_slope: float = 0.2):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.negative_slope
        return 0.5 * (1 + a) * x + 0.5 * (1 - a) * x * (2 * torch.sigmoid(x) - 1)
