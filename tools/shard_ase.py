#!/usr/bin/env python
"""Moved to `eqv2 shard-ase` (eqv2/tools/shard_ase.py); this name stays for existing command lines."""
from eqv2.tools.shard_ase import main

if __name__ == "__main__":
    raise SystemExit(main())
