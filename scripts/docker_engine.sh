#!/usr/bin/env bash
# Makes sure a Docker engine answers, on machines where only the client is installed and no
# init system starts services (these dev machines and CI): installs Debian's docker.io when
# dockerd is missing, starts dockerd as root, waits until `docker info` answers.
#
#   sudo scripts/docker_engine.sh start     # prints "started PID" or "running"
#   sudo scripts/docker_engine.sh stop      # stops a dockerd this script started
#
# The engine's log: /tmp/nextchar-dockerd.log. Images and volumes stay in /var/lib/docker.
set -euo pipefail

log=/tmp/nextchar-dockerd.log
pidfile=/tmp/nextchar-dockerd.pid

start() {
  if docker info >/dev/null 2>&1; then
    echo "docker engine: running"
    return
  fi
  if [[ $(id -u) != 0 ]]; then
    echo "docker engine: not running, and starting it needs root" >&2
    exit 1
  fi
  if ! command -v dockerd >/dev/null; then
    echo "docker engine: installing Debian's docker.io" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null
  fi
  # A daemon outlives this script: it must not inherit the caller's descriptors (a benchmark
  # lock taken with `flock FILE make ...` would stay held by dockerd and containerd for good).
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      ((fd > 2)) && eval "exec $fd>&-"
    done
    exec setsid dockerd >"$log" 2>&1 < /dev/null
  ) &
  echo $! >"$pidfile"
  for _ in $(seq 60); do
    if docker info >/dev/null 2>&1; then
      echo "docker engine: started $(cat "$pidfile") (log $log)"
      return
    fi
    sleep 1
  done
  echo "docker engine: dockerd did not answer within 60 s; last lines of $log:" >&2
  tail -5 "$log" >&2
  exit 1
}

stop() {
  [[ -f $pidfile ]] || { echo "docker engine: not started by this script"; return; }
  pid=$(cat "$pidfile")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    echo "docker engine: stopped $pid"
  fi
  rm -f "$pidfile"
}

case ${1:-start} in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
