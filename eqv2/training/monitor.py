"""Training progress: periodic log lines, a JSONL record, DeepSpeed's monitor and a progress bar.

Per-step quantities (loss terms, structure/atom counts) accumulate on device; they reach the host only
at the log interval, where one all-reduce + one copy turns them into numbers.  The loss terms are the
ones the run's loss reports (`eqv2.training.loss.loss_term_names`: the loss, the energy and force terms,
and the stress term when loss.stress_coef > 0); each becomes a key of the record under its own name.  Throughput is measured
over the interval with wall-clock time, so it includes data loading and everything else a step costs.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from eqv2.training.dist import all_reduce_max, all_reduce_sum

# the console line's short label of each loss term (a term without one is printed under its own name)
TERM_LABELS = {"energy_mae_norm": "E", "force_l2mae_norm": "F", "stress_l2mae_norm": "S"}
HOST = ("data_wait_s", "new_shape_buckets", "compiles", "cudagraph_records", "compile_s", "gc_full", "gc_s",
        "skipped_samples", "skipped_samples_total")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # CPU: the process's peak resident set (Linux reports KiB)
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except (ImportError, OSError):
        return float("nan")


class StepLogger:
    def __init__(self, run_dir: Path, device: torch.device, is_main: bool, total_steps: int, start_step: int,
                 every: int, progress_bar: bool | None, engine_monitor=None, count_shape_buckets: bool = False,
                 compile_events=None, collector=None, data_stream=None):
        self.device, self.is_main, self.every = device, is_main, every
        self.total_steps = total_steps
        self.monitor = engine_monitor if (engine_monitor is not None and engine_monitor.enabled) else None
        self.jsonl = open(run_dir / "metrics.jsonl", "a") if is_main else None
        self.sinks = []  # more receivers of every record (e.g. training/wandb_log.py), main rank only
        # running sums since the last log line: the loss terms (named by the first add_step), structures,
        # free atoms, atoms, steps, then the host-side HOST counters (joined at the log's reduction)
        self.terms: tuple[str, ...] | None = None
        self.acc: torch.Tensor | None = None
        self.data_wait_s = 0.0  # seconds the loop waited for the data loader
        self.new_shape_buckets = 0  # added by the trainer (ShapeBuckets); summed over ranks
        self.count_shape_buckets = count_shape_buckets
        self.compile_events = compile_events  # eqv2.training.compile.CompileEvents, for compiled models
        self.collector = collector  # eqv2.training.garbage.GarbageCollection
        self.data_stream = data_stream  # eqv2.data.TrainStream: bad samples skipped (data.on_error: skip)
        self.t_last, self.step_last = time.perf_counter(), start_step
        self.t_start, self.step_start = self.t_last, start_step
        show = progress_bar if progress_bar is not None else sys.stderr.isatty()
        self.bar = None
        if show and is_main:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _start(self, names: tuple[str, ...]) -> None:
        self.terms = names
        self.acc = torch.zeros(len(names) + 4 + len(HOST), dtype=torch.float64, device=self.device)

    def add_step(self, terms: dict[str, torch.Tensor], counts: torch.Tensor) -> None:
        """terms: this rank's share of the step's loss terms by name (the same names at every step and
        on every rank); counts: [3] *global* step counts."""
        names = tuple(terms)
        if self.terms is None:
            self._start(names)
        elif names != self.terms:
            raise ValueError(f"StepLogger.add_step: loss terms {names} after {self.terms}")
        t = len(names)
        self.acc[:t] += torch.stack(list(terms.values())).double()
        self.acc[t: t + 3] += counts  # identical on all ranks: divided by world in log()
        self.acc[t + 3] += 1
        if self.bar is not None:
            self.bar.update(1)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def log(self, step: int, epoch: int, lr: float, grad_norm, extra: dict) -> dict:
        """Collective: reduce the interval's sums, write the record on rank 0, reset."""
        if self.terms is None:  # no step added yet: no loss terms to report
            self._start(())
        t = len(self.terms)
        h = t + 4  # acc[h:] are the HOST counters
        counters = {"data_wait_s": self.data_wait_s, "new_shape_buckets": self.new_shape_buckets}
        counters.update(zip(("compiles", "cudagraph_records", "compile_s"),
                            self.compile_events.take() if self.compile_events is not None else (0, 0, 0.0)))
        counters.update(zip(("gc_full", "gc_s"), self.collector.take() if self.collector is not None else (0, 0.0)))
        stream = self.data_stream
        counters.update(skipped_samples=stream.take_skipped() if stream is not None else 0,
                        skipped_samples_total=stream.skipped_total if stream is not None else 0)
        self.acc[h:] = torch.tensor([counters[k] for k in HOST], dtype=torch.float64)
        wait_max = all_reduce_max(torch.tensor([self.data_wait_s], dtype=torch.float64, device=self.device))
        self.data_wait_s, self.new_shape_buckets = 0.0, 0
        sums = all_reduce_sum(self.acc.clone()).tolist()  # the interval's host sync (with wait_max's)
        self.acc.zero_()
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        sums[t:h] = [v / world for v in sums[t:h]]  # counts: the same on every rank
        host = dict(zip(HOST, sums[h:]))  # summed over ranks
        n_steps = max(sums[t + 3], 1.0)
        now = time.perf_counter()
        dt = max(now - self.t_last, 1e-9)
        steps_done = step - self.step_last
        rate = steps_done / dt
        remaining = self.total_steps - step
        record = {"step": step, "epoch": epoch, "lr": lr,
                  **{k: sums[i] / n_steps for i, k in enumerate(self.terms)},
                  "grad_norm": float(grad_norm) if grad_norm is not None else None,  # tensor: syncs here
                  "samples_per_s": sums[t] / dt, "free_atoms_per_s": sums[t + 1] / dt,
                  "atoms_per_s": sums[t + 2] / dt,
                  "steps_per_s": rate, "peak_mem_gib": peak_memory_gib(self.device),
                  # share of the interval the training loop waited for batches (mean over ranks):
                  # near 0 when the loader keeps up with the device
                  "data_wait_frac": host["data_wait_s"] / world / dt,
                  # the same on the rank that waited longest: one slow loader holds every rank back
                  "data_wait_max_frac": float(wait_max) / dt,
                  "eta_s": remaining / rate if rate > 0 else None, **extra}
        if self.count_shape_buckets:  # batches of a shape no earlier batch had, over all ranks
            record["new_shape_buckets"] = int(round(host["new_shape_buckets"]))
        if stream is not None:  # bad samples skipped over all ranks: in this interval, and since the run began
            record.update(skipped_samples=int(round(host["skipped_samples"])),
                          skipped_samples_total=int(round(host["skipped_samples_total"])))
        if self.collector is not None:  # Python's garbage collections in the interval, over all ranks
            record.update(gc_full=int(round(host["gc_full"])), gc_s=host["gc_s"])
        if self.compile_events is not None and self.compile_events.available:
            # what the compiler did in the interval, over all ranks; its seconds are not training speed
            record.update(compiles=int(round(host["compiles"])), cudagraph_records=int(round(host["cudagraph_records"])),
                          compile_s=host["compile_s"])
        self.t_last, self.step_last = now, step
        if self.is_main:
            self.write(record)
            parts = " ".join(f"{TERM_LABELS.get(k, k)} {record[k]:.4f}" for k in self.terms if k != "loss")
            msg = (f"step {step}/{self.total_steps} ep {epoch}"
                   + (f" loss {record['loss']:.4f}" if "loss" in record else "") + (f" ({parts})" if parts else "")
                   + f" lr {lr:.3e} "
                   f"gnorm {record['grad_norm'] if record['grad_norm'] is None else round(record['grad_norm'], 3)} "
                   f"{record['samples_per_s']:.1f} samples/s {record['atoms_per_s']:.0f} atoms/s "
                   f"mem {record['peak_mem_gib']:.2f} GiB eta {_fmt_eta(record['eta_s'])}"
                   + (f" new shape buckets {record['new_shape_buckets']}" if record.get("new_shape_buckets") else "")
                   + (f" compiled {record['compiles']}+{record['cudagraph_records']} ({record['compile_s']:.1f} s)"
                      if record.get("compiles") or record.get("cudagraph_records") else ""))
            self.print(msg)
            if self.monitor is not None:
                events = [(f"Train/{k}", v, step) for k, v in record.items()
                          if isinstance(v, float) and k not in ("epoch",)]
                events += [(f"Train/{k}", float(record[k]), step) for k in ("skipped_samples", "skipped_samples_total")
                           if k in record]
                self.monitor.write_events(events)
        return record

    def log_eval(self, step: int, split: str, metrics: dict) -> None:
        if not self.is_main:
            return
        self.write({"step": step, "split": split, **metrics})
        self.print(f"eval {split} step {step}: " + " ".join(
            f"{k} {v:.5g}" for k, v in metrics.items() if k != "num_structures")
            + f" ({int(metrics['num_structures'])} structures)")
        if self.monitor is not None:
            self.monitor.write_events([(f"Val/{split}/{k}", v, step) for k, v in metrics.items()])

    def write(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for sink in self.sinks:
            sink.write(record)

    def print(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.compile_events is not None:
            self.compile_events.close()
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        for sink in self.sinks:
            sink.close()


def _fmt_eta(seconds) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def run_summary(run_dir: Path, ckpt_dir: Path, step: int, seconds: float, latest: str | None) -> str:
    """The end-of-run lines: how long, where the checkpoints and metrics are, the best step, what next."""
    hours, rest = divmod(int(seconds), 3600)
    lines = [f"eqv2.train: finished at step {step} after {hours}:{rest // 60:02d}:{rest % 60:02d} in this launch",
             f"  checkpoints: {ckpt_dir} (latest {latest or 'none'})"]
    best = ckpt_dir / "best.json"
    if best.is_file():
        try:
            rec = json.loads(best.read_text())
            lines.append(f"  best validation: {rec['tag']} ({rec['metric']} {rec['value']:.5g})")
        except (ValueError, KeyError, TypeError):
            pass
    lines += [f"  metrics: {run_dir / 'metrics.jsonl'}",
              f"  next: eqv2 export {ckpt_dir} -o model.pt [--best]; eqv2 plot {run_dir}"]
    return "\n".join(lines)
