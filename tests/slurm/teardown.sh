#!/usr/bin/env bash
# Stop what bringup.sh STATE_DIR started and remove every trace of it; safe to run twice or after a partial bring-up.
# Only the PIDs recorded in STATE_DIR/pids are signalled (checked against /proc/PID/comm, so a reused PID is spared),
# and the /etc/slurm links are removed only if they point into STATE_DIR.
set -uo pipefail

STATE=${1:?usage: teardown.sh STATE_DIR}
[ -d "$STATE" ] || exit 0
STATE=$(cd "$STATE" && pwd)
export SLURM_CONF=$STATE/etc/slurm.conf

if [ -f "$STATE/pids" ] && grep -q '^slurmctld ' "$STATE/pids"; then
    # Cancel this cluster's jobs first so no job step outlives its slurmd.
    scancel --user="$(id -un)" 2>/dev/null
    for _ in $(seq 50); do
        [ -z "$(timeout 5 squeue -h -t RUNNING,COMPLETING,PENDING 2>/dev/null)" ] && break
        sleep 0.2
    done
fi

stop() {  # stop NAME PID: TERM, then KILL after 10 s
    local name=$1 pid=$2
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 0
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
}
if [ -f "$STATE/pids" ]; then
    for name in slurmd slurmctld munged; do  # reverse start order: munged last, the others need it to shut down
        pid=$(awk -v n="$name" '$1 == n {print $2}' "$STATE/pids")
        [ -n "$pid" ] && stop "$name" "$pid"
    done
fi

for conf in slurm.conf gres.conf; do
    link=/etc/slurm/$conf
    if [ -L "$link" ] && [[ "$(readlink "$link")" == "$STATE"/* ]]; then
        rm -f "$link"
    fi
done
rm -rf "$STATE"
