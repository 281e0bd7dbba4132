"""The batched LBFGS step (compact inverse-Hessian form, eqv2/relaxation/optimizers.py) against an independent
reference, the two-loop recursion this project used before (kept here only as the reference): the same steps
to 1e-10 relative over 70 steps of Morse clusters of different sizes with fixed atoms, structures joining late
and leaving mid-run (`extend`, `select`), the ring wrapped (memory < steps) and pairs of negative curvature;
the Gram matrices a resume recomputes equal the ones kept step by step; a step is the same fixed set of
operations whatever the memory and however many slots are filled, and torch.compile traces it as one graph."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eqv2.relaxation.optimizers import (DERIVED, BatchedLBFGS, LBFGSConfig, extend, lbfgs_step, segment_max,
                                        segment_sum, select)


class TwoLoopLBFGS:
    """REFERENCE ONLY: ASE's two-loop recursion over the shared ring, slot by slot in Python (the
    implementation eqv2 shipped before the compact form), with its own state layout."""

    def __init__(self, cfg: LBFGSConfig):
        self.cfg, self.slot, self.filled = cfg, 0, 0

    def new_state(self, n_atoms, n_structs):
        m = self.cfg.memory
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)
        return ({"s": z(n_atoms, m, 3), "y": z(n_atoms, m, 3), "r0": z(n_atoms, 3), "f0": z(n_atoms, 3)},
                {"rho": z(n_structs, m), "started": torch.zeros(n_structs, dtype=torch.bool)})

    def step(self, state, pos, forces, seg):
        atoms, structs = state
        n, m, w = structs["rho"].shape[0], self.cfg.memory, self.slot
        started = structs["started"]
        s_new = (pos - atoms["r0"]) * started[seg, None]
        y_new = (atoms["f0"] - forces) * started[seg, None]
        ys = segment_sum((y_new * s_new).sum(-1), seg, n)
        atoms["s"][:, w], atoms["y"][:, w] = s_new, y_new
        structs["rho"][:, w] = torch.where(started, 1.0 / torch.where(started, ys, 1.0), 0.0)
        self.filled = min(self.filled + 1, m)
        q, alphas = -forces.clone(), []
        for k in range(self.filled):  # newest to oldest
            j = (w - k) % m
            a = structs["rho"][:, j] * segment_sum((atoms["s"][:, j] * q).sum(-1), seg, n)
            q -= a[seg, None] * atoms["y"][:, j]
            alphas.append(a)
        z = q / self.cfg.alpha
        for k in reversed(range(self.filled)):  # oldest to newest
            j = (w - k) % m
            b = structs["rho"][:, j] * segment_sum((atoms["y"][:, j] * z).sum(-1), seg, n)
            z += atoms["s"][:, j] * (alphas[k] - b)[seg, None]
        longest = segment_max(z.norm(dim=-1), seg, n)
        scale = torch.where(longest > self.cfg.maxstep, self.cfg.maxstep / longest.clamp_min(1e-300), 1.0)
        atoms["r0"], atoms["f0"] = pos.clone(), forces.clone()
        structs["started"] = torch.ones_like(started)
        self.slot = (w + 1) % m
        return pos - z * (scale[seg, None] * self.cfg.damping)


def cluster(n_atoms: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, fixed) of a Morse cluster: a jittered cubic lattice stretched past the potential's inflection
    point (pairs of negative curvature), its first third fixed."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3).double()
    pos = grid[:n_atoms] * 3.1 + 0.3 * torch.randn(n_atoms, 3, generator=gen, dtype=torch.float64)
    return pos, torch.arange(n_atoms) < n_atoms // 3


def morse_forces(pos: torch.Tensor, seg: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Morse pair forces within each structure (D 0.5 eV, a 1.5 /Å, r0 2.5 Å), zero on fixed atoms."""
    pair = (seg[:, None] == seg[None, :]) & ~torch.eye(len(seg), dtype=torch.bool)
    diff = pos[:, None] - pos[None, :]
    r = diff.norm(dim=-1).where(pair, 1.0)
    e = torch.exp(-1.5 * (r - 2.5))
    de_dr = (1.5 * (1 - e) * e).where(pair, 0.0)
    return -(de_dr[..., None] * diff / r[..., None]).sum(1) * (~fixed)[:, None]


