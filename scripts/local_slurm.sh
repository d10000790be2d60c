#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (CPUs only, localhost), for the tests and for trying
# the campaign's --slurm mode without a cluster. Needs root (it installs Debian's slurm-wlm and munge
# when they are missing and writes /etc/slurm/slurm.conf).
#
#   bash scripts/local_slurm.sh start    install if missing, write the config, start munged, slurmctld, slurmd
#   bash scripts/local_slurm.sh stop     stop the daemons (the config and state folder stay)
#   bash scripts/local_slurm.sh status   exit 0 when the node answers and is idle or allocated
#
# Environment: MICRO_SLURM_DIR (state, logs; default /tmp/micro-slurm), MICRO_SLURM_CPUS (CPUs the node
# announces; default 8: more than the machine has, so that several small test jobs share the cores).
# Accounting is off (no slurmdbd), so sacct knows nothing: use squeue/scontrol for job state.
set -euo pipefail

DIR=${MICRO_SLURM_DIR:-/tmp/micro-slurm}
CPUS=${MICRO_SLURM_CPUS:-8}
CONF=/etc/slurm/slurm.conf
MARK="# written by MiCro's scripts/local_slurm.sh"
NODE=$(hostname -s)

say() { echo "[local_slurm] $*"; }

install_if_missing() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || { echo "local_slurm: slurm-wlm is not installed and this is not root; install slurm-wlm and munge" >&2; exit 2; }
    say "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        echo "local_slurm: $CONF exists and was not written by this script; refusing to replace it" >&2
        exit 2
    fi
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" /etc/slurm
    local mem
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat > "$CONF" <<EOF
$MARK
ClusterName=micro-local
SlurmctldHost=$NODE(127.0.0.1)
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SchedulerParameters=sched_interval=1,defer_batch=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if pgrep -x munged >/dev/null; then return; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
    chmod 0400 /etc/munge/munge.key
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    if id munge >/dev/null 2>&1; then
        su -s /bin/sh munge -c "/usr/sbin/munged" 2>/dev/null || /usr/sbin/munged --force
    else
        /usr/sbin/munged --force
    fi
}

node_ready() {
    local state
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1) || return 1
    case "$state" in idle*|alloc*|mix*) return 0 ;; *) return 1 ;; esac
}

start() {
    install_if_missing
    write_config
    start_munge
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 1 60); do
        if node_ready; then say "up: node $NODE, $CPUS CPUs, partition debug (logs in $DIR/log)"; return; fi
        # a node left DOWN/DRAIN by an earlier run comes back
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    echo "local_slurm: the node did not come up in 60 s; see $DIR/log/slurmctld.log and slurmd.log" >&2
    exit 1
}

stop() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 1 20); do
        pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || { say "stopped"; return; }
        sleep 0.5
    done
    pkill -9 -x slurmd 2>/dev/null || true
    pkill -9 -x slurmctld 2>/dev/null || true
    say "stopped (killed)"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) node_ready ;;
    *) echo "usage: bash scripts/local_slurm.sh start|stop|status" >&2; exit 2 ;;
esac
