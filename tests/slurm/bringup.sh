#!/usr/bin/env bash
# Start a throwaway single-node SLURM cluster (munge + slurmctld + slurmd) on loopback, as root, no systemd.
#
#   tests/slurm/bringup.sh STATE_DIR [CTLD_PORT SLURMD_PORT]  # prints nothing on success; STATE_DIR/pids lists the daemons
#   tests/slurm/teardown.sh STATE_DIR     # always run it afterwards, also after a failed bring-up
#
# Follows ../../../shared/notes/slurm-single-node.md (verified on Debian 12, slurm-wlm 22.05). Why each odd bit:
#   - config also symlinked at /etc/slurm/: the jobstep plugin strips SLURM_CONF before its inner srun (pitfall 1);
#   - MinJobAge=300: the executor's `squeue` status command needs finished jobs listed for a while (pitfall 3);
#   - one fake GPU with gres.conf File=/dev/null, so `resources: gpu=1` -> `sbatch --gpus=1` is schedulable (pitfall 5);
#   - a fresh StateSaveLocation and `slurmctld -i`, so no state (e.g. a DRAIN node) survives from an earlier run;
#   - the ports are the caller's (free ones it picked), default 6817/6818 as in SLURM;
#   - a second partition, `other`, for a rule that asks for its own partition.
set -euo pipefail

STATE=${1:?usage: bringup.sh STATE_DIR [CTLD_PORT SLURMD_PORT]}
CTLD_PORT=${2:-6817}
SLURMD_PORT=${3:-6818}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
HOST=$(hostname -s)
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OpenMP limits (pytest-xdist workers set one)
# Let two jobs share the node's memory: three quarters of the machine, in MB.
MEM=$(awk '/MemTotal/ {print int($2 / 1024 * 3 / 4)}' /proc/meminfo)

for tool in munged munge unmunge slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || { echo "bringup: '$tool' not found (apt-get install slurm-wlm munge)" >&2; exit 2; }
done
for conf in slurm.conf gres.conf; do
    if [ -L "/etc/slurm/$conf" ] && [ ! -e "/etc/slurm/$conf" ]; then
        rm "/etc/slurm/$conf"  # dangling: left by a test run killed before its teardown
    elif [ -e "/etc/slurm/$conf" ]; then
        echo "bringup: /etc/slurm/$conf exists (a real cluster, or a test cluster still up:" \
            "tests/slurm/teardown.sh $(dirname "$(dirname "$(readlink -f "/etc/slurm/$conf")")")); not touching it" >&2
        exit 3
    fi
done

# munged refuses a socket that others cannot reach: every directory above it must be world-searchable.
dir=$STATE
while [ "$dir" != / ]; do
    [ "$(( 0$(stat -c %a "$dir") & 01 ))" = 1 ] || { echo "bringup: $dir is not world-searchable (munged needs it); use another STATE_DIR" >&2; exit 2; }
    dir=$(dirname "$dir")
done
mkdir -p "$STATE"/{etc,ctld,spool,log,munge}
chmod 755 "$STATE/munge"
: >"$STATE/pids"

cat >"$STATE/etc/slurm.conf" <<EOF
ClusterName=snaketest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket.2
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=300
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=other Nodes=ALL Default=NO MaxTime=INFINITE State=UP
EOF
echo "NodeName=$HOST Name=gpu File=/dev/null" >"$STATE/etc/gres.conf"
mkdir -p /etc/slurm
ln -s "$STATE/etc/slurm.conf" /etc/slurm/slurm.conf
ln -s "$STATE/etc/gres.conf" /etc/slurm/gres.conf
export SLURM_CONF=$STATE/etc/slurm.conf

# Daemons run in the foreground as background jobs, so $! is each daemon's own PID (teardown kills exactly these).
head -c 1024 /dev/urandom >"$STATE/munge/munge.key"
chmod 400 "$STATE/munge/munge.key"
SOCKET=$STATE/munge/munge.socket.2
munged -F --key-file="$STATE/munge/munge.key" --socket="$SOCKET" --pid-file="$STATE/munge/munged.pid" \
    --seed-file="$STATE/munge/munged.seed" >"$STATE/log/munged.log" 2>&1 &
echo "munged $!" >>"$STATE/pids"

wait_for() {  # wait_for SECONDS WHAT CMD...: poll CMD every 0.2 s
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo "bringup: $what not ready after timeout; logs in $STATE/log" >&2
            exit 4
        fi
        sleep 0.2
    done
}
munge_ok() { munge -S "$SOCKET" -n | unmunge -S "$SOCKET"; }
wait_for 10 munged munge_ok

slurmctld -D -i >"$STATE/log/slurmctld.out" 2>&1 &
echo "slurmctld $!" >>"$STATE/pids"
slurmd -D >"$STATE/log/slurmd.out" 2>&1 &
echo "slurmd $!" >>"$STATE/pids"
node_idle() { [ "$(sinfo -h -p debug -o %t)" = idle ]; }  # -p: one line, not one per partition
wait_for 30 "node $HOST (sinfo state idle)" node_idle
