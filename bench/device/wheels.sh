#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the device machine lacks, for its Python (3.12, x86_64), on
# this machine, which can reach the package index (the device cannot).  Run from the repository root:
#   bench/device/wheels.sh        # then pass carry=[".whl"] to every device run
# The device image already has torch, triton, e3nn, torch-geometric, numpy, mpi4py, pyyaml, tqdm, psutil,
# msgpack, py-cpuinfo, ninja, matplotlib, tensorboard (/work/.library/device/KINDS.md); what eqv2 and the
# reference implementation need besides is below.  fairchem-core goes in without its dependencies (its
# torch pins are not wanted), as `make test` installs it.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=.whl
mkdir -p "$OUT"
# pure-Python or manylinux wheels for CPython 3.12 on x86_64
"$PY" -m pip download -q --dest "$OUT" --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --implementation cp --no-deps \
    hjson "pydantic>=2" pydantic-core annotated-types typing-inspection webdataset braceexpand lmdb "ase>=3.22" \
    "fairchem-core==1.10.0"
# pydantic-core must match the pydantic release: download it again through pydantic's own pin
"$PY" -m pip download -q --dest "$OUT" --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --implementation cp "pydantic>=2"
# DeepSpeed is published as a source archive: build its pure-Python wheel here (no ops compiled: the
# trainer uses none of its C++/CUDA ops; DS_BUILD_OPS=0 is the default)
DEEPSPEED=$("$PY" - <<'PY'
import re
spec = next(line.strip() for line in open("setup.cfg") if line.strip().startswith("deepspeed"))
print(spec)
PY
)
"$PY" -m pip wheel -q --no-deps --no-build-isolation --wheel-dir "$OUT" "$DEEPSPEED" 2>/dev/null \
    || "$PY" -m pip wheel -q --no-deps --wheel-dir "$OUT" "$DEEPSPEED"
ls -1 "$OUT"
du -sh "$OUT"
