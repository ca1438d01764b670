#!/usr/bin/env bash
# Install, configure and start a single-node Slurm 22.05 cluster on this host (Debian 12),
# with accounting (sacct), without systemd and without cgroups, everything on 127.0.0.1.
# Run as root. Idempotent: installed packages are skipped, running daemons are left alone,
# and a second run with the cluster up is a quick no-op that still checks sinfo/sacct.
# Stop it with study/cluster/slurm-down.sh.
#
# Environment:
#   SLURM_CPUS=8              CPUs advertised for the node (oversubscribed; default 8, so tests
#                             can run several 1-CPU jobs at once on a 2-core machine)
#   SLURM_ACCOUNTING=1        MariaDB + slurmdbd so that `sacct` works (submitit polls job
#                             states with sacct; without it a killed job makes result() hang).
#                             0 = lighter, no sacct (not recommended).
#   SLURM_MAX_ARRAY_SIZE=1001 MaxArraySize (Slurm's own default is 1001)
#   SLURM_PARTITION=debug     name of the (only, default) partition
#
# If the generated config differs from the one the running daemons use (e.g. another
# SLURM_CPUS), slurmctld and slurmd are restarted so that the new values take effect.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "slurm-up.sh: run as root" >&2; exit 1; }

ACCOUNTING="${SLURM_ACCOUNTING:-1}"
CPUS="${SLURM_CPUS:-8}"
MAX_ARRAY="${SLURM_MAX_ARRAY_SIZE:-1001}"
PARTITION="${SLURM_PARTITION:-debug}"
NODE="$(hostname -s)"
CONF_DIR=/etc/slurm
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
PID_DIR=/run/slurm
DB_PASS=slurm-ci-only   # throw-away: mariadbd runs with --skip-networking (unix socket only)
CLUSTER=vfmstudy

log() { echo "[slurm-up $(date +%T)] $*"; }
die() { echo "[slurm-up] ERROR: $*" >&2; exit 1; }
now() { date +%s.%N; }
dt() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
# alive PIDFILE: the pid in it is a running (non-zombie) process
alive() {
  [ -s "$1" ] || return 1
  local pid; pid=$(cat "$1" 2>/dev/null) || return 1
  kill -0 "$pid" 2>/dev/null && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}
wait_for() {  # TRIES(0.2 s each) DESCRIPTION COMMAND...
  local n=$1 what=$2; shift 2
  for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "[slurm-up] timeout waiting for: $what" >&2; return 1
}
stop_pidfile() {  # PIDFILE: TERM, wait up to 15 s, then KILL
  alive "$1" || { rm -f "$1"; return 0; }
  local pid; pid=$(cat "$1")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 150); do alive "$1" || break; sleep 0.1; done
  alive "$1" && kill -KILL "$pid" 2>/dev/null || true
  rm -f "$1"
}

# serialise concurrent up/down runs on this machine (the daemons are started with 9>&-,
# so that they do not inherit, and hold for ever, the lock's file descriptor)
mkdir -p /run/lock
exec 9>/run/lock/vfmstudy-slurm.lock
flock -w 300 9 || die "another slurm-up/slurm-down holds /run/lock/vfmstudy-slurm.lock"

