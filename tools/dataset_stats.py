#!/usr/bin/env python
"""Moved to `eqv2 stats` (eqv2/tools/stats.py); this name stays for existing command lines."""
from eqv2.tools.stats import main

if __name__ == "__main__":
    raise SystemExit(main())
