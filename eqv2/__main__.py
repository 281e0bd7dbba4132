"""`python -m eqv2 <verb>`: the `eqv2` console script without the installed script (e.g. `$PYTHON -m eqv2 shard`)."""
from eqv2.cli import main

raise SystemExit(main())
