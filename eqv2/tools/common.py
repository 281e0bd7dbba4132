"""What every `eqv2 <verb>` shares: a parser whose help ends with runnable examples, one-line errors
with exit status 2 for a user's mistake, and progress bars that stay quiet off a terminal.
"""
from __future__ import annotations

import argparse
import sys
from typing import Iterable

EXIT_USAGE = 2  # bad input: a missing file, a bad key or value (argparse uses 2 for usage errors too)


class UserError(Exception):
    """A mistake in the command line or its input files: reported as one line, exit status 2."""


def parser(verb: str, doc: str, examples: list[str]) -> argparse.ArgumentParser:
    """`eqv2 VERB`'s parser: the module docstring as description, `examples` as the epilog."""
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    return argparse.ArgumentParser(prog=f"eqv2 {verb}", description=doc, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_quiet(p: argparse.ArgumentParser) -> None:
    """--quiet (alias --no-progress, the tools' older name): no progress bar.  Without it the bar is
    shown only when stderr is a terminal (a log file gets no bar lines)."""
    p.add_argument("-q", "--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress bar (there is none anyway when stderr is not a terminal)")


def show_progress(quiet: bool) -> bool | None:
    """tqdm's `disable` argument: True hides the bar, None hides it when stderr is not a terminal."""
    return True if quiet else None


def progress(items: Iterable, quiet: bool, **kw):
    """`items` wrapped in a tqdm bar with rate and ETA (see show_progress)."""
    from tqdm import tqdm

    return tqdm(items, disable=show_progress(quiet), **kw)


def fail(verb: str, message: str) -> int:
    """Print `eqv2 VERB: MESSAGE` on stderr and return the exit status for bad input."""
    print(f"eqv2 {verb}: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE

