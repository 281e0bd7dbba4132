#!/usr/bin/env bash
# Stand up a real two-node SLURM cluster on this one host, for tests/slurm/.
#
# Why two nodes on one host: the launch scripts map SLURM's node list to MASTER_ADDR and per-node
# local ranks, and the preemption path crosses nodes; a single node would not exercise either.
# Both "nodes" are slurmd daemons started with `-N <name>`, each on its own port, with names
# aliased to 127.0.0.1 in /etc/hosts.
#
# Needs root and Debian (apt-get). Idempotent: a second run leaves a healthy cluster alone and
# restarts the daemons only if the generated configuration changed. Stop it with .ci/slurm_down.sh.
#
# Environment:
#   EQV2_SLURM_STATE   state/log/spool directory        (default /var/lib/eqv2-slurm)
#   EQV2_SLURM_CPUS    CPUs each emulated node claims   (default 4; config_overrides lets this exceed cores)
#   EQV2_SLURM_WAIT    seconds to wait for idle nodes   (default 60)
set -euo pipefail

STATE=${EQV2_SLURM_STATE:-/var/lib/eqv2-slurm}
CPUS=${EQV2_SLURM_CPUS:-4}
WAIT=${EQV2_SLURM_WAIT:-60}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
NODES=(eqv2-n1 eqv2-n2)
MARKER="# written by eqv2 .ci/slurm_up.sh"

log() { echo "slurm_up: $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (installs packages, writes /etc/slurm, starts daemons)"

# --- packages ---------------------------------------------------------------------------------
# libpmix-dev provides the unversioned libpmix.so that slurm's mpi_pmix plugin dlopens.
PKGS=(munge slurmctld slurmd slurm-client libpmix-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- munge --------------------------------------------------------------------------------------
# No systemd here: run munged ourselves, as the munge user, with its socket dir owned by munge.
[[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key missing (the munge package normally creates it)"
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# --- host aliases ------------------------------------------------------------------------------
for n in "${NODES[@]}"; do
  grep -qE "^[^#]*[[:space:]]$n([[:space:]]|\$)" /etc/hosts || echo "127.0.0.1 $n" >>/etc/hosts
done

# --- configuration -----------------------------------------------------------------------------
if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
  die "$CONF exists and was not written by this script; refusing to overwrite a real cluster's config"
fi
CTLD_HOST=$(hostname -s)
mkdir -p "$STATE"/{ctld,log,spool} "$CONF_DIR/nodes"
new_conf=$(mktemp)
trap 'rm -f "$new_conf"' EXIT
cat >"$new_conf" <<EOF
$MARKER
ClusterName=eqv2ci
SlurmctldHost=$CTLD_HOST
# Root runs everything: no slurm user/dirs to set up, and jobs run as the submitting user (root in CI).
SlurmUser=root
SlurmctldPort=6817
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=5
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
# %n: both slurmd daemons share this host, so their pid/spool/log paths must differ by node name.
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdSpoolDir=$STATE/spool/%n
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmdParameters=config_overrides
# No cgroups in this container: track processes by parent pid and do no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Rescan pending jobs every second: a requeued job becomes eligible by time, not by an event, and
# would otherwise wait for the next 30-60 s scheduling pass.
SchedulerParameters=sched_interval=1,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
# Requeue: allowed by default for batch jobs (sbatch --requeue / scontrol requeue).
JobRequeue=1
# Completed jobs leave slurmctld's memory quickly; otherwise sbatch --wait backs off to 32 s polls.
MinJobAge=5
# Seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or hits its time limit.
KillWait=30
# A node that was down comes back as soon as its slurmd registers with a valid config.
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=DEFAULT CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 State=UNKNOWN
NodeName=${NODES[0]} NodeAddr=127.0.0.1 Port=6821
NodeName=${NODES[1]} NodeAddr=127.0.0.1 Port=6822
PartitionName=ci Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
EOF

changed=0
if ! cmp -s "$new_conf" "$CONF"; then changed=1; cp "$new_conf" "$CONF"; fi
for n in "${NODES[@]}"; do
  # Each slurmd reads its own copy so that files looked up beside slurm.conf (mpi.conf) differ per
  # node: two PMIx servers on one host collide in the default client temp dir otherwise.
  d=$CONF_DIR/nodes/$n
  mkdir -p "$d" "$STATE/pmix/$n"
  cmp -s "$CONF" "$d/slurm.conf" || { cp "$CONF" "$d/slurm.conf"; changed=1; }
  printf '%s\nPMIxCliTmpDirBase=%s\n' "$MARKER" "$STATE/pmix/$n" >"$d/mpi.conf.new"
  if cmp -s "$d/mpi.conf.new" "$d/mpi.conf"; then rm "$d/mpi.conf.new"; else mv "$d/mpi.conf.new" "$d/mpi.conf"; changed=1; fi
done

# --- daemons -----------------------------------------------------------------------------------
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ((changed)); then
  all_down=1
  alive "$STATE/slurmctld.pid" && all_down=0
  for n in "${NODES[@]}"; do alive "$STATE/slurmd-$n.pid" && all_down=0; done
  if ((!all_down)); then
    log "configuration changed: restarting daemons"
    "$(dirname "$(readlink -f "$0")")/slurm_down.sh" --keep-munge
  fi
fi

# Absolute -f paths: the daemons chdir after forking, so a relative path would no longer resolve.
if ! alive "$STATE/slurmctld.pid"; then
  log "starting slurmctld"
  slurmctld -f "$CONF"
fi
for n in "${NODES[@]}"; do
  if ! alive "$STATE/slurmd-$n.pid"; then
    log "starting slurmd $n"
    slurmd -N "$n" -f "$CONF_DIR/nodes/$n/slurm.conf"
  fi
done

# --- readiness ---------------------------------------------------------------------------------
deadline=$((SECONDS + WAIT))
while :; do
  states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)
  idle=$(grep -c ' idle$' <<<"$states" || true)
  ((idle == ${#NODES[@]})) && break
  # A node left down/drained by an earlier, unclean stop: its slurmd is up again, so resume it.
  for n in $(awk '$2 ~ /^(down|drain|drng)/ {print $1}' <<<"$states"); do
    scontrol update NodeName="$n" State=RESUME 2>/dev/null || true
  done
  if ((SECONDS >= deadline)); then
    log "nodes not idle after ${WAIT}s:"; echo "$states" >&2
    tail -n 20 "$STATE"/log/*.log >&2 || true
    die "cluster did not come up"
  fi
  sleep 0.5
done
log "ready: $(sinfo -h -o '%P %D nodes %t %c cpus/node' | tr '\n' ' ')"
