#!/usr/bin/env bash
# Stop the single-node cluster that cluster/up.sh started: each daemon by its PID file (checked against the
# daemon's name, so a stale file never signals an unrelated process).
stop() {  # stop PIDFILE NAME
  local f=$1 name=$2 p
  [ -f "$f" ] || return 0
  p=$(cat "$f")
  if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$name" ]; then
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$p" 2>/dev/null; then kill -KILL "$p" 2>/dev/null || true; fi
  fi
  rm -f "$f"
}
stop /run/slurmd.pid slurmd
stop /run/slurmctld.pid slurmctld
stop /run/slurmdbd.pid slurmdbd
stop /run/mysqld/mysqld.pid mariadbd
stop /run/munge/munged.pid munged
exit 0
