#!/usr/bin/env python
"""Moved to `eqv2 shard-lmdb` (eqv2/tools/shard_lmdb.py); this name stays for existing command lines."""
from eqv2.tools.shard_lmdb import main

if __name__ == "__main__":
    raise SystemExit(main())
