#!/usr/bin/env bash
# Installs the Debian packages the SLURM tests start (tests/slurm/conftest.py): controller,
# node daemon, accounting daemon + MariaDB (sacct reads job records from it), client
# commands and munge. Does nothing when they are all there; needs root and apt-get.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurmdbd slurm-client munge mariadb-server iproute2 util-linux)
# what tests/slurm/conftest.py runs (its REQUIRED_COMMANDS)
COMMANDS=(slurmctld slurmd slurmdbd sbatch sacct sacctmgr munged mariadbd mariadb-install-db mariadb ip unshare nsenter)

missing=()
for command in "${COMMANDS[@]}"; do
    command -v "$command" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$command" >/dev/null 2>&1 \
        || missing+=("$command")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-slurm: Slurm, munge and MariaDB are installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-slurm: missing ${missing[*]}; installing needs root and apt-get (the SLURM tests will skip)" >&2
    exit 1
fi
start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
echo "install-slurm: installed ${PACKAGES[*]} in $(( $(date +%s) - start )) s"
