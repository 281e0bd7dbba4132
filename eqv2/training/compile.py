"""torch.compile of the model's repeated parts, applied from outside the model (like activation checkpointing).

The eager EquiformerV2 step is launch-bound on a GPU: each of the 20 blocks issues hundreds of small
kernels (narrow/cat/cast/elementwise) around its matrix products.  Compiling each block with Inductor
fuses those into a few Triton kernels, and lets the partitioner recompute cheap elementwise results in
the backward pass instead of saving them.  Every block has the same code, so with the atom and edge counts
symbolic from the first compilation (`BATCH_DIMS`) the block is compiled once and reused by all blocks and
all batch sizes.

What is compiled: the `forward` of every `model.blocks[i]`, of the edge-degree embedding and of the
energy and force heads, replaced in place on the module instance, so parameter names — and
checkpoints — are unchanged and module hooks run outside the compiled region; and the model's
`edge_frames` (Wigner-D matrices, rotation matrices, distance basis: dozens of small eager kernels
otherwise, and under CUDA graphs its outputs stay in the graph pool instead of being copied into
every block's graph).  Graph construction (data-dependent shapes, once per forward) stays eager.
Compile after applying the execution plan (eqv2/execution.py: it swaps kernel modules in) and before applying
activation checkpointing: checkpointing then wraps the compiled forward (recomputing it in the
backward pass) instead of being traced into the graph.

`enabled: null` (auto) compiles on CUDA devices, at every ZeRO stage.  Under ZeRO stage 3 (`zero_stage=3`)
DeepSpeed gathers each module's parameters in hooks on that module, which a compiled forward must not
trace: each compiled module (blocks, heads) is flagged a ZeRO-3 leaf module (`deepspeed.utils.
set_z3_leaf_module`, before the engine is built), so DeepSpeed registers its hooks on that module alone,
gathers the parameters of its whole subtree in one collective before the compiled forward runs and
reduces their gradients after its backward (a full backward hook on the module); the submodules inside the
compiled region have no hooks.  Activation checkpointing composes: its recomputation calls the compiled
forward inside the backward pass, after the module's pre-backward hook has gathered the parameters again.
Two parts stay eager under ZeRO-3: the edge frames (a method of the root module calling submodules that
carry DeepSpeed's hooks) and the edge-degree embedding (none of its inputs carries a gradient, so a full
backward hook on it would fire before its parameters' gradients exist); and a model with frozen
parameters (init.freeze) is not compiled there (a compiled module's input may then carry no gradient).
The eager model is the reference path: tests check that the compiled model computes the same function.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from eqv2.buckets import bucket_shape
from eqv2.config import ConfigError


@dataclass
class CompileConfig:
    enabled: bool | None = None  # null: on for CUDA devices (every ZeRO stage), off otherwise
    # Inductor mode; reduce-overhead adds CUDA graphs (one recording per shape: needs the model's shape
    # buckets, execution.pad_atoms_multiple and execution.pad_edges_multiple); max-autotune: Triton templates
    # tried for the matrix products as well, with CUDA graphs (same need; much longer compilation)
    mode: Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"] = "default"
    # null: the atom, edge and structure counts symbolic from the first compilation (BATCH_DIMS; channel widths
    # stay static), so each part compiles once for every batch shape; true: every dim symbolic; false:
    # recompile per shape
    dynamic: bool | None = None
    # fraction of the compiled parts' activations the backward pass may keep (torch's min-cut partitioner
    # then recomputes the cheapest rest, elementwise ops and gathers before matrix products); 1.0: all
    activation_memory_budget: float = 1.0
    # with a budget < 1: custom kernels (the fused S2 activation) are weighed by their FLOPs when the
    # partitioner chooses what to recompute, like matrix products; false: torch's default, which treats
    # them as free to recompute (so a budget of 0.5 recomputed the S2 activation in every block)
    weigh_custom_ops: bool = True
    # Inductor's C++ wrapper: the compiled graphs launch their kernels from generated C++ instead of
    # Python (less host time per kernel; longer compilation)
    cpp_wrapper: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.activation_memory_budget <= 1.0:
            raise ConfigError(f"compile.activation_memory_budget must be in (0, 1], got {self.activation_memory_budget}")

    def resolve(self, device: torch.device, zero_stage: int = 0, frozen: int = 0) -> bool:
        """Whether to compile; `frozen`: how many parameters init.freeze froze (ZeRO-3 compiles only a model
        without frozen ones: its leaf modules' gradient reduction needs every compiled input to carry a gradient)."""
        if zero_stage == 3 and frozen:
            if self.enabled:
                raise ConfigError(f"compile.enabled=true is not supported with ZeRO stage 3 and frozen parameters "
                                  f"({frozen} frozen by init.freeze); set compile.enabled to null or false")
            return False
        if self.enabled is None:
            return device.type == "cuda"
        return self.enabled


def compiled_parts(model: nn.Module, zero_stage: int = 0) -> list[str]:
    """Names of what `apply_compile` compiles: submodules (their forward) and the model's `edge_frames`
    (the per-edge rotation matrices and distance basis); under ZeRO-3 the blocks and heads only."""
    names = [f"blocks.{i}" for i in range(len(model.blocks))]
    parts = ("energy_head", "force_head") if zero_stage == 3 else ("edge_degree_embedding", "energy_head", "force_head")
    for name in parts:
        if getattr(model, name, None) is not None:
            names.append(name)
    return names if zero_stage == 3 else names + ["edge_frames"]


def apply_compile(model: nn.Module, cfg: CompileConfig, zero_stage: int = 0) -> list[str]:
    """Compile the repeated parts of `model` in place; returns their names.  `zero_stage=3`: the model is to
    run under DeepSpeed ZeRO-3 (call this before `deepspeed.initialize`): the compiled modules are made its
    leaf modules, so that its parameter-gathering hooks run outside the compiled forwards."""
    if cfg.mode in ("reduce-overhead", "max-autotune") and not (getattr(model, "pad_atoms_multiple", 0)
                                                                and getattr(model, "pad_edges_multiple", 0)):
        raise ConfigError(f"compile.mode={cfg.mode} records a CUDA graph per batch shape: it needs shape buckets, "
                          "execution.pad_atoms_multiple and execution.pad_edges_multiple (on CUDA in bf16 they "
                          "are chosen automatically)")
    names = compiled_parts(model, zero_stage)
    if zero_stage == 3:
        from deepspeed.utils import set_z3_leaf_module

        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        if frozen:
            raise ConfigError(f"compile under ZeRO stage 3 needs every parameter trainable; {frozen[0]} is frozen")
        for name in names:
            set_z3_leaf_module(model.get_submodule(name), True)
    for name in names:
        owner, attr = (model, name) if name == "edge_frames" else (model.get_submodule(name), "forward")
        if attr in vars(owner):
            raise RuntimeError(f"{name}.{attr} is already wrapped (activation checkpointing?): apply_compile "
                               "must come first, so that the wrapper calls the compiled forward")
        plain = getattr(owner, attr)
        compiled = torch.compile(plain, options=inductor_options(cfg.mode, cfg.cpp_wrapper),
                                 dynamic=cfg.dynamic, fullgraph=True)
        if cfg.activation_memory_budget < 1.0:
            compiled = _with_memory_budget(compiled, cfg.activation_memory_budget, cfg.weigh_custom_ops)
        if cfg.dynamic is None:
            compiled = _batch_dims_symbolic(compiled, plain)
        setattr(owner, attr, compiled)
    return names


# The dims of the compiled parts' tensor arguments that change from batch to batch, by parameter name (the
# paper modules' forward signatures): atoms (x, atomic_numbers, drop_scale's second dim) and edges (the rest).
# Every tensor inside an object argument (the edge rotation: its matrices, envelope and edge order) has the
# edges on dim 0.  A tensor argument of another name keeps Dynamo's automatic dynamic shapes (compiled static
# first, then once more with the dims that changed symbolic).
BATCH_DIMS = {"x": 0, "atomic_numbers": 0, "drop_scale": 1, "distance_basis": 0, "edge_index": 1, "edge_vec": 0,
              "distance": 0}


def _batch_dims_symbolic(compiled, plain):
    """`compiled`, called with the batch dims of its arguments marked dynamic (`maybe_mark_dynamic`: Dynamo may
    still specialise one where the code needs a fixed size), so that its first compilation is the symbolic one
    every later batch shape reuses.  Without the marks, Dynamo compiles each part for the first batch's exact
    shapes and again, symbolic, at the second: twice the compile time before the first steady step.  Marking
    costs a few microseconds of host time per call."""
    import inspect

    dims = [BATCH_DIMS.get(name) for name in inspect.signature(plain).parameters]
    mark = torch._dynamo.maybe_mark_dynamic

    def mark_arg(value, dim: int | None, depth: int = 0) -> None:
        if isinstance(value, torch.Tensor):
            if dim is not None and value.dim() > dim:
                mark(value, dim)
        elif depth < 2 and hasattr(value, "__dict__") and not isinstance(value, (type, nn.Module)):
            for attr in vars(value).values():  # an object argument, and an object in it: edges on dim 0
                mark_arg(attr, 0, depth + 1)

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        for value, dim in zip(args, dims):
            mark_arg(value, dim)
        for name, value in kwargs.items():
            mark_arg(value, BATCH_DIMS.get(name))
        return compiled(*args, **kwargs)
    return call


def inductor_options(mode: str, cpp_wrapper: bool = False) -> dict:
    """Inductor settings of `mode` (and the C++ wrapper if asked), with mix-order reduction fusion off
    where torch has it (2.10+).

    That fusion decides from the sizes of a graph whether to fuse, and guards on the decision: with the
    edge count symbolic, a block compiled for batches of >= 10,240 edges was recompiled for a batch of
    fewer (measured on the H200, trainer at micro-batch 8), a ~20 s stall each time, and the variants
    count towards Dynamo's recompilation limit.  Off, a symbolic compile serves every batch size."""
    import torch._inductor as inductor
    import torch._inductor.config as inductor_config

    options = dict(inductor.list_mode_options(mode))
    if cpp_wrapper:
        options["cpp_wrapper"] = True
    if hasattr(inductor_config.triton, "mix_order_reduction"):
        options["triton.mix_order_reduction"] = False
    return options


def _with_memory_budget(compiled, budget: float, weigh_custom_ops: bool = True):
    """Call `compiled` with torch's partitioner budget set: compilation happens lazily, at a call (and at
    any recompilation), so the setting is scoped to the calls rather than set process-wide.  Compiled
    code is cached per code object, so a process uses the budget of its first compilation: one budget
    per process (the trainer builds one model).

    weigh_custom_ops: functorch's `is_non_builtin_to_include` (where torch has it): custom ops are banned from
    the min-cut's free recomputation and enter the budget's knapsack with their FLOP count (the fused
    S2 op registers one), so they are recomputed only when the budget needs it.

    On CPU, Inductor's vectorised C++ kernels are turned off, process-wide, at the first call: with torch
    2.13 a recomputing partition of the attention backward produced a vectorised kernel that wrote out
    of bounds (heap corruption on the 153M config; correct with `cpp.simdlen=1` or the aot_eager
    backend).  The backward is compiled lazily, at the first backward pass, outside any scope this
    wrapper could set, hence process-wide.  CUDA (Triton) kernels are unaffected.
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    settings = {"activation_memory_budget": budget}
    if hasattr(functorch_config, "is_non_builtin_to_include"):
        settings["is_non_builtin_to_include"] = weigh_custom_ops

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        if not any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
            inductor_config.cpp.simdlen = 1
        with functorch_config.patch(**settings):
            return compiled(*args, **kwargs)
    return call


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled in this process so far (each compiled part once, with symbolic atom and edge
    counts, and once more for no-grad evaluation); logged by the trainer."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class ShapeBuckets:
    """The padded shapes (execution.pad_atoms_multiple / pad_edges_multiple) this rank's training batches
    have had.  Under CUDA graphs each new shape is recorded once (~0.4 s for the 153M model on an
    H200, measured between log intervals) and the other ranks wait for it; the trainer logs
    how many new ones each interval met (`new_shape_buckets`, summed over ranks), so that throughput
    with recordings in it can be told from steady state.

    A shape is (padded atoms, structures + 1, padded edges), read from the host batch before it moves to
    the device.  The edge count is known there only when the loader built the graph (data.build_graphs);
    otherwise the key has no edge count and new edge buckets are not counted."""

    def __init__(self, atoms_multiple: int, edges_multiple: int) -> None:
        self.atoms_multiple, self.edges_multiple = atoms_multiple, edges_multiple
        self.seen: set[tuple] = set()

    def shape(self, batch) -> tuple[int, int, int | None]:
        """(padded atoms, structures + 1, padded edges or None when the host batch has no graph)."""
        edges = batch.edge_index.shape[1] if batch.edge_index is not None else 0
        atoms, padded_edges = bucket_shape(batch.pos.shape[0], edges, self.atoms_multiple, self.edges_multiple)
        return atoms, batch.num_graphs + 1, padded_edges if batch.edge_index is not None else None

    def count_new(self, batches) -> int:
        """How many of `batches` (host AtomsBatch) have a shape not seen before; remembers them."""
        new = 0
        for batch in batches:
            key = self.shape(batch)
            if key not in self.seen:
                self.seen.add(key)
                new += 1
        return new


class CompileEvents:
    """What the compiler did in this process since the last `take()`: Dynamo compilations (a new frame,
    or a guard that failed on new shapes), deferred backward compilations, and CUDA-graph recordings
    (reduce-overhead: one per new shape, and whenever torch's graph tree meets a new sequence of graphs),
    with the wall seconds they took.  Read from torch's compile callbacks (`torch._dynamo.callback`),
    which bracket the outermost such event; the trainer logs them per interval, summed over ranks, so
    that a slow interval can be told to be compilation or not.  `available` is False on a torch without
    those callbacks; nothing is then counted."""

    def __init__(self) -> None:
        try:
            from torch._dynamo.callback import callback_handler
        except ImportError:
            callback_handler = None
        self._handler = callback_handler
        self.available = callback_handler is not None
        self.compiles, self.cudagraph_records, self.seconds = 0, 0, 0.0
        self.total = 0  # all compilations and recordings of this process, never reset
        self._started: tuple[float, str] | None = None
        if self.available:
            callback_handler.register_start_callback(self._start)
            callback_handler.register_end_callback(self._end)

    def _start(self, args=None) -> None:  # args: CallbackArgs (absent on older torch)
        trigger = getattr(getattr(args, "callback_trigger", None), "name", "DYNAMO")
        self._started = (time.perf_counter(), trigger)

    def _end(self, args=None) -> None:
        if self._started is None:
            return
        t0, trigger = self._started
        self._started = None
        self.seconds += time.perf_counter() - t0
        self.total += 1
        if trigger == "CUDAGRAPH_RECORDING":
            self.cudagraph_records += 1
        else:
            self.compiles += 1

    def take(self) -> tuple[int, int, float]:
        """(compilations, CUDA-graph recordings, seconds) since the last call; resets them."""
        out = (self.compiles, self.cudagraph_records, self.seconds)
        self.compiles, self.cudagraph_records, self.seconds = 0, 0, 0.0
        return out

    def close(self) -> None:
        if self.available:
            for register, callback in ((self._handler.start_callbacks, self._start),
                                       (self._handler.end_callbacks, self._end)):
                if callback in register:
                    register.remove(callback)


def saved_for_backward_bytes(model: nn.Module, *args) -> tuple[int, object]:
    """Run `model(*args)` and return (bytes of the distinct storages autograd keeps for the backward
    pass, the output): how activation_memory_budget and checkpointing are measured on any device."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*args)
    return sum(storages.values()), out
