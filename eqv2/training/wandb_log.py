"""Optional Weights & Biases logging: the main rank sends W&B the same records it writes to
metrics.jsonl (train scalars per log interval, validation metrics per split).  wandb is an optional
extra (`pip install eqv2[wandb]`); offline mode writes the run under run_dir/wandb without a network
(`wandb sync` uploads it later)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eqv2.config import ConfigError

MODES = ("offline", "online", "disabled")


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "eqv2"
    mode: str = "offline"  # offline: no network, files under run_dir/wandb; online; disabled
    name: str | None = None  # the W&B run name; null: W&B picks one
    entity: str | None = None  # the W&B team or user; null: the logged-in default

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"log.wandb.mode: {self.mode!r} is not one of {', '.join(MODES)}")


INSTALL_HINT = "log.wandb.enabled: wandb is not installed (pip install 'eqv2[wandb]')"


def require_wandb(cfg: WandbConfig) -> None:
    """With log.wandb.enabled, check that wandb imports: the trainer calls this on every rank at start,
    before any process group or file of the run exists, so a missing package is one config error on
    every rank (not an error on the main rank alone while the others wait in a collective)."""
    if not cfg.enabled:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None


class WandbSink:
    """Receives every metrics.jsonl record (StepLogger.write) on the main rank."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(INSTALL_HINT) from None
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, mode=cfg.mode,
                              dir=str(run_dir), config=config)

    def write(self, record: dict) -> None:
        prefix = f"val/{record['split']}/" if "split" in record else "train/"
        data = {prefix + k: v for k, v in record.items()
                if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log(data, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()
