#!/usr/bin/env python
"""Moved to `eqv2 convert` (eqv2/tools/convert.py); this name stays for existing command lines."""
from eqv2.tools.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
