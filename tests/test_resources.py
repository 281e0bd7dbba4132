"""The shipped configs by name and by path, in the checkout and in an installed wheel."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eqv2.config import ConfigError
from eqv2.resources import find_config, shipped
from eqv2.training.config import load_ds_config, load_run_config

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_config_is_found_by_name():
    assert "oc20_all_md_153M" in shipped("train") and "zero0_bf16" in shipped("ds") and "eqv2_31M" in shipped("model")
    for kind in ("train", "model", "ds"):
        for name in shipped(kind):
            assert find_config(name, kind, "--config").is_file()


def test_names_and_paths_give_the_same_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the run config's model.base is found in the package
    for name in ("train.json", "val.json"):  # only their existence is checked when the config is read
        (tmp_path / name).write_text("{}")
    data = ["data.train_manifest=train.json", "data.val_manifest=val.json"]
    by_name, _ = load_run_config("oc20_all_md_31M", data, 8)
    by_path, _ = load_run_config(REPO / "configs" / "train" / "oc20_all_md_31M.yaml", data, 8)
    assert by_name == by_path and by_name.model.num_layers == 8
    assert load_ds_config("zero0_bf16") == load_ds_config(REPO / "ds_configs" / "zero0_bf16.json")


def test_an_unknown_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match=r"--config: file not found: oc20_all_md_15M \(shipped train configs: demo, "):
        find_config("oc20_all_md_15M", "train", "--config")


@pytest.mark.slow
def test_an_installed_wheel_has_the_command_and_the_configs(tmp_path):
    pytest.importorskip("setuptools")
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(wheel_dir)], check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    *map(str, wheel_dir.glob("eqv2-*.whl"))], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    work = tmp_path / "elsewhere"
    work.mkdir()
    help_ = subprocess.run([str(target / "bin" / "eqv2"), "--help"], cwd=work, env=env, capture_output=True,
                           text=True, timeout=120)
    assert help_.returncode == 0 and "eqv2 plot" in help_.stdout, help_.stderr
    code = ("import eqv2.resources as r; from eqv2.training.config import load_run_config, load_ds_config; "
            "open('t.json', 'w').write('{}'); "
            "cfg, _ = load_run_config('oc20_all_md_153M', ['data.train_manifest=t.json', 'data.val_manifest='], 4); "
            "print(r.__file__); "
            "print(cfg.model.num_layers, load_ds_config('zero0_bf16')['train_micro_batch_size_per_gpu'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    where, numbers = [line for line in proc.stdout.splitlines() if "WARNING" not in line][-2:]
    assert where.startswith(str(target)) and numbers == "20 4"
    assert not (target / "eqv2" / "configs").is_symlink() and shutil.which("eqv2", path=str(target / "bin"))
