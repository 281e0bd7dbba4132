#!/usr/bin/env python
"""Multi-GPU weak scaling of the full trainer (issue 7).

Weak scaling: for each rank count N, `eqv2/train.py` runs the same config with the same micro-batch
per rank (global batch grows with N) for `--steps` optimizer steps; throughput is read from the run's
metrics.jsonl (global samples/s of each logging interval, after `--skip` steps of warm-up and
compilation, leaving out an interval with profiled steps) and reported per rank, with the efficiency
against the smallest N.  With shape buckets (CUDA graphs) each batch of a shape not seen before costs a
graph recording on its rank, and every rank waits for it at the next all-reduce; the trainer logs
these per interval, with the compilations and CUDA-graph recordings torch reports, and the steady-state
columns average only the intervals in which no rank met any of them.  The quiet columns also leave out
intervals in which some rank ran a full Python garbage collection (a real cost, which the steady
columns keep: without `gc.freeze` about 1 s each on an H200, and every rank waits for it).

The 1-vs-N equivalence is not measured here: ranks read disjoint shards, so N ranks and one rank
with accumulation see different samples.  tests/train/test_engine_equivalence.py feeds both layouts
the same global batches through the trainer's step function; on a multi-GPU machine it runs on NCCL.

Ranks are started the way torchrun/srun do (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_* in the environment;
rank r uses cuda:r), so the same tool runs on one multi-GPU node or, for testing, as CPU processes.

    python -m bench.scaling --ranks 1 2 4 8 --ds_config ds_configs/zero2_bf16.json \
        --config configs/train/oc20_all_md_153M.yaml --data /tmp/oc20 --micro-batch 8 --steps 60 --skip 20 \
        --out scaling.json [--set key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "eqv2" / "train.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def launch(nproc: int, args: list[str], log: Path, timeout: float) -> float:
    """Run `nproc` trainer ranks to completion; returns wall seconds.  Raises with the log's tail if a
    rank fails or the run outlasts `timeout`.  Every rank still running is killed when this returns or
    raises, also when the tool itself is stopped by SIGTERM (`timeout`, `scancel`) or Ctrl-C: ranks
    left behind would hold their GPUs and ports and hang or fail the next launch."""
    port = _free_port()
    procs = []
    start = time.perf_counter()
    with open(log, "w") as out:
        for rank in range(nproc):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
            procs.append(subprocess.Popen([sys.executable, str(TRAIN), *args], env=env, cwd=ROOT,
                                          stdout=out, stderr=subprocess.STDOUT))
        try:
            codes = [p.wait(timeout=max(1.0, timeout - (time.perf_counter() - start))) for p in procs]
        except subprocess.TimeoutExpired:
            codes = None
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    if codes is None or any(codes):
        tail = "\n".join(log.read_text().splitlines()[-30:])
        why = f"timed out after {timeout:.0f} s" if codes is None else f"exit codes {codes}"
        raise RuntimeError(f"{nproc}-rank run {why}; log {log}:\n{tail}")
    return time.perf_counter() - start


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise RuntimeError(f"{path} was not written: did the run log any step?")
    by_step = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "split" not in rec:
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def write_ds_config(path: Path, base: Path, micro_batch: int | None) -> Path:
    """The engine config with the micro-batch per rank and no gradient accumulation (weak scaling)."""
    ds = json.loads(base.read_text())
    if micro_batch is not None:
        ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = 1
    path.write_text(json.dumps(ds, indent=2))
    return path


def run_args(args, run_dir: Path, ds_config: Path) -> list[str]:
    sets = [f"run_dir={run_dir}", f"optim.max_steps={args.steps}", "optim.max_epochs=null",
            f"optim.warmup_steps={max(1, args.steps // 10)}", "optim.warmup_epochs=null",
            f"log.every_steps={args.log_every}", "log.progress_bar=false", "eval.every_steps=0",
            "eval.max_batches=1", f"checkpoint.every_steps={10 ** 9}", "checkpoint.save_at_end=false",
            "checkpoint.save_best=false"]
    if args.data:
        data = Path(args.data)
        sets += [f"data.train_manifest={data / 'train' / 'manifest.json'}",
                 f"data.val_manifest={data / 'val' / 'manifest.json'}"]
    out = ["--ds_config", str(ds_config), "--config", args.config]
    for s in sets + args.set:
        out += ["--set", s]
    return out


def timed_intervals(records: list[dict], skip: int, log_every: int, profiled: tuple[int, int] | None) -> list[dict]:
    """The logging intervals to time: those after the first `skip` steps, and none that contains a step
    run under the profiler (`log.profile_steps`: its overhead is not training speed)."""
    out = []
    for rec in records:
        first, last = rec["step"] - log_every + 1, rec["step"]
        if first <= skip:
            continue
        if profiled is not None and first <= profiled[1] and profiled[0] <= last:
            continue
        out.append(rec)
    return out


def profiled_steps(sets: list[str]) -> tuple[int, int] | None:
    """(first, last) of `--set log.profile_steps=[first,last]`, if given."""
    for item in sets:
        key, _, value = item.partition("=")
        if key == "log.profile_steps":
            first, last = (int(v) for v in value.strip("[] ").split(","))
            return first, last
    return None


def weak_scaling(args, work: Path) -> list[dict]:
    rows = []
    for n in args.ranks:
        run_dir = work / f"weak_{n}"
        run_dir.mkdir(parents=True, exist_ok=True)
        # the trainer appends to metrics.jsonl: records of an earlier run in the same --work directory
        # (more steps, another interval) would be read as this run's
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        ds = write_ds_config(run_dir / "ds_in.json", Path(args.ds_config), args.micro_batch)
        wall = launch(n, run_args(args, run_dir, ds), run_dir / "log.txt", args.timeout)
        timed = timed_intervals(train_records(run_dir), args.skip, args.log_every, profiled_steps(args.set))
        if not timed:
            raise RuntimeError(f"{n} ranks: no logging interval after --skip {args.skip} steps and outside "
                               f"log.profile_steps; raise --steps or lower --skip / --log-every")
        row = {"ranks": n, **summarise(timed, n), "wall_s": wall}
        if (run_dir / "startup.json").is_file():  # launch to first step by phase (training/startup.py)
            row["startup"] = json.loads((run_dir / "startup.json").read_text())
        rows.append(row)
        steady = ""
        if row.get("steady_intervals"):
            steady = (f"; steady state {row['steady_samples_per_s_per_rank']:.2f} per rank over "
                      f"{row['steady_intervals']} of {row['intervals']} intervals")
        elif "steady_intervals" in row:
            steady = "; every interval met a new shape bucket, a compilation or a CUDA-graph recording"
        if row.get("quiet_intervals"):
            steady += (f"; quiet {row['quiet_samples_per_s_per_rank']:.2f} per rank over {row['quiet_intervals']} "
                       f"(full collections: {row['gc_full']}, {row['gc_s']:.1f} s in all collections)")
        worst = (f" (worst rank and interval {100 * row['data_wait_max_frac']:.1f} %)"
                 if "data_wait_max_frac" in row else "")
        print(f"{n} rank(s): {row['samples_per_s']:.2f} samples/s, {row['samples_per_s_per_rank']:.2f} per rank, "
              f"peak {row['peak_mem_gib_rank0']:.1f} GiB on rank 0, data wait {100 * row['data_wait_frac']:.1f} %"
              f"{worst}{steady} ({wall:.0f} s)", flush=True)
    for row in rows:
        row["efficiency"] = row["samples_per_s_per_rank"] / rows[0]["samples_per_s_per_rank"]
        for kind in ("steady", "quiet"):
            key = f"{kind}_samples_per_s_per_rank"
            if row.get(key) and rows[0].get(key):
                row[f"{kind}_efficiency"] = row[key] / rows[0][key]
    return rows


# per-interval counts the trainer logs (summed over ranks) that make an interval not steady state: a
# batch of a new padded shape, a Dynamo or backward compilation, a CUDA-graph recording
STEADY_KEYS = ("new_shape_buckets", "compiles", "cudagraph_records")


def summarise(timed: list[dict], ranks: int) -> dict:
    """Means over the timed intervals; where the run logs STEADY_KEYS, also over the steady ones (no
    rank met a new shape, compiled or recorded a CUDA graph in them), and where it logs `gc_full`, over
    the quiet ones (steady, and no rank ran a full garbage collection): steady includes what collections
    cost, quiet shows what the ranks' work and communication alone allow."""
    def mean(key, recs):
        return sum(r[key] for r in recs) / len(recs)

    sps = mean("samples_per_s", timed)
    out = {"samples_per_s": sps, "samples_per_s_per_rank": sps / ranks, "atoms_per_s": mean("atoms_per_s", timed),
           "peak_mem_gib_rank0": max(r["peak_mem_gib"] for r in timed),
           "data_wait_frac": mean("data_wait_frac", timed), "intervals": len(timed)}
    if all("data_wait_max_frac" in r for r in timed):  # the slowest rank's loader
        out["data_wait_max_frac"] = max(r["data_wait_max_frac"] for r in timed)
    counted = [k for k in STEADY_KEYS if all(k in r for r in timed)]
    if counted:
        steady = [r for r in timed if not any(r[k] for k in counted)]
        for k in counted:
            out[k] = sum(r[k] for r in timed)
        out["steady_intervals"] = len(steady)
        out["steady_samples_per_s_per_rank"] = mean("samples_per_s", steady) / ranks if steady else None
        if all("gc_full" in r for r in timed):  # quiet: steady, and no rank ran a full garbage collection
            quiet = [r for r in steady if not r["gc_full"]]
            out["gc_full"], out["gc_s"] = sum(r["gc_full"] for r in timed), sum(r["gc_s"] for r in timed)
            out["quiet_intervals"] = len(quiet)
            out["quiet_samples_per_s_per_rank"] = mean("samples_per_s", quiet) / ranks if quiet else None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", nargs="+", type=int, required=True, help="rank counts, e.g. 1 2 4 8 (one GPU each)")
    p.add_argument("--ds_config", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--data", help="dataset root with train/ and val/ manifests (bench/make_oc20_sized_data.py)")
    p.add_argument("--micro-batch", type=int, help="structures per rank and micro-batch (default: the ds_config's)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=20, help="steps not timed (warm-up, compilation)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to eqv2/train.py")
    p.add_argument("--work", default="runs/scaling", help="run directories and logs")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per launch")
    p.add_argument("--out", type=Path, help="results JSON")
    args = p.parse_args(argv)
    if sorted(args.ranks) != args.ranks or args.ranks[0] < 1:
        p.error(f"--ranks must be increasing positive counts, got {args.ranks}")
    if any(item.partition("=")[0] == "log.every_steps" for item in args.set):
        p.error("set the logging interval with --log-every (the timed intervals are counted in it), "
                "not --set log.every_steps")
    signal.signal(signal.SIGTERM, _terminated)  # SIGTERM unwinds through launch(), which kills the ranks
    work = Path(args.work)
    result = {"weak_scaling": weak_scaling(args, work)}
    print("| ranks | samples/s | per rank | efficiency | steady per rank (intervals) | steady efficiency | "
          "quiet per rank (intervals) | quiet efficiency | peak GiB | data wait |")
    for row in result["weak_scaling"]:
        cells = []
        for kind in ("steady", "quiet"):
            per_rank, eff = row.get(f"{kind}_samples_per_s_per_rank"), row.get(f"{kind}_efficiency")
            cells.append(f"{per_rank:.2f} ({row[f'{kind}_intervals']}/{row['intervals']})" if per_rank else "–")
            cells.append(f"{100 * eff:.1f} %" if eff else "–")
        print(f"| {row['ranks']} | {row['samples_per_s']:.2f} | {row['samples_per_s_per_rank']:.2f} | "
              f"{100 * row['efficiency']:.1f} % | {' | '.join(cells)} | {row['peak_mem_gib_rank0']:.1f} | "
              f"{100 * row['data_wait_frac']:.1f} % |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
