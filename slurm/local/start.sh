#!/usr/bin/env bash
# Start a single-node Slurm cluster on localhost for the integration tests: munge, MariaDB, slurmdbd (so that `sacct`
# works and submitit sees job states), slurmctld and slurmd with two fake GPUs (gres, for scheduling only).
# Installs the packages first if needed (install.sh). Waits until the node is idle (timeout: REPRO_SLURM_TIMEOUT s).
# Every daemon it starts has its pid recorded under $REPRO_SLURM_STATE/pids; stop.sh stops only those.
# Config goes to /etc/slurm (so no SLURM_CONF is needed by sbatch/submitit). Idempotent: a running cluster is kept.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
STATE="${REPRO_SLURM_STATE:-/var/tmp/repro-slurm}"
TIMEOUT="${REPRO_SLURM_TIMEOUT:-90}"
CLUSTER=repro-local
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"
say() { echo "slurm/local/start.sh: $*"; }
die() { echo "slurm/local/start.sh: error: $*" >&2; exit 1; }
alive() { [[ -f "$STATE/pids/$1" ]] && kill -0 "$(cat "$STATE/pids/$1")" 2>/dev/null; }

if alive slurmctld && alive slurmd && alive slurmdbd && sinfo -h -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then
  say "already running ($(sinfo -h -o '%N %T'))"
  exit 0
fi
"$HERE/install.sh"
$SUDO mkdir -p "$STATE"/{pids,log,dev} /var/spool/slurmctld /var/spool/slurmd /run/munge /run/mysqld /etc/slurm
$SUDO chown munge:munge /run/munge && $SUDO chmod 755 /run/munge
$SUDO chown mysql:mysql /run/mysqld
# Fake GPUs: character devices like /dev/null (slurmd drops gres given by Count= alone).
for i in 0 1; do [[ -e "$STATE/dev/gpu$i" ]] || $SUDO mknod "$STATE/dev/gpu$i" c 1 3; done

# --- configuration (what `slurmd -C` says this machine has; a mismatch leaves the node INVAL)
host="$(hostname -s)"
node_line="$(slurmd -C | head -1)"
[[ $node_line == NodeName=* ]] || die "slurmd -C printed '$node_line'"
$SUDO tee /etc/slurm/slurm.conf >/dev/null <<CONF
# Written by slurm/local/start.sh (repro's single-node test cluster).
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
KillWait=5
GresTypes=gpu
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
MinJobAge=30
$node_line Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
$SUDO tee /etc/slurm/gres.conf >/dev/null <<CONF
AutoDetect=off
Name=gpu File=$STATE/dev/gpu0
Name=gpu File=$STATE/dev/gpu1
CONF
$SUDO tee /etc/slurm/slurmdbd.conf >/dev/null <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
CONF
$SUDO chmod 600 /etc/slurm/slurmdbd.conf

# --- munge (key owned by munge, mode 400)
if ! alive munged; then
  rm -f /run/munge/munged.pid
  [[ -s /etc/munge/munge.key ]] || $SUDO mungekey --create --keyfile=/etc/munge/munge.key
  $SUDO chown munge:munge /etc/munge/munge.key && $SUDO chmod 400 /etc/munge/munge.key
  $SUDO runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$STATE/pids/munged"
fi
munge -n | unmunge >/dev/null || die "munge does not work (log: /var/log/munge/munged.log)"

# --- MariaDB (started directly; root logs in through the local socket) and slurmdbd
if ! alive mariadbd; then
  [[ -d /var/lib/mysql/mysql ]] || $SUDO mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  setsid $SUDO /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
    --pid-file=/run/mysqld/repro-mariadbd.pid >"$STATE/log/mariadbd.log" 2>&1 < /dev/null &
  echo $! > "$STATE/pids/mariadbd"
  for _ in $(seq 100); do $SUDO mariadb -e 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
  $SUDO mariadb -e 'select 1' >/dev/null 2>&1 || die "MariaDB did not start (log: $STATE/log/mariadbd.log)"
fi
start_daemon() {  # name, command...: run in the foreground of its own session, record its pid
  local name=$1; shift
  alive "$name" && return 0
  setsid "$@" >>"$STATE/log/$name.out" 2>&1 < /dev/null &
  echo $! > "$STATE/pids/$name"
}
start_daemon slurmdbd $SUDO /usr/sbin/slurmdbd -D
for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/6819) 2>/dev/null && break; sleep 0.2; done
(echo > /dev/tcp/127.0.0.1/6819) 2>/dev/null || die "slurmdbd does not listen on 6819 (log: $STATE/log/slurmdbd.log)"
start_daemon slurmctld $SUDO /usr/sbin/slurmctld -D -i
start_daemon slurmd $SUDO /usr/sbin/slurmd -D

# --- wait for the node
t0=$SECONDS
while true; do
  st="$(sinfo -h -o %T 2>/dev/null | head -1 || true)"
  case "$st" in
    idle|mixed|allocated) break ;;
    down*|drain*|inval*) $SUDO scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
  esac
  for d in slurmctld slurmd slurmdbd; do
    alive "$d" || die "$d exited; see $STATE/log/$d.log and $STATE/log/$d.out"
  done
  if (( SECONDS - t0 > TIMEOUT )); then
    die "node '$host' not idle after ${TIMEOUT}s (state: '${st:-no answer}'); see $STATE/log/slurmctld.log, slurmd.log"
  fi
  sleep 1
done
say "cluster $CLUSTER up in $((SECONDS - t0))s: $(sinfo -h -o '%P %N %T %G')"
