"""One optimizer step of the trainer: forward, loss, the non-finite/stop agreement, backward, clipping
and the optimizer step over one global step's micro-batches (eqv2/train.py's loop calls `take_step`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from eqv2.batch import AtomsBatch
from eqv2.training.dist import all_reduce_max
from eqv2.training.loss import EnergyForceLoss, global_counts, loss_term_names
from eqv2.training.optim import clip_gradients
from eqv2.training.profiling import phase
from eqv2.training.signals import StopFlag


@dataclass
class StepContext:
    """What every step of a run shares.

    scale: undoes DeepSpeed's mean over ranks and micro-batches (world size x gradient accumulation).
    free_only: the loss counts free atoms only (loss.train_on_free_atoms).
    max_grad_norm: at ZeRO stage 0, the gradient-norm limit the trainer applies before the optimizer
    step (`trainer_clipping`; 0: none)."""
    engine: object  # deepspeed.DeepSpeedEngine
    loss_fn: EnergyForceLoss
    zero_loss: Callable
    stop: StopFlag
    scale: float
    free_only: bool
    device: torch.device
    max_grad_norm: float = 0.0

    @classmethod
    def for_engine(cls, engine, loss_fn: EnergyForceLoss, stop: StopFlag, scale: float, free_only: bool,
                   device: torch.device, max_grad_norm: float = 0.0) -> StepContext:
        return cls(engine, loss_fn, zero_loss_fn(engine), stop, scale, free_only, device, max_grad_norm)


def zero_loss_fn(engine):
    """A loss with exactly zero gradient, back-propagated in place of a non-finite one so that every
    rank runs the same collectives and DeepSpeed's accumulation bookkeeping stays aligned.

    Built from the parameters, not the (possibly inf/NaN) forward graph, whose 0·inf products would
    leak NaN into the gradients.  ZeRO-3 parameters are empty outside their forward; there the outputs
    are used, which is exact for non-finite *targets* (the usual cause)."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    if engine.zero_optimization_stage() == 3:
        return lambda out: (out["energy"].nan_to_num().sum() + out["forces"].nan_to_num().sum()) * 0.0
    return lambda out: sum(p.sum() for p in params) * 0.0


def take_step(ctx: StepContext, micro: list[AtomsBatch], grad_norm_needed: bool = False):
    """One optimizer step over `micro` (this rank's micro-batches).

    Returns (this rank's share of the loss terms by name, `loss_term_names(loss config)`: the loss, the
    energy, force and, with loss.stress_coef > 0, stress terms; global counts [3]; micro-batches skipped;
    stop agreed; gradient norm before clipping or None).  Non-finite micro-batches add nothing to the terms.
    The one host sync per micro-batch: whether any rank's loss is non-finite must be known before the
    backward pass; the same all-reduce carries the stop flag so all ranks stop at the same step.
    """
    engine, loss_fn, stop, scale, max_grad_norm = ctx.engine, ctx.loss_fn, ctx.stop, ctx.scale, ctx.max_grad_norm
    with phase("step_counts"):
        counts = global_counts(micro, ctx.free_only, ctx.device)  # [structures, free atoms, atoms] of the global step
    names = loss_term_names(loss_fn.cfg)
    terms_sum = torch.zeros(len(names), dtype=torch.float64, device=ctx.device)
    skipped, stop_now, grad_norm = 0, False, None
    for batch in micro:
        torch.compiler.cudagraph_mark_step_begin()  # compile.mode=reduce-overhead: earlier outputs may be reused
        with phase("forward"):
            out = engine(batch)
        with phase("loss"):
            loss, terms = loss_fn(out, batch, counts, scale)
        with phase("nonfinite_check"):  # waits for the forward pass to finish on the device
            flags = all_reduce_max(torch.stack([(~torch.isfinite(loss)).float(),
                                                loss.new_full((), float(stop.requested))]))
            bad, stop_flag = (v > 0 for v in flags.tolist())
        stop_now = stop_now or stop_flag
        if bad:
            skipped += 1
            loss = ctx.zero_loss(out)
            if skipped == len(micro):
                # every micro-batch of the step was bad: lr 0 makes AdamW leave the weights exactly as they
                # are (its decoupled decay is scaled by lr too); the next step sets its lr afresh
                for group in engine.optimizer.param_groups:
                    group["lr"] = 0.0
        else:
            terms_sum += torch.stack([terms[k] for k in names]).double()
        with phase("backward"):
            engine.backward(loss)
        if ((grad_norm_needed or max_grad_norm > 0) and engine.zero_optimization_stage() == 0
                and engine.is_gradient_accumulation_boundary()):
            with phase("clip"):  # the gradients are averaged over ranks here
                grad_norm = clip_gradients(engine.module.parameters(), max_grad_norm)
        with phase("optimizer_step"):
            engine.step()
    if grad_norm_needed and engine.zero_optimization_stage() > 0:
        grad_norm = engine.get_global_grad_norm()
    return dict(zip(names, terms_sum.unbind())), counts, skipped, stop_now, grad_norm
