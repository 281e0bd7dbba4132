"""Irreps bookkeeping, Wigner-D rotations and the degree-wise linear layer (paper Sec. 3.1-3.3).

Node features are irreps features `x` of shape [N, (L_max+1)^2, C] stored degree-major
("l-primary"): coefficient (l, m) lives at index l*l + l + m, m = -l..l, in e3nn's real spherical
harmonics basis (y is the polar axis; degree 1 is ordered x, y, z, so a degree-1 feature is a
Cartesian vector).

eSCN convolutions rotate each edge's features so that the edge points along +y, where only the
orders |m| <= M_max are kept (Sec. 3.3).  Rotated edge features use the "m-primary" order of the
reference implementation: all m = 0 coefficients (l = 0..L), then for m = 1..M_max the +m block
(l = m..L) followed by the -m block (l = m..L).  `CoefficientLayout` holds that bookkeeping.

The Wigner-D matrix of a rotation with e3nn Euler angles (alpha, beta, gamma) (R = Ry(a) Rx(b) Ry(c))
is X(a) J X(b) J X(c), with X the rotation about the polar axis (2x2 blocks on the (m, -m) pairs)
and J the D-matrix of the 180-degree rotation swapping x and y.  J is computed once from e3nn.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import nn


def _autocast_available(device_type: str) -> bool:
    """Whether `device_type` has autocast (the `meta` device of the no-host-sync test has none).
    Under torch.compile the query is not traceable; compiled code runs on CPU or CUDA, which have it."""
    return torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products run in: autocast's (bfloat16) when it is on for x's device, else x's."""
    device_type = x.device.type
    if _autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def full_precision(device_type: str):
    """Autocast off for `device_type` (geometry in full precision); nothing to turn off on devices
    without autocast."""
    if _autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def float64_constants():
    """e3nn builds its constant matrices in the default dtype; build ours in float64 so that
    float64 models are equivariant to machine precision (float32 constants limit it to ~1e-6)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.device("cpu"):  # real values even when a model is built under torch.device("meta")
            yield
    finally:
        torch.set_default_dtype(previous)


def degree_index(lmax: int) -> torch.Tensor:
    """[(L+1)^2] degree l of each l-primary coefficient: 0, 1, 1, 1, 2, ..."""
    return torch.repeat_interleave(torch.arange(lmax + 1), 2 * torch.arange(lmax + 1) + 1)


class CoefficientLayout:
    """Index maps between full l-primary coefficients and rotated, M_max-truncated m-primary ones."""

    def __init__(self, lmax: int, mmax: int):
        if not 0 <= mmax <= lmax:
            raise ValueError(f"need 0 <= mmax <= lmax, got lmax={lmax}, mmax={mmax}")
        self.lmax, self.mmax = lmax, mmax
        self.num_full = (lmax + 1) ** 2
        order: list[int] = [l * l + l for l in range(lmax + 1)]  # m = 0, l = 0..L
        degrees: list[int] = list(range(lmax + 1))
        for m in range(1, mmax + 1):
            for sign in (1, -1):
                order += [l * l + l + sign * m for l in range(m, lmax + 1)]
                degrees += list(range(m, lmax + 1))
        # reduced (m-primary) position k holds full coefficient reduced_to_full[k], of degree degree_of[k]
        self.reduced_to_full = torch.tensor(order, dtype=torch.long)
        self.degree_of_reduced = torch.tensor(degrees, dtype=torch.long)
        self.num_reduced = len(order)
        # sizes of the m blocks: m=0 has L+1 entries, each +m and -m block has L-m+1
        self.m_block = [lmax + 1] + [lmax - m + 1 for m in range(1, mmax + 1)]

    def inverse_rescale(self) -> torch.Tensor:
        """[K] factor on each kept coefficient when rotating back.

        Degrees l > M_max keep only 2*M_max+1 of their 2l+1 orders; the reference rescales them by
        sqrt((2l+1) / (2*M_max+1)) when rotating back so their magnitude matches the full rotation.
        """
        return inverse_rescale(self.degree_of_reduced, self.mmax)


def inverse_rescale(degree: torch.Tensor, mmax: int) -> torch.Tensor:
    """[K] float64 rotate-back factors of coefficients of degrees `degree` (see
    CoefficientLayout.inverse_rescale), computed on `degree`'s device."""
    l = degree.to(torch.float64)
    factor = torch.sqrt((2 * l + 1) / (2 * mmax + 1))
    return torch.where(degree > mmax, factor, torch.ones_like(factor))


