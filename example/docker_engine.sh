#!/usr/bin/env bash
# A Docker engine and the project's base image on this machine, started only if missing.
#
#   bash example/docker_engine.sh start   # install docker.io if missing, start dockerd if none answers,
#                                         # build swe-rl-base:bookworm if missing
#   bash example/docker_engine.sh stop    # stop the dockerd this script started (nothing else)
#   bash example/docker_engine.sh status
#
# Debian's packages only (docker.io, debootstrap); no registry is needed: the base image is a
# debootstrap'ed Debian bookworm (python3, pytest, venv, git) imported with `docker import`.
# The engine is whatever DOCKER_HOST points at (default: the local socket), so sandboxes can live on
# another host; this script only starts a local one. No systemd: dockerd runs in the background
# and its pid is kept in $SWE_RL_DOCKER_STATE/dockerd.pid (default /tmp/swe-rl-docker).
set -euo pipefail

STATE="${SWE_RL_DOCKER_STATE:-/tmp/swe-rl-docker}"
BASE_IMAGE="${SWE_RL_BASE_IMAGE:-swe-rl-base:bookworm}"
MIRROR="${SWE_RL_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
READY_TIMEOUT_S=60
mkdir -p "$STATE"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

engine_up() { docker info >/dev/null 2>&1; }

start_engine() {
  if engine_up; then
    echo "docker engine: already running ($(docker info --format '{{.ServerVersion}}' 2>/dev/null))"
    return
  fi
  if ! command -v dockerd >/dev/null; then
    echo "docker engine: installing docker.io from Debian's packages"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >"$STATE/apt.log" 2>&1 \
      || { tail -20 "$STATE/apt.log"; exit 1; }
  fi
  if [ -n "${DOCKER_HOST:-}" ] && [ "${DOCKER_HOST}" != "unix:///var/run/docker.sock" ]; then
    echo "docker engine: DOCKER_HOST=$DOCKER_HOST does not answer; not starting a local one" >&2
    exit 1
  fi
  # Started directly (not through a function) so that $! is dockerd itself, or sudo, which forwards signals.
  if [ "$(id -u)" = 0 ]; then dockerd >"$STATE/dockerd.log" 2>&1 & else sudo dockerd >"$STATE/dockerd.log" 2>&1 & fi
  echo $! >"$STATE/dockerd.pid"
  for _ in $(seq 1 "$READY_TIMEOUT_S"); do
    if engine_up; then
      echo "docker engine: started dockerd (pid $(cat "$STATE/dockerd.pid"), log $STATE/dockerd.log)"
      return
    fi
    sleep 1
  done
  echo "docker engine: dockerd did not answer within ${READY_TIMEOUT_S} s:" >&2
  tail -20 "$STATE/dockerd.log" >&2
  exit 1
}

build_base_image() {
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "base image: $BASE_IMAGE present"
    return
  fi
  if ! command -v debootstrap >/dev/null; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >>"$STATE/apt.log" 2>&1
  fi
  local rootfs="$STATE/rootfs"
  echo "base image: debootstrap bookworm into $rootfs (a few minutes)"
  as_root rm -rf "$rootfs"
  as_root debootstrap --variant=minbase --include=python3,python3-pytest,python3-venv,git \
    bookworm "$rootfs" "$MIRROR" >"$STATE/debootstrap.log" 2>&1 || { tail -20 "$STATE/debootstrap.log"; exit 1; }
  as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  # `python` as SWE-bench images and the tasks' test commands expect it; /testbed as in SWE-bench images.
  as_root ln -sf python3 "$rootfs/usr/bin/python"
  as_root mkdir -p "$rootfs/testbed"
  as_root tar -C "$rootfs" -c . | docker import -c 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
  as_root rm -rf "$rootfs"
  echo "base image: $BASE_IMAGE built"
}

stop_engine() {
  local pidfile="$STATE/dockerd.pid"
  if [ ! -f "$pidfile" ]; then
    echo "docker engine: not started by this script; left alone"
    return
  fi
  local pid
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    as_root kill "$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && as_root kill -9 "$pid"
  fi
  rm -f "$pidfile"
  echo "docker engine: stopped dockerd (pid $pid)"
}

case "${1:-}" in
  start) start_engine; build_base_image ;;
  stop) stop_engine ;;
  status) if engine_up; then echo "up"; else echo "down"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
