"""Real DeepSpeed, real processes: layouts that must give the same training trajectory.

- ZeRO-3 and activation checkpointing (with dropout on) reproduce the plain data-parallel run exactly:
  same per-step losses and the same weights after three AdamW steps.
- 2 ranks under ZeRO-2 reproduce 1 rank with 2-step gradient accumulation on the same global batches,
  whose structures differ in size so each rank holds a different number of (free) atoms: only a loss
  normalised by global counts makes the two agree.
- Gradient clipping that engages at every step: the trainer's own clipping at ZeRO-0 reproduces
  DeepSpeed's clipping at ZeRO-1 (each rank clipping its partition by the all-reduced norm).
"""
from pathlib import Path

import pytest
import torch

from tests.train.conftest import run_worker

WORKER = Path(__file__).with_name("engine_worker.py")


def launch(nproc: int, out: Path, specs: list[str]) -> dict:
    run_worker(WORKER, nproc, [str(out), *specs])
    return torch.load(out)


def assert_same_run(a: dict, b: dict, atol: float) -> None:
    """Same skips, same per-step losses, same final weights.

    On CPU the weights agree element by element.  On a GPU two layouts differ in the last bit of some
    sums (the 1-rank and 2-rank step-0 losses differed by 1 ulp on an H200, deterministic kernels on),
    and AdamW's first steps, lr * g / |g|, turn a last-bit change of a near-zero gradient element into a
    visible change of that weight.  There the weights are compared per tensor, as the norm of the
    difference against the norm of the tensor's movement in training."""
    assert a["skipped"] == b["skipped"] == [0, 0, 0]
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    worst = 0.0
    for name, value in a["params"].items():
        diff = (b["params"][name] - value).abs().max().item()
        if a["device"] == "cpu":
            torch.testing.assert_close(b["params"][name], value, atol=atol, rtol=1e-5,
                                       msg=f"{name}: max abs difference {diff:.3g}")
            continue
        moved = (value - a["init"][name]).norm().item()
        rel = (b["params"][name] - value).norm().item() / max(moved, 1e-12)
        worst = max(worst, rel)
        assert rel < 1e-2, f"{name}: |difference| / |movement| = {rel:.3g} (max abs difference {diff:.3g})"
    print(f"largest per-tensor |difference| / |movement|: {worst:.3g}")


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("eq") / "two.pt"
    return launch(2, out, ["0,1,0,1", "3,1,0,1", "0,1,1,1", "2,1,0,0", "2,1,0,0,nan", "0,1,0,0,clip", "1,1,0,0,clip",
                              "3,1,0,0,pad"])


def test_zero3_matches_plain(two_rank_runs):
    assert_same_run(two_rank_runs["0,1,0,1"], two_rank_runs["3,1,0,1"], atol=1e-6)


def test_shape_buckets_under_zero3_match_plain(two_rank_runs):
    """The plan's bucket hooks on the engine's module, its parameters partitioned: the unpadded trajectory."""
    assert_same_run(two_rank_runs["2,1,0,0"], two_rank_runs["3,1,0,0,pad"], atol=1e-6)


def test_activation_checkpointing_matches_plain(two_rank_runs):
    assert_same_run(two_rank_runs["0,1,0,1"], two_rank_runs["0,1,1,1"], atol=1e-6)


def test_two_ranks_zero2_match_one_rank_with_accumulation(two_rank_runs, tmp_path):
    one = launch(1, tmp_path / "one.pt", ["0,2,0,0"])["0,2,0,0"]
    two = two_rank_runs["2,1,0,0"]
    assert_same_run(two, one, atol=1e-5)
    # the weights did move: the comparison is not between two untouched initialisations
    moved = max((two["params"][n] - two["init"][n]).abs().max().item() for n in two["init"])
    assert moved > 1e-3


def test_trainer_clipping_at_zero0_matches_deepspeed_clipping_at_zero1(two_rank_runs):
    ours, theirs = two_rank_runs["0,1,0,0,clip"], two_rank_runs["1,1,0,0,clip"]
    assert_same_run(ours, theirs, atol=1e-6)
    # the limit did engage: unclipped, the same steps move the weights elsewhere
    unclipped = two_rank_runs["2,1,0,0"]
    assert max((unclipped["params"][n] - ours["params"][n]).abs().max().item() for n in ours["params"]) > 1e-3


def test_trainer_clipping_acts_on_the_accumulated_gradient(two_rank_runs, tmp_path):
    """ZeRO-0 with an engaging limit: 1 rank accumulating 2 micro-batches clips once, at the boundary,
    the gradient of the whole global batch, as 2 ranks do (clipping each micro-batch would differ)."""
    one = launch(1, tmp_path / "one_clip.pt", ["0,2,0,0,clip"])["0,2,0,0,clip"]
    assert_same_run(two_rank_runs["0,1,0,0,clip"], one, atol=1e-5)


def test_nonfinite_loss_on_one_rank_skips_the_step_on_all(two_rank_runs):
    run = two_rank_runs["2,1,0,0,nan"]
    assert run["skipped"] == [0, 1, 0]  # counted on every rank, not only where the NaN was
    assert run["losses"][1] == 0.0  # the bad micro-batch contributes no loss terms
    for name, before in run["after"][0].items():  # the weights did not move in the bad step ...
        assert torch.equal(run["after"][1][name], before), name
    moved = max((run["after"][2][n] - run["after"][1][n]).abs().max().item() for n in run["after"][1])
    assert moved > 1e-4  # ... and training went on afterwards
    assert all(torch.isfinite(v).all() for v in run["params"].values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_under_zero2_match_eager(tmp_path):
    """The trainer's step (DeepSpeed ZeRO-2, gradient hooks, 2-step accumulation) with compiled blocks
    replayed as CUDA graphs over shape buckets trains like the same padded model run eagerly: graph-owned
    outputs and gradients are consumed before the next replay overwrites them."""
    runs = launch(1, tmp_path / "cg.pt", ["2,2,0,0,pad", "2,2,0,0,cudagraphs"])
    assert_same_run(runs["2,2,0,0,pad"], runs["2,2,0,0,cudagraphs"], atol=1e-5)

