#!/usr/bin/env bash
# Stop the daemons that start.sh started (the pids it recorded), and nothing else.
set -uo pipefail
STATE="${REPRO_SLURM_STATE:-/var/tmp/repro-slurm}"
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  f="$STATE/pids/$name"
  [[ -f $f ]] || continue
  pid="$(cat "$f")"
  # Only a live process that is still the program we started (pids get reused).
  if kill -0 "$pid" 2>/dev/null && grep -qa "$name" "/proc/$pid/cmdline" 2>/dev/null; then
    $SUDO kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && $SUDO kill -9 "$pid"
    echo "slurm/local/stop.sh: stopped $name ($pid)"
  fi
  rm -f "$f"
done