def _polar_rotation(angle: torch.Tensor, l: int) -> torch.Tensor:
    """[..., 2l+1, 2l+1] D-matrix of a rotation by `angle` about the polar (y) axis, degree l."""
    out = angle.new_zeros(*angle.shape, 2 * l + 1, 2 * l + 1)
    idx = torch.arange(2 * l + 1, device=angle.device)
    freq = torch.arange(l, -l - 1, -1, device=angle.device, dtype=angle.dtype)
    out[..., idx, idx.flip(0)] = torch.sin(freq * angle[..., None])
    out[..., idx, idx] = torch.cos(freq * angle[..., None])  # after the sines: the centre is m = 0
    return out


@functools.lru_cache(maxsize=None)
def _swap_matrices(lmax: int) -> tuple[torch.Tensor, ...]:
    """J_l for l = 0..lmax in float64: D-matrix of the rotation taking x to y and y to x."""
    from e3nn import o3

    with float64_constants():
        half_pi = torch.tensor(math.pi / 2, dtype=torch.float64)
        return tuple(o3.wigner_D(l, half_pi, half_pi, half_pi) for l in range(lmax + 1))


class WignerD(nn.Module):
    """Per-edge Wigner-D matrices D_ij rotating features so that the edge vector points along +y.

    The rotation is R = (Ry(alpha) Rx(beta))^-1, (alpha, beta) the e3nn angles of the edge
    direction, i.e. the roll about the edge is fixed (gamma = 0).  This keeps the forward pass
    deterministic; the reference draws a random roll, which the SO(2) convolutions are invariant
    to (Sec. 3.3).  Matrices are built in the dtype of the edge vectors (float32 or float64),
    never in reduced precision, and carry no gradient (forces are predicted directly); `matrices` is
    the same function with gradients, for gradient forces (conservative.py).
    """

    def __init__(self, lmax: int):
        super().__init__()
        self.lmax = lmax
        # converted fairchem checkpoints (eqv2.fairchem_compat.use_fairchem_numerics): the polar angle as fairchem
        # reads it from the edge frame, acos of the frame's float32 cosine (fairchem_polar_angle)
        self.fairchem_polar_angle = False
        for l, j in enumerate(_swap_matrices(lmax)):
            self.register_buffer(f"swap_{l}", j, persistent=False)

    @torch.no_grad()
    def forward(self, edge_vec: torch.Tensor) -> torch.Tensor:
        """edge_vec [E, 3] -> D [E, (L+1)^2, (L+1)^2] block-diagonal Wigner-D matrices."""
        return self.matrices(edge_vec)

    def matrices(self, edge_vec: torch.Tensor) -> torch.Tensor:
        """As forward, differentiable (the gradient is not defined for edges along +-y)."""
        direction = edge_vec / edge_vec.norm(dim=-1, keepdim=True)
        # e3nn angles: direction = Ry(alpha) Rx(beta) e_y
        alpha = torch.atan2(direction[:, 0], direction[:, 2])
        # atan2, not acos: acos loses half the digits for edges near the polar axis
        beta = torch.atan2(torch.hypot(direction[:, 0], direction[:, 2]), direction[:, 1])
        if self.fairchem_polar_angle:
            beta = fairchem_polar_angle(direction)
        size = (self.lmax + 1) ** 2
        out = edge_vec.new_zeros(edge_vec.shape[0], size, size)
        for l in range(self.lmax + 1):
            j = getattr(self, f"swap_{l}").to(edge_vec.dtype)
            # D(R^-1) = D(R)^T = (X(a) J X(b) J)^T = J X(-b) J X(-a)   (J symmetric)
            block = j @ _polar_rotation(-beta, l) @ j @ _polar_rotation(-alpha, l)
            out[:, l * l : (l + 1) ** 2, l * l : (l + 1) ** 2] = block
        return out


