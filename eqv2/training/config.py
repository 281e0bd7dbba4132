"""The run config (`--config run.yaml`) and the DeepSpeed engine config (`--ds_config x.json`).

The run YAML holds what the experiment is: model, data, optimisation, loss, evaluation, checkpointing and
logging; the ds_config holds how the engine runs it (ZeRO stage, precision, clipping, buckets, monitor,
micro-batch and accumulation).  Both are checked strictly: an unknown or ill-typed key is an error naming
the key.  `model:` may be a mapping, the path of a model YAML (e.g. configs/model/eqv2_153M.yaml), or
{base: <path>, <key>: <value>, ...} (that file with some keys replaced); it is inlined before `--set`
overrides apply, so `--set model.num_layers=4` works either way, and the saved
resolved config is self-contained.
"""
from __future__ import annotations

import difflib
import json
import re
from collections.abc import KeysView
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from eqv2.config import ConfigError, apply_overrides, from_dict, load_yaml
from eqv2.data.config import DataConfig
from eqv2.execution import ExecutionOverrides, moved_model_key
from eqv2.model.config import ModelConfig
from eqv2.resources import find_config
from eqv2.normalizers import renamed_legacy
from eqv2.training.activation_checkpointing import ActivationCheckpointConfig
from eqv2.training.checkpointing import CheckpointConfig
from eqv2.training.compile import CompileConfig
from eqv2.training.finetune import InitConfig, merge_model_config, model_config_of
from eqv2.training.garbage import GCConfig
from eqv2.training.loss import LossConfig, Normalizers
from eqv2.training.optim import OptimConfig
from eqv2.training.profiling import check_profile_steps
from eqv2.training.targets import check_force_options
from eqv2.training.wandb_log import WandbConfig

# ds_config keys the trainer owns or derives; setting them in the JSON would be silently overridden
_DS_FORBIDDEN = {"optimizer": "the optimizer is built from the run config's optim: section",
                 "scheduler": "the lr schedule is built from the run config's optim: section",
                 "train_batch_size": "the global batch is derived: micro-batch × accumulation × ranks"}


@dataclass
class EvalConfig:
    every_steps: int = 1000  # periodic validation interval in optimizer steps (0: only at the end)
    at_start: bool = False  # also validate before step 1 (fine-tuning: the pretrained model's metrics)
    max_batches: int = 0  # validate on the first k batches per rank only (0: the whole split)
    use_ema: bool = True  # evaluate the EMA weights (as the reference) when an EMA is kept
    primary_metric: Literal["forces_mae", "energy_mae"] = "forces_mae"  # lower is better; picks "best"


@dataclass
class LogConfig:
    every_steps: int = 50  # host syncs (loss values, grad norm) happen only at this interval
    progress_bar: bool | None = None  # a tqdm bar; null: only when stderr is a terminal
    # [first, last] step numbers to record with the torch profiler (eqv2/training/profiling.py): writes
    # profile_rank<r>.txt to run_dir, the host and GPU time per operator and kernel; null: off
    profile_steps: list[int] | None = None
    wandb: WandbConfig = field(default_factory=WandbConfig)  # optional W&B logger (training/wandb_log.py)

    def __post_init__(self) -> None:
        check_profile_steps(self.profile_steps)


