"""Custom kernels of the fast path, swapped into a built EquiformerV2 by the execution plan (eqv2/execution.py).

The paper modules (eqv2/model/) are the reference implementation; each class here subclasses one of them,
computes the same function and falls back to the reference where its kernel does not serve the tensors.
"""
