"""Normalisation of irreps features (paper Sec. 4.2 "Separable Layer Normalization", Fig. 3).

Three variants, named as the reference's `norm_type`:
- "layer_norm": equivariant layer norm of Equiformer; each degree L is normalised by its own RMS
  sigma^(L) (L = 0 is also centred).
- "layer_norm_sh": separable layer norm (SLN), the paper's proposal and the published OC20 models'
  choice: ordinary LayerNorm on L = 0; all L > 0 divided by one sigma^(L>0) =
  sqrt(mean_L sigma^(L)^2), so degrees are balanced.
- "rms_norm_sh": the reference code's default; L = 0 is centred, then every degree (0 included)
  is divided by one balanced RMS.
Statistics are always computed in float32 (or float64), never in bf16.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from eqv2.model.so3 import degree_index

NormType = Literal["layer_norm", "layer_norm_sh", "rms_norm_sh"]


def _balanced_mean_square(x: torch.Tensor, degree: torch.Tensor, num_degrees: int) -> torch.Tensor:
    """x [N, K, C] (K coefficients of degrees `degree`) -> [N, 1, 1]: mean over channels and degrees
    of each degree's mean square over its 2l+1 orders."""
    weight = 1.0 / ((2 * degree + 1).to(x.dtype) * num_degrees)  # [K]
    return torch.einsum("nkc,k->nc", x.pow(2), weight).mean(dim=1).view(-1, 1, 1)


class EquivariantLayerNorm(nn.Module):
    """Equiformer's equivariant layer norm: every degree normalised on its own."""

    def __init__(self, lmax: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.lmax, self.eps = lmax, eps
        self.affine_weight = nn.Parameter(torch.ones(lmax + 1, channels))
        self.affine_bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, (L+1)^2, C] -> same shape."""
        dtype = x.dtype
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        out = []
        for l in range(self.lmax + 1):
            part = x.narrow(1, l * l, 2 * l + 1)
            if l == 0:
                part = part - part.mean(dim=2, keepdim=True)
            inv = (part.pow(2).mean(dim=1, keepdim=True).mean(dim=2, keepdim=True) + self.eps).rsqrt()
            part = part * inv * self.affine_weight[l].view(1, 1, -1)
            if l == 0:
                part = part + self.affine_bias.view(1, 1, -1)
            out.append(part)
        return torch.cat(out, dim=1).to(dtype)


class SeparableLayerNorm(nn.Module):
    """SLN: LayerNorm on degree 0, one shared balanced RMS over all degrees > 0 (Sec. 4.2)."""

    def __init__(self, lmax: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.lmax, self.eps = lmax, eps
        self.norm_l0 = nn.LayerNorm(channels, eps=eps)
        self.affine_weight = nn.Parameter(torch.ones(lmax, channels))  # gamma^(L), L = 1..L_max
        self.register_buffer("degree", degree_index(lmax)[1:], persistent=False)
        self.register_buffer("weight_index", degree_index(lmax)[1:] - 1, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, (L+1)^2, C] -> same shape."""
        dtype = x.dtype
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        scalars = nn.functional.layer_norm(
            x.narrow(1, 0, 1), self.norm_l0.normalized_shape, self.norm_l0.weight.to(x.dtype),
            self.norm_l0.bias.to(x.dtype), self.eps,
        )
        if self.lmax == 0:
            return scalars.to(dtype)
        vectors = x.narrow(1, 1, x.shape[1] - 1)
        inv = (_balanced_mean_square(vectors, self.degree, self.lmax) + self.eps).rsqrt()  # [N, 1, 1]
        gamma = self.affine_weight.index_select(0, self.weight_index).to(x.dtype)  # [(L+1)^2 - 1, C]
        return torch.cat([scalars, vectors * inv * gamma], dim=1).to(dtype)


class SeparableRMSNorm(nn.Module):
    """The reference's "rms_norm_sh": centre degree 0, then one balanced RMS over all degrees."""

    def __init__(self, lmax: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.lmax, self.eps = lmax, eps
        self.affine_weight = nn.Parameter(torch.ones(lmax + 1, channels))
        self.affine_bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("degree", degree_index(lmax), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        l0 = x.narrow(1, 0, 1)
        x = torch.cat([l0 - l0.mean(dim=2, keepdim=True), x.narrow(1, 1, x.shape[1] - 1)], dim=1)
        inv = (_balanced_mean_square(x, self.degree, self.lmax + 1) + self.eps).rsqrt()
        out = x * inv * self.affine_weight.index_select(0, self.degree).to(x.dtype)
        bias = torch.cat([self.affine_bias.view(1, -1), self.affine_bias.new_zeros(out.shape[1] - 1, out.shape[2])])
        return (out + bias.to(x.dtype)).to(dtype)


def make_norm(norm_type: NormType, lmax: int, channels: int) -> nn.Module:
    if norm_type == "layer_norm":
        return EquivariantLayerNorm(lmax, channels)
    if norm_type == "layer_norm_sh":
        return SeparableLayerNorm(lmax, channels)
    if norm_type == "rms_norm_sh":
        return SeparableRMSNorm(lmax, channels)
    raise ValueError(f"unknown norm_type {norm_type!r}; expected layer_norm, layer_norm_sh or rms_norm_sh")