@dataclass
class RunConfig:
    run_dir: str  # checkpoints, resolved configs, logs and monitor output go here
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    init: InitConfig = field(default_factory=InitConfig)  # weights from a pretrained model (fine-tuning)
    loss: LossConfig = field(default_factory=LossConfig)
    activation_checkpointing: ActivationCheckpointConfig = field(default_factory=ActivationCheckpointConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)  # torch.compile of the blocks (GPU default)
    # kernels, shape buckets and input checks ("auto": chosen from device, dtype, model and ZeRO stage;
    # eqv2/execution.py, docs/execution.md); set single keys for experiments
    execution: ExecutionOverrides = field(default_factory=ExecutionOverrides)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    gc: GCConfig = field(default_factory=GCConfig)  # Python's garbage collector: automatic or every N steps
    seed: int = 0  # model init; dropout masks are re-seeded from (seed, step, rank) every step
    normalizers: Normalizers | None = None  # null: energy_mean/energy_std/forces_std of the data stats JSON
    model_graph_stats_from_data: bool = False  # true: model.avg_num_nodes/avg_degree from the data stats

    def __post_init__(self) -> None:
        check_force_options(self)  # gradient forces and the stress loss (training/targets.py)
        if self.model.stress_head is not None:  # converted fairchem models only: the trainer has no stress-head loss
            raise ConfigError("model.stress_head: the direct stress head is not trained by eqv2 (it comes with "
                              "converted fairchem OMat24-family models); set it to null")


# PyYAML follows YAML 1.1, where "2e-4" (no dot) is a string; users type it that way on the command line.
_SCI_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _sci_floats(overrides: list[str]) -> list[str]:
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        out.append(f"{key}={float(value)!r}" if sep and _SCI_FLOAT.match(value.strip()) else item)
    return out


def _inline_model(model):
    """`model:` as a mapping: a model YAML's path, or {base: path, key: value, ...} (the base file with
    those keys replaced); a mapping without `base` is used as it is."""
    if isinstance(model, str):
        model = {"base": model}
    if not isinstance(model, dict) or "base" not in model:
        return model
    model = dict(model)
    model_path = find_config(str(model.pop("base")), "model", "model.base: model config")
    return {**load_yaml(model_path), **model}


def load_run_config(path: str | Path, overrides: list[str], micro_batch: int) -> tuple[RunConfig, dict]:
    """Parse and check the run YAML; returns the config and the resolved plain mapping."""
    overrides = _sci_floats(overrides)
    raw = load_yaml(find_config(path, "train", "--config"))
    raw["model"] = _inline_model(raw.get("model"))
    if isinstance(raw.get("normalizers"), dict):  # configs written before eqv2.normalizers: force_rms
        raw["normalizers"] = renamed_legacy(raw["normalizers"])
    apply_overrides(raw, overrides)
    moved = moved_model_key(raw.get("model"))  # kernel and padding keys lived under model: before
    if moved:
        raise ConfigError(moved)
    init = raw.get("init")
    if isinstance(init, dict) and init.get("from_checkpoint"):  # the architecture is the checkpoint's
        path = str(init["from_checkpoint"])
        raw["model"] = merge_model_config(raw.get("model"), model_config_of(path), path)
    data = raw.get("data")
    if isinstance(data, dict) and not data.get("batch_size") and not data.get("max_atoms"):
        data["batch_size"] = micro_batch  # the ds_config's micro-batch is the data batch
    cfg = from_dict(RunConfig, raw)
    if cfg.data.batch_size and cfg.data.batch_size != micro_batch:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} differs from the ds_config's "
                          f"train_micro_batch_size_per_gpu={micro_batch}; set one of them (or use data.max_atoms)")
    manifests = [("data.train_manifest", cfg.data.train_manifest), ("data.val_manifest", cfg.data.val_manifest)]
    manifests += [(f"data.extra_val_manifests.{k}", v) for k, v in cfg.data.extra_val_manifests.items()]
    for key, value in manifests:
        if value and not Path(value).is_file():
            raise ConfigError(f"{key}: file not found: {value}")
    return cfg, raw