def fairchem_polar_angle(direction: torch.Tensor) -> torch.Tensor:
    """[E] polar angles of unit `direction` [E, 3] as fairchem-core computes them for its Wigner-D matrices: the
    frame's image of +y, (0, cos, sin) for eqv2's zero-roll frame, normalised again and the angle taken by acos
    (e3nn's xyz_to_angles).  Mathematically the atan2 angle; in float32, near the polar axis, acos turns the
    cosine's round-off (6e-8) into 6e-8 / sin(beta) rad, which moves forces of a converted model by up to 1e-5
    relative: converted models follow fairchem here so that their float32 round-off is fairchem's."""
    image = torch.stack([torch.zeros_like(direction[:, 1]), direction[:, 1],
                         torch.hypot(direction[:, 0], direction[:, 2])], dim=1)
    return torch.acos(torch.nn.functional.normalize(image, p=2.0, dim=-1)[:, 1].clamp(-1, 1))


class EdgeRotation:
    """The rotation of one batch of edges, restricted to the kept orders (Sec. 3.3).

    `rotate` maps node features [E, (L+1)^2, C] to the edge frame in m-primary order [E, K, C];
    `rotate_inv` maps m-primary edge features [E, K, C] back to [E, (L+1)^2, C]; `gather_rotate` and
    `rotate_scatter` are the attention's gather-then-rotate and rotate-back-then-sum.  Both matrices are
    computed once per forward pass in the Wigner-D dtype (float32 or float64), cast once to the compute
    dtype `dtype` (bfloat16 under autocast) and shared by every block.  The execution plan may make the
    model use a subclass with fused kernels (eqv2/kernels/fused_rotation.py FusedEdgeRotation).
    """

    def __init__(self, to_edge: torch.Tensor, from_edge: torch.Tensor, envelope: torch.Tensor | None = None):
        """to_edge [E, K, (L+1)^2], from_edge [E, (L+1)^2, K] as `rotation_matrices` makes them; envelope [E]:
        the smooth-cutoff weight of each edge's messages (model.cutoff_envelope) or None."""
        self.to_edge, self.from_edge, self.dtype = to_edge, from_edge, to_edge.dtype
        self.envelope = envelope

    @classmethod
    def for_edges(cls, to_edge: torch.Tensor, from_edge: torch.Tensor, edge_index: torch.Tensor,
                  envelope: torch.Tensor | None = None) -> "EdgeRotation":
        """The rotation of the edges `edge_index` [2, E] (the model's one constructor call per forward pass)."""
        return cls(to_edge, from_edge, envelope)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """[E, (L+1)^2, C] -> [E, K, C] in the compute dtype."""
        return torch.bmm(self.to_edge, x.to(self.dtype))

    def rotate_inv(self, x: torch.Tensor) -> torch.Tensor:
        """[E, K, C] -> [E, (L+1)^2, C] in the compute dtype."""
        return torch.bmm(self.from_edge, x.to(self.dtype))

    def gather_rotate(self, x: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Both atoms' features of each edge in the edge frame: rotate(cat(x[source], x[target])) [E, K, 2C].
        The gather happens in x's dtype (float32 under autocast), so that the backward pass sums each node's
        edge gradients in it; the rotation casts the edge copies to the compute dtype."""
        return self.rotate(torch.cat([x.index_select(0, source), x.index_select(0, target)], dim=2))

    def rotate_scatter(self, m: torch.Tensor, target: torch.Tensor, num_nodes: int) -> torch.Tensor:
        """Edge-frame messages m [E, K, C] rotated back and summed into their target atoms:
        [num_nodes, (L+1)^2, C], float32 or better."""
        return scatter_sum(self.rotate_inv(m), target, num_nodes)


def scatter_sum(messages: torch.Tensor, target: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Sum messages [E, ...] into nodes [num_nodes, ...], accumulating in float32 or better."""
    acc_dtype = torch.float32 if messages.dtype in (torch.float16, torch.bfloat16) else messages.dtype
    out = messages.new_zeros((num_nodes, *messages.shape[1:]), dtype=acc_dtype)
    return out.index_add_(0, target, messages.to(acc_dtype))


def rotation_matrices(wigner: torch.Tensor, layout: CoefficientLayout, dtype: torch.dtype | None = None,
                      align: int = 1, tables: tuple[torch.Tensor, torch.Tensor] | None = None):
    """-> (to_edge [E, K, (L+1)^2], from_edge [E, (L+1)^2, K]) in `dtype` (default: the Wigner dtype).

    align: row stride of the stored matrices rounded up to a multiple of `align` elements (the
    matrices are views of zero-padded buffers).  K and (L+1)^2 are odd (37 and 49 for L 6, M 3), so
    unpadded bf16 rows are 74 and 98 bytes long; GPU matrix kernels need 16-byte aligned rows
    (align 8 in bf16) for their fast paths.  The values and results do not change.

    tables: the layout's (reduced_to_full, degree_of_reduced) already on the Wigner matrices' device
    (the model keeps them as buffers); without them they are copied from the host, which on a GPU
    is a synchronous copy that waits for all queued work."""
    dtype = dtype or wigner.dtype
    index, degree = tables if tables is not None else (layout.reduced_to_full.to(wigner.device),
                                                       layout.degree_of_reduced.to(wigner.device))
    to_edge = wigner.index_select(1, index)  # [E, K, (L+1)^2]
    rescale = inverse_rescale(degree, layout.mmax).to(wigner.dtype)
    from_edge = (to_edge.transpose(1, 2) * rescale).to(dtype)  # [E, (L+1)^2, K]
    return _aligned_rows(to_edge.to(dtype), align), _aligned_rows(from_edge, align)


def _aligned_rows(m: torch.Tensor, align: int) -> torch.Tensor:
    """[E, R, S] -> the same values in a buffer whose rows are padded to a multiple of `align`."""
    width = -(-m.shape[-1] // align) * align
    if width == m.shape[-1]:
        return m.contiguous()
    buf = m.new_zeros(*m.shape[:-1], width)
    buf[..., : m.shape[-1]] = m
    return buf[..., : m.shape[-1]]


class SO3Linear(nn.Module):
    """Degree-wise linear layer: one [C_out, C_in] matrix per degree l, bias on l = 0 only."""

    def __init__(self, in_channels: int, out_channels: int, lmax: int):
        super().__init__()
        self.in_channels, self.out_channels, self.lmax = in_channels, out_channels, lmax
        bound = 1.0 / math.sqrt(in_channels)
        self.weight = nn.Parameter(torch.empty(lmax + 1, out_channels, in_channels).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("degree", degree_index(lmax), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, (L+1)^2, C_in] -> [N, (L+1)^2, C_out]."""
        weight = self.weight.index_select(0, self.degree)  # [(L+1)^2, C_out, C_in]
        out = torch.einsum("nki,koi->nko", x, weight)
        bias = torch.cat([self.bias.view(1, -1), self.bias.new_zeros(out.shape[1] - 1, self.out_channels)])
        return out + bias


def wigner_from_rotation(rot: torch.Tensor, lmax: int) -> torch.Tensor:
    """[..., 3, 3] rotation matrices -> [..., (L+1)^2, (L+1)^2] block-diagonal Wigner-D matrices
    in eqv2's basis (D^1 equals the Cartesian rotation).  Used by tests and tools."""
    col = rot[..., :, 1]  # R e_y = Ry(a) Rx(b) e_y
    alpha = torch.atan2(col[..., 0], col[..., 2])
    beta = torch.atan2(torch.hypot(col[..., 0], col[..., 2]), col[..., 1])
    # remaining roll: Ry(g) = (Ry(a) Rx(b))^T R; read g from its (x, z) entries
    ca, sa, cb, sb = torch.cos(alpha), torch.sin(alpha), torch.cos(beta), torch.sin(beta)
    ry = torch.stack([torch.stack([ca, torch.zeros_like(ca), sa], -1),
                      torch.stack([torch.zeros_like(ca), torch.ones_like(ca), torch.zeros_like(ca)], -1),
                      torch.stack([-sa, torch.zeros_like(ca), ca], -1)], -2)
    rx = torch.stack([torch.stack([torch.ones_like(cb), torch.zeros_like(cb), torch.zeros_like(cb)], -1),
                      torch.stack([torch.zeros_like(cb), cb, -sb], -1),
                      torch.stack([torch.zeros_like(cb), sb, cb], -1)], -2)
    rest = (ry @ rx).transpose(-1, -2) @ rot
    gamma = torch.atan2(rest[..., 0, 2], rest[..., 0, 0])
    swaps = _swap_matrices(lmax)
    size = (lmax + 1) ** 2
    out = rot.new_zeros(*rot.shape[:-2], size, size)
    for l in range(lmax + 1):
        j = swaps[l].to(rot.dtype)
        out[..., l * l : (l + 1) ** 2, l * l : (l + 1) ** 2] = (
            _polar_rotation(alpha, l) @ j @ _polar_rotation(beta, l) @ j @ _polar_rotation(gamma, l)
        )
    return out
