"""Shared fixtures: the real OC20 structure kept in tests/assets (OC20, CC-BY 4.0), seeded RNG."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
OC20_JSON = REPO / "tests" / "assets" / "oc20_adslab.json"  # provenance: tests/assets/README.md


@pytest.fixture(scope="session")
def oc20_atoms():
    """One real OC20 adsorbate+slab (34 atoms, triclinic cell, DFT energy/forces, FixAtoms)."""
    import ase.io

    if not OC20_JSON.is_file():
        pytest.fail(f"missing test structure {OC20_JSON}")
    return ase.io.read(OC20_JSON)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
