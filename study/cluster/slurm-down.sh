#!/usr/bin/env bash
# Stop the single-node Slurm cluster started by study/cluster/slurm-up.sh.
# Cancels all jobs first (so no slurmstepd is left), then stops slurmd, slurmctld, slurmdbd,
# mariadbd and munged by the PIDs in their own pid files (never by process name).
# Idempotent: with nothing running it just says so. Run as root.
set -uo pipefail

PID_DIR=/run/slurm
log() { echo "[slurm-down $(date +%T)] $*"; }

running() {  # PID: alive and not a zombie waiting to be reaped (PID 1 reaps lazily here)
  kill -0 "$1" 2>/dev/null && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}
stop_pid() {  # NAME PIDFILE
  local name=$1 pf=$2 pid
  [ -s "$pf" ] || return 0
  pid=$(cat "$pf" 2>/dev/null)
  if [[ "$pid" =~ ^[0-9]+$ ]] && running "$pid"; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 200); do running "$pid" || break; sleep 0.1; done
    if running "$pid"; then
      log "$name ($pid) did not stop after 20 s, sending KILL" >&2
      kill -KILL "$pid" 2>/dev/null
      for _ in $(seq 1 50); do running "$pid" || break; sleep 0.1; done
    fi
    log "stopped $name ($pid)"
  fi
  rm -f "$pf"
}

mkdir -p /run/lock
exec 9>/run/lock/vfmstudy-slurm.lock
flock -w 300 9 || log "WARNING: lock busy for 300 s, stopping anyway" >&2

t0=$(date +%s.%N)
# cancel whatever is still queued/running so that slurmd has no job steps left
if [ -s "$PID_DIR/slurmctld.pid" ] && running "$(cat "$PID_DIR/slurmctld.pid")" \
   && scontrol ping 2>/dev/null | grep -q 'is UP'; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    log "cancelling $(wc -w <<<"$jobs") job(s)"
    # shellcheck disable=SC2086
    scancel $jobs >/dev/null 2>&1 || true
    for _ in $(seq 1 150); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
stop_pid slurmd    "$PID_DIR/slurmd.pid"
stop_pid slurmctld "$PID_DIR/slurmctld.pid"
stop_pid slurmdbd  "$PID_DIR/slurmdbd.pid"
stop_pid mariadbd  /run/mysqld/mysqld.pid
stop_pid munged    /run/munge/munged.pid

# report (never kill by name) anything of ours that is still alive
left=""
for d in /proc/[0-9]*; do
  c=$(cat "$d/comm" 2>/dev/null) || continue
  case "$c" in
    munged|slurmctld|slurmd|slurmdbd|slurmstepd|mariadbd|mysqld)
      grep -q '^State:[[:space:]]*Z' "$d/status" 2>/dev/null || left+=" $c(${d#/proc/})" ;;
  esac
done
[ -n "$left" ] && log "WARNING: still running:$left" >&2
log "slurm down in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s"
