"""A profiled training step by category: the JSON table `log.profile_steps` writes beside its text table.

Every unit of device work is given one category (`CATEGORIES`).  On a GPU a unit is a kernel (or
copy/memset) with its duration; on the CPU, where there are no kernels, it is an operator's self time
(the leaf operators of the step).  The category comes from, in this order:

1. the trainer phase the work was issued in (`step/...` ranges of training/step.py and train.py):
   the optimizer step, EMA, clipping, loss, batch copy and the per-step bookkeeping are categories;
2. inside forward and backward: the custom kernels' operators (`eqv2::gather_rotate`, `eqv2::s2_silu`,
   `eqv2::so2_*`, ...) and aten's `bmm` (the dense per-edge Wigner products) by name, then the model's
   module ranges (`mod/<class>`, put on the model's top-level modules and blocks while profiling:
   outside compiled code, so no recompilation), then kernel names (layer norms' `rsqrt`, softmax);
3. backward work is charged to the forward operation it differentiates (the autograd node's sequence
   number), so the backward of a rotation counts as rotation.

Communication is any `nccl` kernel or work under a `c10d::` collective, whatever phase it falls in.  Host-side figures: GPU busy and idle
time per step, and per step the host synchronisations (`cudaStreamSynchronize`,
`cudaDeviceSynchronize`, `cudaEventSynchronize`) and device-to-host reads (`aten::_local_scalar_dense`:
`.item()`, `.tolist()`, `bool(tensor)`), each with the phase it happened in.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict

from torch.autograd import DeviceType

CATEGORIES = ("rotations", "so2_convolution", "s2_activation", "attention", "layer_norms", "feed_forward",
              "linear_layers", "graph_and_edge_frames", "embedding", "heads", "block_other", "loss",
              "optimizer_step", "ema", "gradient_clipping", "communication", "batch_copy", "step_bookkeeping",
              "other")
PHASE_CATEGORY = {"optimizer_step": "optimizer_step", "ema": "ema", "clip": "gradient_clipping", "loss": "loss",
                  "batch_to_device": "batch_copy", "step_counts": "step_bookkeeping",
                  "nonfinite_check": "step_bookkeeping", "log": "step_bookkeeping", "data_wait": "batch_copy"}
MODULE_CATEGORY = {"TransformerBlock": "block_other", "EdgeDegreeEmbedding": "embedding",
                   "AtomEdgeEmbedding": "embedding", "Embedding": "embedding", "EquiformerV2": "graph_and_edge_frames",
                   "SO2Convolution": "so2_convolution", "FusedSO2Convolution": "so2_convolution",
                   "EquivariantGraphAttention": "attention", "FeedForwardNetwork": "feed_forward",
                   "S2Activation": "s2_activation", "SeparableS2Activation": "s2_activation",
                   "S2Grid": "s2_activation", "FusedS2Grid": "s2_activation", "GateActivation": "s2_activation",
                   "EquivariantLayerNorm": "layer_norms", "SeparableLayerNorm": "layer_norms",
                   "SeparableRMSNorm": "layer_norms", "WignerD": "graph_and_edge_frames",
                   "GaussianRadialBasis": "graph_and_edge_frames", "RadialFunction": "graph_and_edge_frames", "Head": "heads"}
OP_RULES = [  # (pattern on an operator's name, category): the custom kernels and the dense rotations
    (re.compile(r"^eqv2::(gather_rotate|rotate_scatter)"), "rotations"),
    (re.compile(r"^aten::bmm$"), "rotations"),  # in the model, bmm is the per-edge Wigner product
    (re.compile(r"^eqv2::s2_"), "s2_activation"),
    (re.compile(r"^eqv2::so2_"), "so2_convolution"),
    (re.compile(r"^aten::(mm|addmm|linear)$"), "linear_layers"),
]
KERNEL_RULES = [  # on kernel names, where no operator or module decided
    (re.compile(r"nccl", re.I), "communication"),
    (re.compile(r"_gather_mm|_segment_run|_mm_segment_sum"), "rotations"),
    (re.compile(r"s2_silu"), "s2_activation"),
    (re.compile(r"layer_norm|rsqrt"), "layer_norms"),
    (re.compile(r"softmax"), "attention"),
    (re.compile(r"gemm|nvjet|cutlass|xmma|cublas", re.I), "linear_layers"),  # the matrix products in a block
]
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
READS = ("aten::_local_scalar_dense",)
MODULE = "mod/"


def _ancestors(event):
    while event is not None:
        yield event
        event = event.cpu_parent


def _phase_at(ranges: list[tuple[float, float, str]], t: float) -> str | None:
    """The innermost trainer phase whose host range holds time `t` (phases do not overlap but nest)."""
    best = None
    for start, end, name in ranges:
        if start <= t <= end and (best is None or start >= best[0]):
            best = (start, end, name)
    return best[2] if best else None


def _own_category(event) -> str | None:
    """The category the event's own operator / module chain gives, without phases or backward links:
    the custom kernels and the dense rotations by operator, else the innermost module range of a
    category, else a linear layer's operator, else the block it ran in."""
    chain = list(_ancestors(event))
    if any(anc.name == MODULE + "Head" for anc in chain):  # the output heads, whatever runs inside them
        return "heads"
    generic, block = None, None
    for anc in chain:
        for pattern, cat in OP_RULES:
            if pattern.search(anc.name):
                if cat != "linear_layers":
                    return cat
                generic = generic or cat
        if anc.name.startswith(MODULE):
            cat = MODULE_CATEGORY.get(anc.name[len(MODULE):], "block_other")
            if cat not in ("block_other", "graph_and_edge_frames"):
                return cat
            block = block or cat
    return generic or block


