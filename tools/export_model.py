#!/usr/bin/env python
"""Moved to `eqv2 export` (eqv2/tools/export.py); this name stays for existing command lines."""
from eqv2.tools.export import main

if __name__ == "__main__":
    raise SystemExit(main())
