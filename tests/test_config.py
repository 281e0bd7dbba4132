"""eqv2.config: strict typed configs."""
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from eqv2.config import ConfigError, apply_overrides, from_dict, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    kind: Literal["a", "b"] = "a"


@dataclass
class Outer:
    steps: int = 10
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def test_unknown_and_ill_typed_keys_are_named():
    with pytest.raises(ConfigError, match="inner.lrr"):
        from_dict(Outer, {"inner": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match="steps: expected int"):
        from_dict(Outer, {"steps": "ten"})
    with pytest.raises(ConfigError, match="inner.kind"):
        from_dict(Outer, {"inner": {"kind": "c"}})
    with pytest.raises(ConfigError, match=r"tags\[1\]"):
        from_dict(Outer, {"tags": ["x", 3]})


def test_yaml11_exponent_floats_and_overrides_round_trip():
    data = yaml.safe_load("inner:\n  lr: 2e-4\n")
    cfg = from_dict(Outer, apply_overrides(data, ["steps=5", "inner.kind=b"]))
    assert cfg == Outer(steps=5, inner=Inner(lr=2e-4, kind="b"))
    assert from_dict(Outer, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["steps"])
