"""The configs shipped with the package, found by name or by path.

`--config oc20_all_md_153M` and `--ds_config zero0_bf16` name the shipped run and engine configs
(`configs/train/<name>.yaml`, `ds_configs/<name>.json`); a path that exists is used as it is; a
relative path of the repository's layout (`configs/model/eqv2_153M.yaml`, as the shipped run configs
name their model) is found in the package when the working directory does not hold it, so the
shipped configs work after `pip install` from any directory. In a checkout the package's `configs`
and `ds_configs` are links to the repository's folders of those names; a wheel holds copies.
"""
from __future__ import annotations

from pathlib import Path

from eqv2.config import ConfigError

PACKAGE = Path(__file__).resolve().parent
KINDS = {"train": ("configs/train", ".yaml"), "model": ("configs/model", ".yaml"), "ds": ("ds_configs", ".json")}


def shipped(kind: str) -> list[str]:
    """The names of the shipped configs of one kind ("train", "model" or "ds")."""
    folder, suffix = KINDS[kind]
    return sorted(p.name[: -len(suffix)] for p in (PACKAGE / folder).glob(f"*{suffix}"))


def find_config(value: str | Path, kind: str, key: str) -> Path:
    """The file `value` names: an existing path, a shipped config's name, or a repository-relative
    path found in the package; otherwise a ConfigError naming `key`, the value and the shipped names."""
    path = Path(value)
    if path.is_file():
        return path
    folder, suffix = KINDS[kind]
    if not path.is_absolute():
        candidates = [PACKAGE / path]
        if len(path.parts) == 1:
            candidates.append(PACKAGE / folder / (path.name if path.name.endswith(suffix) else path.name + suffix))
        for candidate in candidates:
            if candidate.is_file():
                return candidate
    raise ConfigError(f"{key}: file not found: {value} (shipped {kind} configs: {', '.join(shipped(kind))})")
