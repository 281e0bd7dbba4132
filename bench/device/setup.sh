# Source this at the start of every device command (bench/device/README.md):
#   source bench/device/setup.sh && python3 -m bench.run ...
# Installs the carried wheels (.whl/, made by bench/device/wheels.sh) into /tmp/site, puts them and the
# repository on PYTHONPATH, and makes a `deepspeed` command (the wheels' console scripts are not
# installed with --target).  Prints the versions every result should be read with.
set -e
if [ ! -d /tmp/site/deepspeed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p /tmp/bin
printf '#!/bin/bash\nexport PYTHONPATH=/tmp/site:$PYTHONPATH\nexec python3 -m deepspeed.launcher.runner "$@"\n' >/tmp/bin/deepspeed
chmod +x /tmp/bin/deepspeed
export PATH=/tmp/bin:$PATH
# the compile caches outlive one call only if they are in $OUT; they do not, so each call compiles cold
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
python3 - <<'PY'
import torch, deepspeed
print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}; torch {torch.__version__}; "
      f"deepspeed {deepspeed.__version__}", flush=True)
PY
set +e
