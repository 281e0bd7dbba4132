#!/usr/bin/env python
"""Moved to `eqv2 demo-data` (eqv2/tools/demo_data.py); this name stays for existing command lines."""
from eqv2.tools.demo_data import main

if __name__ == "__main__":
    raise SystemExit(main())
