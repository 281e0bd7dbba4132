#!/usr/bin/env python
"""Moved to `eqv2 inspect` (eqv2/tools/inspect_shards.py); this name stays for existing command lines."""
from eqv2.tools.inspect_shards import main

if __name__ == "__main__":
    raise SystemExit(main())
