"""Every product verb as a user runs it (`eqv2 VERB`, a real process): --help ends with runnable
examples, a user's mistake is one line on stderr with exit status 2 (no traceback), and progress bars
appear on a terminal only, never with --quiet."""
from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from eqv2 import cli
from tests.verbs import REPO, eqv2_cmd, run_eqv2

PRODUCT_VERBS = ["demo-data", "shard", "shard-lmdb", "shard-ase", "inspect", "stats", "export", "convert",
                 "predict", "evaluate", "plot"]


def test_every_product_tool_is_a_verb():
    assert set(PRODUCT_VERBS) <= set(cli.VERBS)


@pytest.mark.parametrize("verb", [v for v in PRODUCT_VERBS if v not in ("predict", "evaluate", "plot")])
def test_help_ends_with_examples_of_the_verb(verb):
    out = run_eqv2(verb, "--help", check=True).stdout
    assert out.startswith(f"usage: eqv2 {verb}")
    examples = out[out.index("\nexamples:\n"):].splitlines()[2:]
    assert examples and all(line.startswith(f"  eqv2 {verb} ") for line in examples), examples


def test_predict_help_has_examples():
    assert "  eqv2 predict --checkpoint model.pt" in run_eqv2("predict", "--help", check=True).stdout


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("not a checkpoint\n")
    (d / "manifest.json").write_text("{not json")
    return d


# verb, arguments ({d}: a folder with notes.txt and a broken manifest.json), what the one line says
BAD = [
    ("demo-data", ["--out", "{d}/notes.txt"], "eqv2 demo-data: --out {d}/notes.txt: exists and is not a directory"),
    ("demo-data", ["--frames", "0"], "eqv2 demo-data: error: --train-systems, --val-systems, --workers and --frames must be >= 1"),
    ("demo-data", ["--workers", "0"], "eqv2 demo-data: error: --train-systems, --val-systems, --workers and --frames"),
    ("shard", ["{d}/nowhere", "{d}/out", "--shard-samples", "2"], "eqv2 shard: input directory not found: {d}/nowhere"),
    ("shard", ["{d}", "{d}/out", "--shard-bytes", "12Q"], "eqv2 shard: error: --shard-bytes: not a size: '12Q'"),
    ("shard", ["{d}", "{d}/out"], "eqv2 shard: error: give --shard-samples and/or --shard-bytes"),
    ("shard", ["{d}", "{d}/out", "--shard-samples", "2", "--workers", "0"], "eqv2 shard: error: --workers must be >= 1"),
    ("shard", ["{d}", "{d}/out", "--shard-samples", "2"], "eqv2 shard: {d}: no *.extxyz or *.extxyz.xz files"),
    ("shard-lmdb", ["{d}", "{d}/out", "--shard-samples", "2"], "eqv2 shard-lmdb: {d}: no *.lmdb files"),
    ("shard-ase", ["{d}/none.extxyz", "{d}/out", "--shard-samples", "2"], "eqv2 shard-ase: input not found: {d}/none.extxyz"),
    ("shard-ase", ["{d}/notes.txt", "{d}/out", "--shard-samples", "2", "--val-fraction", "1.5"],
     "eqv2 shard-ase: error: --val-fraction must be in [0, 1), got 1.5"),
    ("inspect", ["{d}/nope/manifest.json"], "eqv2 inspect: shard manifest not found: {d}/nope/manifest.json"),
    ("inspect", ["{d}/manifest.json"], "eqv2 inspect: {d}/manifest.json: invalid JSON"),
    ("stats", ["{d}/nope/manifest.json"], "eqv2 stats: shard manifest not found: {d}/nope/manifest.json"),
    ("stats", ["{d}/manifest.json"], "eqv2 stats: {d}/manifest.json: invalid JSON"),
    ("stats", ["{d}/manifest.json", "--max-radius", "0"], "eqv2 stats: error: --max-radius must be > 0"),
    ("stats", ["{d}/manifest.json", "--degree-every", "-1"], "eqv2 stats: error: --degree-every must be >= 0"),
    ("export", ["{d}/nope", "-o", "{d}/m.pt"], "eqv2 export: {d}/nope: no complete checkpoint there"),
    ("export", ["{d}", "--best", "-o", "{d}/m.pt"], "eqv2 export: {d}/best.json not found"),
    ("convert", ["{d}/nope.pt", "{d}/out.pt"], "eqv2 convert: input checkpoint not found: {d}/nope.pt"),
    ("convert", ["{d}/notes.txt", "{d}/out.pt"], "eqv2 convert: cannot read {d}/notes.txt"),
    ("convert", ["{d}/notes.txt", "{d}/out.pt", "--forces-std", "0"], "eqv2 convert: error: --forces-std must be > 0"),
    ("predict", ["--checkpoint", "{d}/nope.pt", "--input", "x.extxyz", "--output", "{d}/p.npz"],
     "eqv2 predict: model checkpoint not found: {d}/nope.pt"),
    ("predict", ["--checkpoint", "{d}/notes.txt", "--input", "x", "--output", "p.npz", "--max-atoms", "0"],
     "eqv2 predict: error: --max-atoms must be >= 1"),
]


