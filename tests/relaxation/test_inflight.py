"""In-flight state: a relaxation stopped after k steps, written to disk, read back and continued, ends where an
uninterrupted one ends (LBFGS history and FIRE velocities included, with refill); a state file of another
input set, other settings, another task or damaged bytes is refused with one line naming the file."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT

from eqv2.relaxation import inflight
from eqv2.relaxation.engine import AseForces, RelaxConfig, RelaxStats, make_optimizer, relax
from tests.relaxation.conftest import FMAX, STEPS


def _fresh(cfg):
    return make_optimizer(cfg).new_state(1, 1, torch.zeros(0, 3, dtype=torch.float64))


def _stop_after(k: int):
    calls = []
    return lambda: calls.append(1) or len(calls) >= k


def _stopped_run(structures, cfg, path, k):
    """Relax until the k-th optimizer step, write the state to `path`; (finished results, stats)."""
    stats = RelaxStats()
    done = {r.structure.sid: r for r in relax(structures, AseForces(EMT()), cfg, float_dtype=torch.float64,
                                              stop=_stop_after(k), stats=stats,
                                              checkpoint=lambda snap: inflight.save(path, snap, cfg, 0, 1))}
    return done, stats


@pytest.mark.parametrize("optimizer, old_layout", [("lbfgs", False), ("lbfgs", True), ("fire", False)])
def test_continued_relaxation_equals_uninterrupted(emt_structures, tmp_path, optimizer, old_layout):
    """old_layout: the LBFGS state file as eqv2 wrote it before the Gram matrices SᵀY, YᵀY were state."""
    cfg = RelaxConfig(optimizer=optimizer, fmax=FMAX, steps=STEPS, max_structures=2)
    want = {r.structure.sid: r for r in relax(emt_structures, AseForces(EMT()), cfg, float_dtype=torch.float64)}
    path = tmp_path / "inflight.0.pt"
    first, stats1 = _stopped_run(emt_structures, cfg, path, k=60)  # two in flight, joined at different steps
    assert stats1.stopped and 0 < len(first) < len(emt_structures) - 2
    if old_layout:
        rec = torch.load(path, weights_only=True)
        assert {"sty", "yty"} <= rec["optimizer_structs"].keys()
        rec["optimizer_structs"] = {k: rec["optimizer_structs"][k] for k in ("rho", "started")}
        torch.save(rec, path)
    snap = inflight.load(path, cfg, 0, 1, {s.sid: s for s in emt_structures}, _fresh(cfg))
    assert len(snap.structures) == 2 and all(n > 0 for n in snap.steps)
    rest = [s for s in emt_structures if s.sid not in first and s.sid not in {t.sid for t in snap.structures}]
    stats2 = RelaxStats()
    second = {r.structure.sid: r for r in relax(rest, AseForces(EMT()), cfg, float_dtype=torch.float64, resume=snap,
                                                stats=stats2)}
    got = {**first, **second}
    assert sorted(got) == sorted(want)
    for sid, w in want.items():
        assert got[sid].steps == w.steps, sid
        np.testing.assert_allclose(got[sid].positions, w.positions, atol=1e-10)
        assert got[sid].energy == pytest.approx(w.energy, abs=1e-10)
    # the continued structures took only their remaining steps: nothing was relaxed twice
    assert stats2.resumed == {s.sid: n for s, n in zip(snap.structures, snap.steps)}
    assert stats2.evaluations == sum(w.steps + 1 for sid, w in want.items() if sid in second) - sum(snap.steps)


def test_finished_after_the_state_are_dropped(emt_structures, tmp_path):
    cfg = RelaxConfig(fmax=FMAX, steps=STEPS, max_structures=3)
    path = tmp_path / "inflight.0.pt"
    _stopped_run(emt_structures, cfg, path, k=3)
    snap = inflight.load(path, cfg, 0, 1, {s.sid: s for s in emt_structures}, _fresh(cfg))
    gone = snap.structures[1].sid
    less = snap.without({gone})
    assert [s.sid for s in less.structures] == [s.sid for s in snap.structures if s.sid != gone]
    n0 = len(snap.structures[0].numbers)
    n1 = len(snap.structures[1].numbers)
    torch.testing.assert_close(less.positions, torch.cat([snap.positions[:n0], snap.positions[n0 + n1:]]))
    torch.testing.assert_close(less.optimizer_structs["rho"], snap.optimizer_structs["rho"][[0, 2]])


def test_empty_state_removes_the_file(tmp_path):
    path = tmp_path / "inflight.0.pt"
    path.write_bytes(b"old")
    inflight.save(path, inflight.Snapshot([], [], torch.zeros(0, 3, dtype=torch.float64)), RelaxConfig(), 0, 1)
    assert not path.exists()


@pytest.fixture
def state(emt_structures, tmp_path):
    cfg = RelaxConfig(fmax=FMAX, steps=STEPS, max_structures=2)
    path = tmp_path / "inflight.0.pt"
    _stopped_run(emt_structures, cfg, path, k=4)
    return cfg, path


def test_other_input_set_is_refused(emt_structures, state):
    cfg, path = state
    moved = [dataclasses.replace(s, positions=s.positions + 0.01) for s in emt_structures]
    with pytest.raises(inflight.InflightError, match=f"{path}: structure .* differs .*another input set.*--discard-inflight"):
        inflight.load(path, cfg, 0, 1, {s.sid: s for s in moved}, _fresh(cfg))
    with pytest.raises(inflight.InflightError, match="is not in this task's input"):
        inflight.load(path, cfg, 0, 1, {s.sid: s for s in emt_structures[2:]}, _fresh(cfg))


def test_other_settings_or_task_are_refused(emt_structures, state):
    cfg, path = state
    inputs = {s.sid: s for s in emt_structures}
    with pytest.raises(inflight.InflightError, match="fmax 0.02 there, 0.05 here"):
        inflight.load(path, dataclasses.replace(cfg, fmax=0.05), 0, 1, inputs, _fresh(cfg))
    fire = dataclasses.replace(cfg, optimizer="fire")
    with pytest.raises(inflight.InflightError, match="optimizer lbfgs there, fire here"):
        inflight.load(path, fire, 0, 1, inputs, _fresh(fire))
    with pytest.raises(inflight.InflightError, match="written by task 0 of 1, this is task 1 of 2"):
        inflight.load(path, cfg, 1, 2, inputs, _fresh(cfg))
    # batching is not part of a structure's relaxation: another atom budget continues the state
    assert len(inflight.load(path, dataclasses.replace(cfg, max_atoms=50), 0, 1, inputs, _fresh(cfg)).structures) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign", "bad_shape"])
def test_damaged_file_is_refused(emt_structures, state, damage):
    cfg, path = state
    if damage == "garbage":
        path.write_bytes(b"\x00not a torch file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "foreign":
        torch.save({"kind": "something else"}, path)
    else:
        rec = torch.load(path, weights_only=True)
        rec["optimizer_atoms"]["s"] = rec["optimizer_atoms"]["s"][:, :3]
        torch.save(rec, path)
    with pytest.raises(inflight.InflightError) as err:
        inflight.load(path, cfg, 0, 1, {s.sid: s for s in emt_structures}, _fresh(cfg))
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message


def test_trajectory_continues_after_the_state(emt_structures, tmp_path):
    """A continued structure's trajectory keeps the frames up to the state (frames a killed job wrote after it
    are dropped) and appends; one that was not being written starts at the state."""
    import ase.io

    from eqv2.relaxation.results import Trajectories

    s = emt_structures[0]
    traj = Trajectories(tmp_path)
    for k in range(7):  # a killed job wrote 7 frames, its last state was after 4 steps
        traj.frame(s, s.positions + 0.01 * k, float(k), np.zeros_like(s.positions))
    traj.close()
    again = Trajectories(tmp_path)
    again.resume(s.sid, 4)
    again.resume("new", 3)  # no file yet
    again.frame(s, s.positions + 1.0, 10.0, np.zeros_like(s.positions))
    again.close()
    frames = ase.io.read(tmp_path / f"{s.sid}.traj", index=":")
    assert [f.get_potential_energy() for f in frames] == [0.0, 1.0, 2.0, 3.0, 10.0]
    np.testing.assert_allclose(frames[3].get_positions(), s.positions + 0.03)
    assert (tmp_path / "new.traj").exists() and len(ase.io.read(tmp_path / "new.traj", index=":")) == 0
