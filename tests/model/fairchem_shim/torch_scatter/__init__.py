"""Minimal local stand-in for torch_scatter, enough to import fairchem-core 1.10.0's EquiformerV2.

torch_scatter has no wheel for current torch; fairchem imports it at module level.  Only `scatter`
is exercised by the EquiformerV2 code paths used in the parity test.
"""
from torch_geometric.utils import scatter as _pyg_scatter


def scatter(src, index, dim=-1, out=None, dim_size=None, reduce="sum"):
    if out is not None:
        raise NotImplementedError("torch_scatter stand-in: `out=` is not supported")
    return _pyg_scatter(src, index, dim=dim, dim_size=dim_size, reduce=reduce)


def segment_coo(*args, **kwargs):
    raise NotImplementedError("torch_scatter stand-in: segment_coo is not used by EquiformerV2")


def segment_csr(*args, **kwargs):
    raise NotImplementedError("torch_scatter stand-in: segment_csr is not used by EquiformerV2")
