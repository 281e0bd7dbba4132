"""`eqv2 <verb>`: the product's commands, one console script.

Each verb is a module of the package with a `main(argv) -> int`; `eqv2 <verb> --help` shows its
options and examples. Training is launched by a launcher, not by this command:
`deepspeed eqv2/train.py ...` or `deepspeed --module eqv2.train ...` (docs/training.md).
"""
from __future__ import annotations

import difflib
import importlib
import sys

# verb -> (module, what it does, an example).  A new verb is one line here and a module with main(argv).
VERBS: dict[str, tuple[str, str, str]] = {
    "demo-data": ("eqv2.tools.demo_data", "build the EMT demo dataset (OC20 raw layout and shards)",
                  "eqv2 demo-data --out data/demo"),
    "shard": ("eqv2.tools.shard", "shard OC20's raw S2EF files (*.extxyz[.xz] + *.txt)",
              "eqv2 shard s2ef_train_2M/ data/s2ef_2M/train --workers 16 --shard-bytes 256M --subtract-reference"),
    "shard-lmdb": ("eqv2.tools.shard_lmdb", "shard fairchem/OCP S2EF LMDBs",
                   "eqv2 shard-lmdb s2ef/2M/train/ data/s2ef_2M/train --workers 16 --shard-bytes 256M"),
    "shard-ase": ("eqv2.tools.shard_ase", "shard any ASE-readable dataset (extxyz, db, traj), with a val split",
                  "eqv2 shard-ase my_dft/ data/mine --shard-bytes 256M --val-fraction 0.1"),
    "inspect": ("eqv2.tools.inspect_shards", "verify shards against their manifest and print a few samples",
                "eqv2 inspect data/demo/train/manifest.json --show 2"),
    "stats": ("eqv2.tools.stats", "(re)compute a shard set's stats.json (normalisers, avg_degree on a graph)",
              "eqv2 stats data/demo/train/manifest.json --max-radius 6 --max-neighbors 12 --out stats.json"),
    "export": ("eqv2.tools.export", "a training checkpoint as a model file (EMA or live weights)",
               "eqv2 export runs/demo/checkpoints -o demo.pt"),
    "convert": ("eqv2.tools.convert", "a fairchem/OCP EquiformerV2 checkpoint as a model file",
                "eqv2 convert eq2_153M_ec4_allmd.pt eqv2_153M_allmd.pt"),
    "predict": ("eqv2.predict", "energies and forces of every frame of an ASE-readable file",
                "eqv2 predict --checkpoint model.pt --input structures.extxyz --output pred.npz"),
    "evaluate": ("eqv2.evaluate", "S2EF metrics of a model or run checkpoint on sharded splits (any launcher)",
                 "eqv2 evaluate --checkpoint model.pt --split val_id=data/val_id/manifest.json --json val.json"),
    "relax": ("eqv2.relax", "batched relaxations (IS2RS/IS2RE) of LMDB, shard or ASE inputs; resumable; metrics",
              "eqv2 relax --checkpoint model.pt --input is2re_val_id/data.lmdb --output relax/val_id"),
    "plot": ("eqv2.plot", "PNG curves of a run: loss terms, validation metrics, throughput, lr",
             "eqv2 plot runs/demo"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: eqv2 <verb> [options]   (eqv2 <verb> --help for a verb's options)", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {what}\n  {'':<{width}}    e.g. {example}" for verb, (_, what, example) in VERBS.items()]
    lines += ["", "training: deepspeed eqv2/train.py --ds_config DS.json --config RUN.yaml [--set key=value] "
                  "[--resume auto]"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        close = difflib.get_close_matches(verb, VERBS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; verbs: {', '.join(VERBS)}"
        print(f"eqv2: unknown verb '{verb}'{hint}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
