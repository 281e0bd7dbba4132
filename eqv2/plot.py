"""Plot a run: training loss terms, validation metrics, throughput and learning rate as PNG curves.

    eqv2 plot runs/demo                      # -> runs/demo/plots/{loss,validation,throughput,lr}.png
    eqv2 plot runs/demo --out figs --log-y   # another folder; loss and validation on a log axis

Reads `<run_dir>/metrics.jsonl` (the records the trainer appends every `log.every_steps` and at every
evaluation); a resumed run's records are plotted once per step (the latest record of a step wins, as a
resume repeats no step). Earlier attempts set aside as `metrics.attemptN.jsonl` are not plotted.
Needs matplotlib (`pip install eqv2[plot]`).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

# the terms a run logs (stress only with loss.stress_coef > 0; a curve without records is not drawn)
LOSS_KEYS = ("loss", "energy_mae_norm", "force_l2mae_norm", "stress_l2mae_norm")
VAL_KEYS = ("energy_mae", "forces_mae", "forces_cos", "energy_forces_within_threshold", "stress_mae")
# the baseline drawn beside a metric: the first of these the records carry
BASELINE_KEYS = {"energy_mae": ("energy_mae_mean_baseline", "energy_mae_zero_baseline"),
                 "forces_mae": ("forces_mae_zero_baseline",)}


class PlotError(ValueError):
    """A run directory that cannot be plotted; the message names the file."""


def read_metrics(run_dir: Path) -> tuple[list[dict], dict[str, list[dict]]]:
    """(training records by step, {split: evaluation records by step}) from metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: not found (is {run_dir} a run directory?)")
    train: dict[int, dict] = {}
    evals: dict[str, dict[int, dict]] = defaultdict(dict)
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, KeyError, TypeError) as err:
            raise PlotError(f"{path} line {number}: not a metrics record ({err})") from None
        (evals[rec["split"]] if "split" in rec else train)[step] = rec
    if not train and not evals:
        raise PlotError(f"{path}: no records yet")
    ordered = lambda recs: [recs[s] for s in sorted(recs)]  # noqa: E731
    return ordered(train), {split: ordered(recs) for split, recs in evals.items()}


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [float(p[1]) for p in points]


def plot_run(run_dir: Path, out: Path, log_y: bool = False) -> list[Path]:
    """Write the PNGs for which the run has records; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    train, evals = read_metrics(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def figure(name: str, panels: list[tuple[str, list[tuple[str, list[int], list[float], str]]]], log: bool):
        panels = [(title, [c for c in curves if c[1]]) for title, curves in panels]
        panels = [p for p in panels if p[1]]
        if not panels:
            return
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
        for ax, (title, curves) in zip(axes[0], panels):
            for label, x, y, style in curves:
                ax.plot(x, y, style, label=label, markersize=3)
            ax.set_title(title)
            ax.set_xlabel("step")
            if log and all(v > 0 for _, _, y, _ in curves for v in y):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(str(run_dir), fontsize=9)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    figure("loss", [("training loss (normalised)", [(k, *_series(train, k), "-") for k in LOSS_KEYS])], log_y)
    panels = []
    for key in VAL_KEYS:
        curves = []
        for split, recs in evals.items():
            curves.append((split, *_series(recs, key), "o-"))
            base = next((b for b in BASELINE_KEYS.get(key, ()) if any(b in r for r in recs)), None)
            if base:
                curves.append((f"{split} {base.removeprefix(key + '_')}", *_series(recs, base), "--"))
        panels.append((f"validation {key}", curves))
    figure("validation", panels, log_y)
    figure("throughput", [("samples/s", [("samples/s", *_series(train, "samples_per_s"), "-")]),
                          ("atoms/s", [("atoms/s", *_series(train, "atoms_per_s"), "-")])], False)
    figure("lr", [("learning rate", [("lr", *_series(train, "lr"), "-")]),
                  ("gradient norm (before clipping)", [("grad_norm", *_series(train, "grad_norm"), "-")])], False)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eqv2 plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory (holding metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: RUN_DIR/plots)")
    parser.add_argument("--log-y", action="store_true", help="loss and validation metrics on a log axis")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("eqv2 plot: needs matplotlib (pip install 'eqv2[plot]')", file=sys.stderr)
        return 2
    try:
        written = plot_run(args.run_dir, args.out or args.run_dir / "plots", args.log_y)
    except PlotError as err:
        print(f"eqv2 plot: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
