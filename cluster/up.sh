#!/usr/bin/env bash
# A single-node SLURM cluster on loopback (Debian 12 packages, SLURM 22.05, no systemd needed), so that
# `snakemake --profile slurm` can be tested against the real scheduler on one machine. Root only.
#
#   cluster/up.sh                      # munge, MariaDB + slurmdbd (sacct works), slurmctld, slurmd
#   ACCOUNTING=none cluster/up.sh      # no database: then use `slurm-status-command: squeue` (docs/cluster.md)
#   FAKE_GPUS=2 cluster/up.sh          # declare 2 GPUs (copies of /dev/null) so GPU requests can be scheduled
#   CPUS=4 cluster/up.sh               # declare 4 CPUs whatever the machine has (tests: more jobs at once)
#   cluster/down.sh                    # stop every daemon by its PID file
#
# Idempotent: stops a cluster this script started before bringing the new one up. Installs the packages
# it needs (fast when they are already there).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ACCOUNTING=${ACCOUNTING:-slurmdbd}
FAKE_GPUS=${FAKE_GPUS:-0}
NODE=localhost
[ "$(id -u)" = 0 ] || { echo "cluster/up.sh: must run as root (it installs packages and starts daemons)" >&2; exit 2; }

pkgs="slurmctld slurmd slurm-client munge"
[ "$ACCOUNTING" = slurmdbd ] && pkgs="$pkgs slurmdbd mariadb-server"
missing=$(for p in $pkgs; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' \
  || echo "$p"; done)
if [ -n "$missing" ]; then
  # Debian's postinst scripts try to start the daemons; without systemd they only print a warning.
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing >/dev/null 2>&1 || {
    apt-get update >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing >/dev/null
  }
fi

# Never overwrite a SLURM configuration this script did not write.
MARK="# written by cmbench cluster/up.sh"
if [ -f /etc/slurm/slurm.conf ] && ! grep -qx "$MARK" /etc/slurm/slurm.conf; then
  echo "cluster/up.sh: /etc/slurm/slurm.conf was not written by this script; move it away to use a test cluster" >&2
  exit 3
fi
"$HERE/down.sh"

cpus=${CPUS:-$(nproc)}  # CPUS=N declares more CPUs than the machine has, to run more small jobs at once
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
gres_types=""; node_gres=""
if [ "$FAKE_GPUS" -gt 0 ]; then
  gres_types="GresTypes=gpu"; node_gres="Gres=gpu:fake:${FAKE_GPUS}"
  # Each GPU needs its own device file: copies of /dev/null (mknod), or /dev/null itself for a single one.
  : > /etc/slurm/gres.conf
  if [ "$FAKE_GPUS" -eq 1 ]; then
    echo "NodeName=$NODE Name=gpu Type=fake File=/dev/null" >> /etc/slurm/gres.conf
  else
    mkdir -p /run/cmbench-fake-gpus
    for i in $(seq 0 $(( FAKE_GPUS - 1 ))); do
      [ -c "/run/cmbench-fake-gpus/gpu$i" ] || mknod "/run/cmbench-fake-gpus/gpu$i" c 1 3 || {
        echo "cluster/up.sh: cannot create fake GPU device files (mknod); use FAKE_GPUS=1" >&2; exit 2; }
      echo "NodeName=$NODE Name=gpu Type=fake File=/run/cmbench-fake-gpus/gpu$i" >> /etc/slurm/gres.conf
    done
  fi
else
  rm -f /etc/slurm/gres.conf
fi
if [ "$ACCOUNTING" = slurmdbd ]; then
  acct=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost'
else
  acct="AccountingStorageType=accounting_storage/none"
fi
# MinJobAge=300 keeps finished jobs visible to squeue long enough for Snakemake's status checks.
cat > /etc/slurm/slurm.conf <<CONF
$MARK
ClusterName=localcluster
SlurmctldHost=localhost
MpiDefault=none
ProctrackType=proctrack/linuxproc
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/lib/slurm/slurmd
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmUser=slurm
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
${acct}
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=300
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
${gres_types}
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} ${node_gres} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

mkdir -p /run/munge /var/lib/slurm/slurmd /var/lib/slurm/slurmctld /var/log/slurm
chown munge:munge /run/munge
chown slurm:slurm /var/lib/slurm/slurmctld /var/log/slurm
runuser -u munge -- /usr/sbin/munged

wait_for() {  # wait_for SECONDS CMD...: poll until CMD succeeds, else fail naming it
  local t=$1; shift
  for _ in $(seq 1 $(( t * 5 ))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "cluster/up.sh: timed out after ${t}s waiting for: $*" >&2; return 1
}

if [ "$ACCOUNTING" = slurmdbd ]; then
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 --pid-file=/run/mysqld/mysqld.pid \
    >/var/log/mariadb-cmbench.log 2>&1 < /dev/null &
  wait_for 30 mariadb -e 'select 1'
  mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmdbpass';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmdbpass
StorageLoc=slurm_acct_db
CONF
  chown slurm:slurm /etc/slurm/slurmdbd.conf && chmod 600 /etc/slurm/slurmdbd.conf
  /usr/sbin/slurmdbd
  wait_for 30 sacctmgr -n show cluster
  sacctmgr -i add cluster localcluster >/dev/null 2>&1 || true
fi

/usr/sbin/slurmctld
/usr/sbin/slurmd -N "$NODE"
wait_for 30 sh -c 'sinfo -h -o %T | grep -qx idle'
sinfo