def load_ds_config(path: str | Path) -> dict:
    """Read the engine config; micro-batch and accumulation are required, the global batch is derived."""
    path = find_config(path, "ds", "--ds_config")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON: {err}") from err
    for key, why in _DS_FORBIDDEN.items():
        if key in ds:
            raise ConfigError(f"{path}: key {key!r} is not allowed in a ds_config ({why})")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if not isinstance(ds.get(key), int) or isinstance(ds.get(key), bool) or ds[key] < 1:
            raise ConfigError(f"{path}: {key} must be a positive integer, got {ds.get(key)!r}")
    _check_ds_keys(ds, path)
    for key in ("fp16", "amp", "bf16"):  # DeepSpeed's own mixed precision casts the weights themselves
        if not isinstance(ds.get(key, {}), dict):
            raise ConfigError(f"{path}: {key} must be a mapping such as {{\"enabled\": false}}, got {ds[key]!r}")
        if ds.get(key, {}).get("enabled"):
            raise ConfigError(f"{path}: {key}.enabled is not supported: eqv2 keeps fp32 weights and runs "
                              "bf16 under autocast, with geometry and norms in fp32; use "
                              '"torch_autocast": {"enabled": true, "dtype": "bfloat16"}')
    autocast = ds.get("torch_autocast", {})
    if autocast.get("enabled") and str(autocast.get("dtype", "bfloat16")).removeprefix("torch.") != "bfloat16":
        raise ConfigError(f"{path}: torch_autocast.dtype {autocast['dtype']!r} is not supported (float16 "
                          "under-/overflows force training); use bfloat16")
    clip = ds.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise ConfigError(f"{path}: gradient_clipping must be a number >= 0 (0: off), got {clip!r}")
    if ds.get("tensorboard", {}).get("enabled"):
        try:
            import tensorboard  # noqa: F401  (DeepSpeed's monitor needs it)
        except ImportError as err:
            raise ConfigError(f"{path}: tensorboard.enabled needs the tensorboard package "
                              "(pip install tensorboard) or set it to false") from err
    return ds


def _check_ds_keys(ds: dict, path: Path) -> None:
    """Every top-level key must be one DeepSpeed reads, and DeepSpeed's own parser must accept the
    values: DeepSpeed ignores a key it does not know (`zero_optimizaton` would silently train with
    ZeRO-0).  The known keys are the ones this DeepSpeed's config parser looks up, recorded while it
    parses the file (so the list follows the installed version)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = _KeyRecorder({**ds, "train_batch_size": ds["train_micro_batch_size_per_gpu"]
                          * ds["gradient_accumulation_steps"]})
    try:
        DeepSpeedConfig(probe)
    except Exception as err:  # DeepSpeed's assertions and pydantic errors: the value is the user's
        reason = " ".join(str(err).split())[:400]
        raise ConfigError(f"{path}: DeepSpeed rejects this config: {reason}") from err
    unknown = sorted(set(ds) - probe.looked_up)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(probe.looked_up), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}: unknown DeepSpeed config key {unknown[0]!r}{hint}; DeepSpeed would "
                          "ignore it")


class _KeyRecorder(dict):
    """A mapping that records which keys were looked up (by [], get, in, keys() membership)."""

    def __init__(self, data: dict) -> None:
        super().__init__(data)
        self.looked_up: set = set()

    def __getitem__(self, key):
        self.looked_up.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.looked_up.add(key)
        return super().get(key, default)

    def __contains__(self, key) -> bool:
        self.looked_up.add(key)
        return super().__contains__(key)

    def keys(self):
        return _RecordingKeys(self)

    def __copy__(self) -> "_KeyRecorder":  # DeepSpeed parses a shallow copy: keep recording
        return self


class _RecordingKeys(KeysView):
    def __contains__(self, key) -> bool:
        return key in self._mapping


def resolve_ds_config(ds: dict, run_dir: Path, load_universal: bool) -> dict:
    """Point the monitor at the run dir and switch universal loading on when resuming on new ranks."""
    ds = json.loads(json.dumps(ds))  # deep copy
    for monitor in ("tensorboard", "csv_monitor"):
        if ds.get(monitor, {}).get("enabled"):
            ds[monitor].setdefault("output_path", str(run_dir / "monitor"))
            ds[monitor].setdefault("job_name", monitor)
    ds.setdefault("checkpoint", {})["load_universal"] = load_universal
    return ds