@pytest.mark.parametrize("verb, args, message", BAD, ids=[f"{v}-{i}" for i, (v, _, _) in enumerate(BAD)])
def test_bad_input_is_one_line_and_exit_2(files, verb, args, message, capsys):
    """In this process (each case a subprocess cost ~2.5 s of imports): an exception escaping the verb
    fails the test as a traceback would; the console script's own plumbing is tested just below."""
    try:
        code = cli.main([verb, *(a.format(d=files) for a in args)])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith(("usage:", " "))]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(message.format(d=files)), err


@pytest.mark.parametrize("case", [0, 13, 19])  # demo-data --out on a file; stats, convert of missing files
def test_bad_input_in_a_real_process_is_one_line_without_traceback(files, case):
    verb, args, message = BAD[case]
    proc = run_eqv2(verb, *(a.format(d=files) for a in args), timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(message.format(d=files)), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr


def _stderr_on_a_terminal(*args) -> tuple[int, str]:
    """Run `eqv2 ARGS` with stderr on a pseudo-terminal (stdout captured); its exit status and stderr."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 24 x 120 (a new pty is 0 x 0)
    proc = subprocess.Popen(eqv2_cmd(*args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the follower side closed: the process exited
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_only(tmp_path):
    args = ["demo-data", "--out", tmp_path / "d", "--train-systems", "2", "--val-systems", "1", "--frames", "2",
            "--workers", "1"]
    rc, err = _stderr_on_a_terminal(*args)
    assert rc == 0 and "EMT frames: 100%" in err and "3/3" in err, err  # the bar with its count and rate
    rc, err = _stderr_on_a_terminal(*args[:2], tmp_path / "q", *args[3:], "--quiet")
    assert rc == 0 and "%|" not in err, err
    piped = run_eqv2(*args[:2], tmp_path / "p", *args[3:], check=True)  # stderr a pipe, as in a log file
    assert "%|" not in piped.stderr, piped.stderr


OLD_NAMES = {"shard_extxyz": "shard", "shard_lmdb": "shard-lmdb", "shard_ase": "shard-ase", "inspect_shards": "inspect",
             "dataset_stats": "stats", "export_model": "export", "convert_fairchem_checkpoint": "convert",
             "make_demo_data": "demo-data"}


@pytest.mark.parametrize("old, verb", sorted(OLD_NAMES.items()))
def test_the_old_tool_names_still_run_the_verb(old, verb):
    """tools/<old>.py (for existing command lines) runs `eqv2 <verb>` of the installed package (here the
    checkout, through PYTHONPATH, as `pip install -e .` does)."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / f"{old}.py"), "--help"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: eqv2 {verb}"), proc.stderr