def _backward_node(event):
    """The autograd node (e.g. `BmmBackward0`) that `event` runs under, or None in a forward pass."""
    for anc in _ancestors(event):
        if anc.name.startswith("autograd::engine::evaluate_function"):
            return anc
    return None


def breakdown(events, steps: int, gpu: bool) -> dict:
    """The JSON table for the profiler's `events()` over `steps` steps (see the module docstring)."""
    from eqv2.training.profiling import PHASE, busy_and_gaps_us

    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    phases = [(e.time_range.start, e.time_range.end, e.name[len(PHASE):]) for e in cpu if e.name.startswith(PHASE)]
    # forward operators by (thread, sequence number): what their backward is charged to
    forward = {}
    for e in cpu:
        if e.sequence_nr >= 0 and _backward_node(e) is None and not e.name.startswith("autograd::"):
            cat = _own_category(e)
            if cat is not None:
                forward.setdefault((e.thread, e.sequence_nr), cat)

    def node_category(node) -> str | None:
        for child in [node, *node.cpu_children]:
            if child.sequence_nr >= 0:
                return forward.get((child.fwd_thread, child.sequence_nr))
        return None

    def category(op, name: str, t: float) -> str:
        if _communication(op, name):
            return "communication"
        phase = _phase_at(phases, t)
        if phase in PHASE_CATEGORY:
            return PHASE_CATEGORY[phase]
        node = _backward_node(op)
        cat = node_category(node) if node is not None else None
        if cat is None or cat == "block_other":
            cat = _own_category(op) if node is None else cat
        if cat is None or cat == "block_other":  # compiled blocks (CUDA graphs too): by kernel name
            for pattern, kcat in KERNEL_RULES:
                if pattern.search(name):
                    return kcat
        return cat or "other"

    time_us: dict[str, float] = defaultdict(float)
    by_phase: dict[str, float] = defaultdict(float)
    top: dict[tuple[str, str], float] = defaultdict(float)
    if gpu:
        # the operator that launched each kernel: the op the kernel's linked correlation id names (torch
        # attaches the kernel to it), else the parent of the runtime call (cudaLaunchKernel, cuLaunchKernel,
        # cudaMemcpyAsync, ...) that shares the kernel's correlation id
        with_kernels = {e.id: e for e in cpu if e.kernels}
        runtime = {e.id: e for e in cpu if e.name.startswith("cu")}
        kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.name.startswith(PHASE)
                   and not e.name.startswith(MODULE)]
        units = []
        for k in kernels:
            op = _launching_op(k, with_kernels, runtime)
            t = op.time_range.start if op is not None else k.time_range.start
            units.append((op, k.name, t, k.time_range.end - k.time_range.start))
        busy, gaps = busy_and_gaps_us([(k.time_range.start, k.time_range.end) for k in kernels])
    else:
        units = [(e, e.name, e.time_range.start, e.self_cpu_time_total) for e in cpu
                 if not e.name.startswith((PHASE, MODULE, "autograd::", "ProfilerStep", "Torch-Compiled"))
                 and e.self_cpu_time_total > 0 and (e.name.startswith(("aten::", "eqv2::")) or not e.cpu_children)]
        busy, gaps = sum(u[3] for u in units), []
    for op, name, t, dur in units:
        cat = category(op, name, t) if op is not None else ("communication" if _communication(None, name) else "other")
        time_us[cat] += dur
        by_phase[_phase_at(phases, t) or "(outside phases)"] += dur
        top[(cat, name[:90])] += dur
    total = sum(time_us.values()) or 1.0
    syncs, sync_phase = Counter(), Counter()
    for e in cpu:
        if e.name in SYNCS or e.name in READS:
            syncs[e.name] += 1
            sync_phase[f"{e.name} in {_phase_at(phases, e.time_range.start) or '(outside phases)'}"] += 1
    wall = (max(p[1] for p in phases) - min(p[0] for p in phases)) if phases else 0.0
    return {
        "steps": steps, "device": "cuda" if gpu else "cpu",
        "unit": "GPU kernel time" if gpu else "CPU self time of operators",
        "ms_per_step": {c: round(time_us.get(c, 0.0) / steps / 1e3, 3) for c in CATEGORIES},
        "share": {c: round(time_us.get(c, 0.0) / total, 4) for c in CATEGORIES},
        "ms_per_step_by_phase": {k: round(v / steps / 1e3, 3) for k, v in sorted(by_phase.items(), key=lambda x: -x[1])},
        "top_kernels": [{"category": c, "name": n, "ms_per_step": round(v / steps / 1e3, 3)}
                        for (c, n), v in sorted(top.items(), key=lambda x: -x[1])[:25]],
        "host": {
            "phases_wall_ms_per_step": round(wall / steps / 1e3, 3),
            "device_busy_ms_per_step": round(busy / steps / 1e3, 3),
            "device_idle_ms_per_step": round(max(wall - busy, 0.0) / steps / 1e3, 3) if gpu else None,
            "idle_gaps_over_1ms_per_step": round(len([g for g in gaps if g > 1e3]) / steps, 2) if gpu else None,
            "syncs_per_step": {k: syncs[k] / steps for k in (*SYNCS, *READS)},
            "syncs_per_step_by_phase": {k: v / steps for k, v in sorted(sync_phase.items())},
        },
    }


def _communication(op, name: str) -> bool:
    """An NCCL kernel, or work under a c10d collective (gloo on the CPU)."""
    return "nccl" in name.lower() or any(a.name.startswith("c10d::") for a in _ancestors(op))


def _launching_op(kernel, with_kernels: dict, runtime: dict):
    """The CPU operator that launched `kernel`, else None."""
    corr = getattr(kernel, "linked_correlation_id", 0)
    op = with_kernels.get(corr) if corr else None
    if op is None and kernel.id in runtime:
        call = runtime[kernel.id]
        op = call.cpu_parent or call
    while op is not None and op.name.startswith("cu") and op.cpu_parent is not None:
        op = op.cpu_parent  # a driver call under a runtime call: the operator above them
    return op
