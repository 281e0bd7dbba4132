"""`DataConfig`: the `data:` section of a run config, the only config the data pipeline sees."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from eqv2.data.validate import LabelBounds


@dataclass
class DataConfig:
    train_manifest: str  # manifest.json of the training shards
    train_shards: str = ""  # WebDataset URLs / brace pattern ("::"-separated); "" = shards beside the manifest
    val_manifest: str | None = ""  # manifest.json of the validation shards; "" or null (`--set data.val_manifest=`) = none
    val_shards: str = ""  # as train_shards, for validation
    extra_val_manifests: dict[str, str] = field(default_factory=dict)  # more validation splits: name -> manifest
    stats: str = ""  # dataset stats JSON; "" = stats.json beside train_manifest
    batch_size: int = 0  # structures per batch; set exactly one of batch_size / max_atoms
    max_atoms: int = 0  # atom budget per batch (no batch ever holds more atoms)
    # with max_atoms: order each shuffle group so that training batches end within a few atoms of their
    # share of the slot's atoms, so the ranks' batches (and step times) are alike (eqv2.data.plan, 4.)
    pack_batches: bool = True
    shuffle_buffer: int = 2000  # samples permuted together: consecutive shards of a slot, fully shuffled
    seed: int = 0  # with the epoch, seeds shard order and the sample shuffle
    num_workers: int = 2  # DataLoader worker processes per rank; 0 reads in the calling process
    prefetch_factor: int = 4  # batches in flight per worker
    on_error: Literal["raise", "skip"] = "raise"  # skip: drop bad samples, count them, log per epoch
    verify_checksums: bool = True  # compare every shard's sha256 with the manifest before use
    # build each batch's radius graph in the loader workers (CPU), with the model's cutoff; the model
    # then only computes edge vectors (no neighbour search, no host sync); false: the model builds it
    build_graphs: bool = True
    # label bounds checked as each sample is decoded (as when sharding): a sample above them is bad input
    max_energy_per_atom: float = 100.0  # eV: |energy| / atoms
    max_force: float = 100.0  # eV/Å: |force component|
    # every sample must carry energy and forces (training); false: samples without them are read too
    # (predicting test splits with `eqv2 evaluate`; a training batch without targets is still refused)
    require_labels: bool = True
    # the energy the model learns (eqv2/training/targets.py): "as_stored", the samples' energy (OC20:
    # referenced energies); "fitted_references": that minus per-element references fitted on the training
    # set (stats.json), which the exported model adds back (total energies out for total energies in)
    energy_target: Literal["as_stored", "fitted_references"] = "as_stored"

    def __post_init__(self) -> None:
        if (self.batch_size > 0) == (self.max_atoms > 0):
            raise ValueError(
                f"set exactly one of data.batch_size ({self.batch_size}) and data.max_atoms ({self.max_atoms})"
            )
        if self.batch_size < 0 or self.max_atoms < 0:
            raise ValueError("data.batch_size and data.max_atoms must not be negative")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if "val" in self.extra_val_manifests:
            raise ValueError('data.extra_val_manifests: the name "val" is taken by data.val_manifest')
        if self.extra_val_manifests and not self.val_manifest:
            raise ValueError("data.extra_val_manifests needs data.val_manifest (the split that picks the best checkpoint)")
        for name in ("max_energy_per_atom", "max_force"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"data.{name} must be > 0, got {getattr(self, name)}")
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")

    def val_splits(self) -> list[tuple[str, "DataConfig"]]:
        """(name, config reading that split) for every validation split: "val" first, then the extras
        (their shards beside their manifests)."""
        splits = [("val", self)] if self.val_manifest else []
        for name, manifest in self.extra_val_manifests.items():
            splits.append((name, replace(self, val_manifest=manifest, val_shards="", extra_val_manifests={})))
        return splits

    @property
    def label_bounds(self) -> LabelBounds:
        return LabelBounds(float(self.max_energy_per_atom), float(self.max_force), require=self.require_labels)

    @property
    def stats_path(self) -> Path:
        return Path(self.stats) if self.stats else Path(self.train_manifest).parent / "stats.json"
