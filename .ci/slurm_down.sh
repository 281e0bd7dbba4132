#!/usr/bin/env bash
# Stop the single-host SLURM cluster that .ci/slurm_up.sh started, by PID file (never by name, so
# a real slurmd on a developer machine is never touched).
#   --keep-munge   leave munged running (slurm_up uses this when restarting after a config change)
#   --purge        also delete the state directory (queued jobs, logs) and the generated configs
set -euo pipefail

STATE=${EQV2_SLURM_STATE:-/var/lib/eqv2-slurm}
NODES=(eqv2-n1 eqv2-n2)
MARKER="# written by eqv2 .ci/slurm_up.sh"
keep_munge=0 purge=0
for a in "$@"; do
  case $a in
    --keep-munge) keep_munge=1 ;;
    --purge) purge=1 ;;
    *) echo "slurm_down: unknown option $a (expected --keep-munge, --purge)" >&2; exit 2 ;;
  esac
done

stop_pidfile() {  # name pidfile: SIGTERM, wait up to 10 s, then SIGKILL
  local name=$1 f=$2 pid
  [[ -s $f ]] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    echo "slurm_down: stopping $name (pid $pid)" >&2
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "slurm_down: $name did not exit, killing" >&2
      kill -9 "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$f"
}

for n in "${NODES[@]}"; do stop_pidfile "slurmd $n" "$STATE/slurmd-$n.pid"; done
stop_pidfile slurmctld "$STATE/slurmctld.pid"
((keep_munge)) || stop_pidfile munged /run/munge/munged.pid

if ((purge)); then
  rm -rf "$STATE"
  if grep -qF "$MARKER" /etc/slurm/slurm.conf 2>/dev/null; then
    rm -rf /etc/slurm/slurm.conf /etc/slurm/nodes
  fi
fi