class Batch:
    """Structures of the run in batch order, as the engine concatenates them."""

    def __init__(self):
        self.ids, self.pos, self.fixed = [], torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
        self.sizes = {}

    @property
    def seg(self):
        return torch.repeat_interleave(torch.arange(len(self.ids)), torch.tensor([self.sizes[i] for i in self.ids],
                                                                                 dtype=torch.int64))

    def add(self, sizes: list[int]) -> None:
        for n in sizes:
            sid = len(self.sizes)
            self.sizes[sid] = n
            pos, fixed = cluster(n, seed=sid)
            self.ids.append(sid)
            self.pos, self.fixed = torch.cat([self.pos, pos]), torch.cat([self.fixed, fixed])

    def keep(self, keep: list[bool]):
        struct_index = torch.tensor([i for i, k in enumerate(keep) if k])
        atom_index = torch.nonzero(torch.tensor(keep)[self.seg]).squeeze(1)
        self.ids = [i for i, k in zip(self.ids, keep) if k]
        self.pos, self.fixed = self.pos[atom_index], self.fixed[atom_index]
        return atom_index, struct_index


SCHEDULE = {0: ("add", [5, 9, 13]), 10: ("add", [7, 11]), 30: ("keep", [True, False, True, False, True]),
            45: ("add", [12]), 58: ("keep", [False, True, True, True])}


@pytest.mark.parametrize("memory", [1, 7, 50])
def test_compact_step_equals_the_two_loop_recursion(memory):
    cfg = LBFGSConfig(memory=memory, maxstep=0.1, damping=0.9)
    new, ref = BatchedLBFGS(cfg), TwoLoopLBFGS(cfg)
    batch = Batch()
    state, ref_state = new.new_state(0, 0, batch.pos), ref.new_state(0, 0)
    start, negative, worst = {}, False, 0.0
    for k in range(70):
        if k in SCHEDULE:
            what, arg = SCHEDULE[k]
            if what == "add":
                before = batch.pos.shape[0]
                batch.add(arg)
                start.update({sid: batch.pos[batch.seg == i].clone() for i, sid in enumerate(batch.ids)
                              if sid not in start})
                state = extend(state, new.new_state(batch.pos.shape[0] - before, len(arg), batch.pos))
                ref_state = extend(ref_state, ref.new_state(batch.pos.shape[0] - before, len(arg)))
            else:
                atom_index, struct_index = batch.keep(arg)
                state, ref_state = select(state, atom_index, struct_index), select(ref_state, atom_index, struct_index)
        seg = batch.seg
        forces = morse_forces(batch.pos, seg, batch.fixed)
        got = new.step(state, batch.pos, forces, seg)
        want = ref.step(ref_state, batch.pos.clone(), forces.clone(), seg)
        negative |= bool((ref_state[1]["rho"] < 0).any())
        for i in range(len(batch.ids)):
            mine = seg == i
            err = (got[mine] - want[mine]).norm() / (want[mine] - batch.pos[mine]).norm()
            worst = max(worst, float(err))
        batch.pos = got
    assert worst < 1e-10, worst
    assert negative and new.slot == ref.slot == 70 % memory
    for i, sid in enumerate(batch.ids):  # fixed atoms never moved, free ones did
        mine = batch.seg == i
        fixed = batch.fixed[mine]
        assert torch.equal(batch.pos[mine][fixed], start[sid][fixed])
        assert (batch.pos[mine][~fixed] - start[sid][~fixed]).abs().max() > 0.05
    # the resume of a snapshot written before the Gram matrices were state recomputes them from the pairs: the
    # same as the ones kept step by step
    old_layout = state[0], {k: v for k, v in state[1].items() if k not in DERIVED}
    assert set(old_layout[1]) == {"rho", "started"}
    restored = new.restore(old_layout, batch.seg)
    for key in DERIVED:
        scale = state[1][key].abs().max()
        torch.testing.assert_close(restored[1][key], state[1][key], rtol=0, atol=1e-13 * float(scale))


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _ops_per_step(memory: int, steps: int) -> list[list[str]]:
    batch = Batch()
    batch.add([5, 9, 13])
    opt = BatchedLBFGS(LBFGSConfig(memory=memory))
    state, seg, out = opt.new_state(batch.pos.shape[0], 3, batch.pos), batch.seg, []
    for _ in range(steps):
        forces = morse_forces(batch.pos, seg, batch.fixed)
        with CountOps() as mode:
            batch.pos = opt.step(state, batch.pos, forces, seg)
        out.append(mode.ops)
    return out[1:]  # the first step also places the ring position on the device