t0=$(now)
# ------------------------------------------------------------------ install (only what is missing)
pkgs=(munge slurmctld slurmd slurm-client)
[ "$ACCOUNTING" = 1 ] && pkgs+=(slurmdbd slurm-wlm-mysql-plugin mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2> >(grep -v '^debconf: delaying' >&2)
fi
t1=$(now)

# ------------------------------------------------------------------ munge
mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
chmod 0755 /run/munge
chmod 0700 /etc/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then   # the Debian package normally creates it
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! alive /run/munge/munged.pid; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged 9>&-
fi
wait_for 50 munged sh -c 'munge -n </dev/null | unmunge' || die "munged does not answer"

# ------------------------------------------------------------------ slurm.conf
mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$PID_DIR"
hw=$(slurmd -C 2>/dev/null | head -n1)
REAL_MEM=$(tr ' ' '\n' <<<"$hw" | sed -n 's/^RealMemory=//p')
[ -n "$REAL_MEM" ] || die "cannot read RealMemory from 'slurmd -C': $hw"
MEM=$(( REAL_MEM > 2048 ? REAL_MEM - 1024 : REAL_MEM ))  # slack below the real memory

if [ "$ACCOUNTING" = 1 ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

new_conf=$(cat <<CONF
# Single-node Slurm for vfmstudy dev/CI: no systemd, no cgroups, 127.0.0.1 only.
# Generated by study/cluster/slurm-up.sh; edits are overwritten.
ClusterName=${CLUSTER}
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs wait cred_expire+1 s before they may start again (default 120 s)
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
${ACCT_LINES}
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MaxArraySize=${MAX_ARRAY}
StateSaveLocation=${STATE_DIR}
SlurmdSpoolDir=${SPOOL_DIR}
SlurmctldPidFile=${PID_DIR}/slurmctld.pid
SlurmdPidFile=${PID_DIR}/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MessageTimeout=10
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
CONF
)
conf_changed=0
if [ ! -f "$CONF_DIR/slurm.conf" ] || [ "$(cat "$CONF_DIR/slurm.conf")" != "$new_conf" ]; then
  printf '%s\n' "$new_conf" > "$CONF_DIR/slurm.conf.tmp"
  mv -f "$CONF_DIR/slurm.conf.tmp" "$CONF_DIR/slurm.conf"
  conf_changed=1
fi
if [ "$conf_changed" = 1 ] && { alive "$PID_DIR/slurmctld.pid" || alive "$PID_DIR/slurmd.pid"; }; then
  log "slurm.conf changed: restarting slurmd and slurmctld"
  stop_pidfile "$PID_DIR/slurmd.pid"
  stop_pidfile "$PID_DIR/slurmctld.pid"
fi

# ------------------------------------------------------------------ accounting
if [ "$ACCOUNTING" = 1 ]; then
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  # mariadbd runs as mysql and cannot create files in root-owned $LOG_DIR
  [ -e "$LOG_DIR/mariadb.log" ] || install -o mysql -g mysql -m 0640 /dev/null "$LOG_DIR/mariadb.log"
  if [ ! -d /var/lib/mysql/mysql ]; then
    log "initialising MariaDB data dir"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  fi
  if ! alive /run/mysqld/mysqld.pid; then
    log "starting mariadbd"
    # mariadbd does not daemonize itself: detach it with setsid
    setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql \
      --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
      --skip-networking --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
      --log-error="$LOG_DIR/mariadb.log" </dev/null >/dev/null 2>&1 9>&- &
  fi
  wait_for 300 mariadb mariadb -uroot -e 'SELECT 1' || { tail -n 20 "$LOG_DIR/mariadb.log" >&2; die "mariadb does not answer"; }
  mariadb -uroot <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
  new_dbd=$(cat <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=${PID_DIR}/slurmdbd.pid
LogFile=${LOG_DIR}/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=${DB_PASS}
CONF
)
  if [ ! -f "$CONF_DIR/slurmdbd.conf" ] || [ "$(cat "$CONF_DIR/slurmdbd.conf")" != "$new_dbd" ]; then
    (umask 077; printf '%s\n' "$new_dbd" > "$CONF_DIR/slurmdbd.conf")
    stop_pidfile "$PID_DIR/slurmdbd.pid"
  fi
  chmod 0600 "$CONF_DIR/slurmdbd.conf"
  if ! alive "$PID_DIR/slurmdbd.pid"; then
    log "starting slurmdbd"
    /usr/sbin/slurmdbd 9>&-        # daemonizes itself
  fi
  wait_for 150 slurmdbd sacctmgr -n list cluster || { tail -n 20 "$LOG_DIR/slurmdbd.log" >&2; die "slurmdbd does not answer"; }
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
fi
t2=$(now)

# ------------------------------------------------------------------ slurmctld + slurmd
if ! alive "$PID_DIR/slurmctld.pid"; then
  log "starting slurmctld"
  /usr/sbin/slurmctld 9>&-      # daemonizes itself
fi
wait_for 150 slurmctld sh -c 'scontrol ping | grep -q "is UP"' || {
  tail -n 30 "$LOG_DIR/slurmctld.log" >&2; die "slurmctld does not answer"; }
if ! alive "$PID_DIR/slurmd.pid"; then
  log "starting slurmd"
  /usr/sbin/slurmd -N "$NODE" 9>&-  # daemonizes itself
fi
node_ok() { sinfo -h -n "$NODE" -o '%T' | grep -Eq '^(idle|mixed|allocated)$'; }
if ! wait_for 150 "node $NODE idle" node_ok; then
  scontrol update NodeName="$NODE" State=RESUME || true
  wait_for 25 "node $NODE idle after resume" node_ok || {
    sinfo -N -l >&2; tail -n 30 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2; die "node $NODE not usable"; }
fi
if [ "$ACCOUNTING" = 1 ]; then
  wait_for 150 "sacct" sacct -n -X -S now || die "sacct does not answer"
fi
t3=$(now)

log "up: install=$(dt "$t0" "$t1")s accounting=$(dt "$t1" "$t2")s slurm=$(dt "$t2" "$t3")s total=$(dt "$t0" "$t3")s"
log "node=$NODE cpus=$CPUS mem=${MEM}M partition=$PARTITION MaxArraySize=$(scontrol show config | awk '$1=="MaxArraySize"{print $3}') accounting=$ACCOUNTING"
sinfo
