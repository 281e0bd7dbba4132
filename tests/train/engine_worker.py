"""Worker for the engine-equivalence tests, started under torchrun with real DeepSpeed.

Trains the real EquiformerV2 (tiny) for a few optimizer steps on fixed synthetic structures with the
trainer's own step function, loss, optimizer groups and activation checkpointing, then writes the
per-step losses and the full fp32 parameters (gathered under ZeRO-3) to OUT, one entry per run spec.
Usage: engine_worker.py OUT SPEC [SPEC ...], SPEC = "stage,grad_accum,activation_ckpt(0/1),dropout(0/1)"
with an optional ",nan": step 1 then carries a NaN energy target in the last rank's last micro-batch,
",clip" (a gradient-norm limit of 1e-3, which every step hits; at stage 0 the trainer applies it, at
stages 1-3 DeepSpeed), or ",pad" (shape buckets, no compilation) or ",cudagraphs" (shape buckets and compilation with CUDA
graphs, as `compile.mode: reduce-overhead`; CUDA only), or ",gradient" (model.forces: gradient, the
force and stress losses through the double backward; the structures carry stress targets), or ",compile" (the
blocks and heads compiled, Inductor, as the trainer's build_model does at that ZeRO stage: under ZeRO-3 as
leaf modules; with activation_ckpt 1, blocks 0, 2, ... are checkpointed around their compiled forward).
Several specs share one process group, which saves the start-up of a launch per configuration.
"""
import os
import sys

import numpy as np

# on a GPU the scatter sums (index_add) use atomics, so two runs of one layout differ in the last bits,
# and AdamW (lr 1e-2, 3 steps) turns that into visible weight differences on parameters whose
# gradient is near zero; deterministic kernels make the comparison between layouts, not between runs
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import torch  # noqa: E402

if torch.cuda.is_available():
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


import deepspeed  # noqa: E402

from eqv2.batch import AtomsBatch  # noqa: E402
from eqv2.execution import ExecutionPlan, apply_plan  # noqa: E402
from eqv2.model.config import ModelConfig  # noqa: E402
from eqv2.model.equiformer_v2 import EquiformerV2  # noqa: E402
from eqv2.training.step import StepContext, take_step  # noqa: E402
from eqv2.training.activation_checkpointing import ActivationCheckpointConfig, apply_activation_checkpointing  # noqa: E402
from eqv2.training.compile import CompileConfig, apply_compile  # noqa: E402
from eqv2.training.dist import exit_process, init_distributed, shutdown  # noqa: E402
from eqv2.training.loss import EnergyForceLoss, LossConfig, Normalizers  # noqa: E402
from eqv2.training.optim import OptimConfig, build_optimizer, trainer_clipping  # noqa: E402
from eqv2.training.signals import StopFlag  # noqa: E402

TINY = dict(num_layers=2, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8, num_heads=2,
            attn_alpha_channels=4, attn_value_channels=4, ffn_hidden_channels=8, edge_channels=8,
            num_distance_basis=16, grid_resolution=None, max_radius=4.0, max_neighbors=8,
            alpha_drop=0.1, drop_path_rate=0.1)
STEPS = 3
STRUCTS_PER_STEP = 8  # global structures per optimizer step, split over ranks and micro-batches


def structures(step: int) -> list[dict]:
    """The same global batch for every layout: structures of different sizes, some fixed atoms."""
    rng = np.random.default_rng(100 + step)
    out = []
    for k in range(STRUCTS_PER_STEP):
        n = 3 + (k * 5 + step) % 7
        out.append(dict(positions=rng.uniform(0, 4, (n, 3)), numbers=rng.integers(1, 20, n), cell=np.eye(3) * 4,
                        pbc=np.ones(3, bool), energy=rng.normal(), forces=rng.normal(size=(n, 3)),
                        fixed=np.arange(n) == 0, stress=rng.normal(size=(3, 3)) * 0.01))
    return out


