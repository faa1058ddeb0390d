#!/usr/bin/env bash
# Install Slurm (Debian's packages: slurmctld, slurmd, slurmdbd, client), munge and MariaDB for a single-node test
# cluster on localhost. Idempotent: does nothing when every program is already there. Needs root (or sudo).
set -euo pipefail
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"
need=()
for prog in munged slurmctld slurmd slurmdbd sbatch sacct mariadbd; do
  command -v "$prog" >/dev/null 2>&1 || [[ -x /usr/sbin/$prog ]] || need+=("$prog")
done
if [[ ${#need[@]} -eq 0 ]]; then
  echo "slurm/local/install.sh: Slurm, munge and MariaDB are installed"
  exit 0
fi
echo "slurm/local/install.sh: installing (missing: ${need[*]})"
export DEBIAN_FRONTEND=noninteractive
# Debian's policy-rc.d (containers) keeps the packages from starting daemons; start.sh starts them itself.
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client slurmdbd mariadb-server \
  >/dev/null
echo "slurm/local/install.sh: done (slurm $(dpkg-query -W -f='${Version}' slurmctld))"  # dpkg's field, not bash's
