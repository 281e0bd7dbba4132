#!/usr/bin/env python
"""Moved to `eqv2 shard` (eqv2/tools/shard.py); this name stays for existing command lines."""
from eqv2.tools.shard import main

if __name__ == "__main__":
    raise SystemExit(main())