def run(spec: str, dist) -> dict:
    fields = spec.split(",")
    stage, gas, ac, dropout = (int(v) for v in fields[:4])
    nan_step = 1 if fields[4:] == ["nan"] else None
    padded = fields[4:] in (["pad"], ["cudagraphs"])
    gradient = fields[4:] == ["gradient"]
    if torch.cuda.is_available():  # Inductor's deterministic fallbacks are not meant for graph capture
        torch.use_deterministic_algorithms(fields[4:] != ["cudagraphs"])
    torch.manual_seed(0)
    model = EquiformerV2(ModelConfig(**{**TINY, **({} if dropout else {"alpha_drop": 0.0, "drop_path_rate": 0.0}),
                                        **({"forces": "gradient"} if gradient else {})}))
    if padded:
        apply_plan(model, ExecutionPlan(pad_atoms_multiple=16, pad_edges_multiple=64))
    if fields[4:] == ["cudagraphs"]:
        apply_compile(model, CompileConfig(enabled=True, mode="reduce-overhead"))
    if fields[4:] == ["compile"]:
        torch._dynamo.reset()
        apply_compile(model, CompileConfig(enabled=True), zero_stage=stage)
    # compiled: every other block, so that checkpointed and plain compiled blocks both run
    every = 2 if fields[4:] == ["compile"] else 1
    apply_activation_checkpointing(model, ActivationCheckpointConfig(enabled=bool(ac), every=every))
    ds = {"train_micro_batch_size_per_gpu": STRUCTS_PER_STEP // (gas * dist.world_size),
          "gradient_accumulation_steps": gas, "gradient_clipping": 1e-3 if fields[4:] == ["clip"] else 100.0,
          "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    optim_cfg = OptimConfig(lr=1e-2, max_steps=STEPS)
    ds, max_grad_norm = trainer_clipping(ds)  # as train.py
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, optim_cfg), config=ds)
    loss_fn = EnergyForceLoss(LossConfig(stress_coef=10.0 if gradient else 0.0), Normalizers(0.0, 1.0, 1.0))
    losses, init, skipped_per_step, after, grad_norms = [], gather(engine, stage), [], [], []
    per = STRUCTS_PER_STEP // (gas * dist.world_size)
    for step in range(STEPS):
        structs = structures(step)
        if step == nan_step:
            structs[-1]["energy"] = float("nan")
        # rank r takes micro-batches r, r+world, ...: a different atom layout per rank count
        micro = []
        for m in range(gas):
            chunk = m * dist.world_size + dist.rank
            micro.append(AtomsBatch.from_arrays(structs[chunk * per:(chunk + 1) * per]).to(dist.device))
        for group in engine.optimizer.param_groups:  # as train.py: the lr is set at every step
            group["lr"] = optim_cfg.lr
        torch.manual_seed(1000 + step * 10 + dist.rank)
        terms, counts, skipped, _, grad_norm = take_step(
            StepContext.for_engine(engine, loss_fn, StopFlag(), float(dist.world_size * gas), True, dist.device,
                                   max_grad_norm), micro, grad_norm_needed=gradient)
        skipped_per_step.append(skipped)
        grad_norms.append(None if grad_norm is None else float(grad_norm))
        if nan_step is not None:
            after.append(gather(engine, stage))
        total = terms["loss"].clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item())
    return {"losses": losses, "params": gather(engine, stage), "init": init, "skipped": skipped_per_step,
            "after": after, "device": dist.device.type, "grad_norms": grad_norms}


def gather(engine, stage: int) -> dict:
    params = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=stage == 3):
            params[name] = p.detach().float().cpu().clone()
    return params


if __name__ == "__main__":
    dist_info = init_distributed()
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    results = {spec: run(spec, dist_info) for spec in argv[1:]}
    if dist_info.rank == 0:
        torch.save(results, argv[0])
    shutdown(clean=True)
    exit_process(0)  # without interpreter finalisation (eqv2/training/dist.py says why)