def test_a_step_is_the_same_operations_whatever_the_history():
    """The operations of a step do not depend on how many slots are filled nor on `memory` (the two-loop
    recursion ran ~6 per filled slot and loop): a fixed sequence, which a CUDA graph could capture."""
    per_step = _ops_per_step(memory=8, steps=12) + _ops_per_step(memory=50, steps=3)
    assert all(ops == per_step[0] for ops in per_step), [len(ops) for ops in per_step]
    assert len(per_step[0]) < 150, len(per_step[0])
    assert not {"item", "_local_scalar_dense", "nonzero"} & set(per_step[0])  # no host synchronisation


def test_the_step_traces_as_one_graph():
    """`lbfgs_step` (the step's tensor work) is traced whole by torch.compile (fullgraph: no graph break, so no
    host synchronisation or data-dependent Python), once for all steps as the ring turns (the ring position is
    a tensor), and computes what the eager step computes."""
    torch._dynamo.reset()
    batch = Batch()
    batch.add([5, 9, 13])
    cfg = LBFGSConfig(memory=4)
    eager = BatchedLBFGS(cfg)
    state = eager.new_state(batch.pos.shape[0], 3, batch.pos)
    twin = eager.new_state(batch.pos.shape[0], 3, batch.pos)
    compiled = torch.compile(lbfgs_step, fullgraph=True, backend="aot_eager", dynamic=False)
    order, seg = (torch.arange(4) + 1) % 4, batch.seg
    torch._dynamo.utils.counters.clear()
    for _ in range(9):
        forces = morse_forces(batch.pos, seg, batch.fixed)
        want = eager.step(state, batch.pos, forces, seg)
        got = compiled(twin[0], twin[1], order, batch.pos, forces, seg, cfg)
        order = order.roll(-1)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        batch.pos = want
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_a_structure_steps_the_same_bits_wherever_the_ring_stood():
    """A structure that joins a running optimizer (after others took 11 steps and left) takes bit for bit the
    steps it takes in a fresh one: what a rerun of a killed relaxation job relies on."""
    cfg = LBFGSConfig(memory=7)

    def run(warm_up: int) -> list[torch.Tensor]:
        opt, batch = BatchedLBFGS(cfg), Batch()
        batch.add([5])
        state = opt.new_state(5, 1, batch.pos)
        for _ in range(warm_up):
            batch.pos = opt.step(state, batch.pos, morse_forces(batch.pos, batch.seg, batch.fixed), batch.seg)
        batch.add([9])  # the same structure (seed 1) in both runs
        state = select(extend(state, opt.new_state(9, 1, batch.pos)), *batch.keep([False, True]))
        out = []
        for _ in range(20):
            batch.pos = opt.step(state, batch.pos, morse_forces(batch.pos, batch.seg, batch.fixed), batch.seg)
            out.append(batch.pos)
        return out

    for fresh, joined in zip(run(0), run(11)):
        assert torch.equal(fresh, joined)
