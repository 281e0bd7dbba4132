"""Shared fixtures: the real OC20 structure from ../shared, seeded RNG."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# EQV2_OC20_JSON points elsewhere where ../shared is absent (e.g. on the GPU machine)
OC20_JSON = Path(os.environ.get("EQV2_OC20_JSON", REPO.parent / "shared" / "data" / "oc20_adslab.json"))


@pytest.fixture(scope="session")
def oc20_atoms():
    """One real OC20 adsorbate+slab (34 atoms, triclinic cell, DFT energy/forces, FixAtoms)."""
    import ase.io

    if not OC20_JSON.is_file():
        pytest.fail(f"missing shared test structure {OC20_JSON} (shared/ must sit beside the checkout)")
    return ase.io.read(OC20_JSON)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
