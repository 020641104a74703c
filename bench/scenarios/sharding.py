"""``sharding``: model ``ranker``, whose embedding table the ring splits over the workers, against workers
holding it whole.

One command, four systems in turn, each started, measured and stopped before the next:

1. *baseline*: one worker whose table has ``--baseline-rows`` rows: what a worker costs without the table.
2. *unsharded*: one worker with ``RINGSERVE_SHARDING=off`` (the whole table). Then one more such worker is
   added under the memory limit (``RINGSERVE_WORKER_MEMORY_LIMIT``): it announces itself (a worker does before
   it loads), the kernel OOM-kills it while it loads, supervisord starts it again: it never holds the table,
   and the model is not ready while it is in the ring.
3. *sharded*: ``--workers`` workers, replicas 1, each under that limit. A steady load (throughput, p99), then
   a load during which a worker joins (``add-worker``) and, once it holds its rows, one leaves (SIGTERM).
4. *replicas 2* (unless ``--no-replicas2``): the same workers, every row held by two, no limit (each holds
   twice the share the limit was chosen for); one SIGKILLed under load.

Memory of a worker: its anonymous memory (``Anonymous:`` summed over /proc/<pid>/smaps) plus the resident
pages of any mapping of the table file; the table's share: that minus the baseline worker's. The limit,
unless ``--limit`` says: half-way between a sharded worker's peak (:func:`auto_limit`) and the unsharded worker.
The load: requests of 1-``--max-ids`` rows, ids uniform over the table, random features, v2 JSON, from a
pool of ``--keys`` requests answered in-process by the unsharded model; every answer is checked to 1e-6.

Targets: a sharded worker's table share <= 1.10 x table/W (replicas 2: 1.10 x 2 x table/W); the unsharded
worker does not fit the limit and the sharded ones do; 0 wrong answers; 0 failed requests through the join,
the leave and the kill; no sharded worker OOM-killed under the limit; rows loaded by the join <= 1.1 x
rows/(N+1); the requests the kill caught answered (its rows served by their other holder) within the member
TTL + 1 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis import Redis

from bench import cgroup, tables, trial
from bench.cli import load_from_args
from bench.loadgen import Load
from bench.pool import MISMATCH
from bench.record import Record
from bench.results import headline, records_of
from bench.scenarios import live
from bench.scenarios.spec import Context, Scenario, add_served_arguments
from bench.system import RingServe, halt
from hashing.membership import Membership
from hashing.shards import ring_digest
from tasks.contract import ANNOUNCEMENTS, WHOLE_TABLE
from tasks.metadata import ModelMetadata
from tasks.settings import Settings

TARGETS = {
    "table_share_over_ideal": 1.10,
    "mismatches": 0,
    "failed": 0,
    "oom_kills": 0,  # of the sharded workers under the limit, through the loads, the join and the leave
    "join_loaded_over_ideal": 1.1,
    "served_again_over_ttl_s": 1.0,  # seconds beyond the member TTL
}
READY_TIMEOUT_S = 600.0  # a worker holding a whole 1 GiB table loads for seconds; a busy machine, longer
SETTLE_TIMEOUT_S = 60.0
OOM_WAIT_S = 30.0
OOM_KILLS_ENOUGH = 2  # killed twice: it came back and died again
MiB = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_served_arguments(parser, requests=None, duration=20.0, concurrent=32, model="ranker", api="v2", keys=16_384)
    group = parser.add_argument_group("sharding")
    group.add_argument("--rows", type=int, default=4_000_000, help="rows of the table (64 float32 each)")
    group.add_argument("--baseline-rows", type=int, default=1_000, help="rows of the baseline worker's table")
    group.add_argument("--max-ids", type=int, default=32, help="most rows (ids) in one request; at least 1")
    group.add_argument("--limit", help="worker memory limit (bytes, K, M, G); default: from the baseline and table")
    group.add_argument("--live-duration", type=float, default=30.0, help="seconds of the load with join and leave")
    group.add_argument("--join-at", type=float, default=0.2, help="add-worker at this fraction of --live-duration")
    group.add_argument("--leave-at", type=float, default=0.6, help="a worker leaves at this fraction (or once joined)")
    group.add_argument("--kill-duration", type=float, default=20.0, help="seconds of the replicas-2 load (kill at 1/3)")
    group.add_argument("--no-replicas2", dest="replicas2", action="store_false", help="skip the replicas-2 system")
    group.add_argument("--leaver", default="worker_2", help="the worker that leaves, and the one killed")
    parser.set_defaults(replicas2=True)
    # --keys is the number of distinct checked requests; --requests/--duration size the steady load


def limit_bytes(text: str) -> int:
    """Bytes of a limit written as the run script takes it: bytes, or a number with K, M or G."""
    units = {"K": 1024, "M": MiB, "G": 1024 * MiB}
    unit = text[-1:].upper()
    return int(text[:-1]) * units[unit] if unit in units else int(text)


def auto_limit(baseline: int, table: int, workers: int, unsharded: int) -> int:
    """Half-way, in whole MiB, between what a sharded worker needs at its peak and what the unsharded worker
    holds. Its peak: when a worker leaves after one joined, each of the others grows from table/(W+1) to
    table/W by copying into a new array what it held plus what it loads, both alive until the swap."""
    peak = baseline + table * (1 / workers + 1 / (workers + 1))
    return math.ceil((peak + unsharded) / 2 / MiB) * MiB


def ready_path(meta: ModelMetadata) -> str:
    return f"/v2/models/{meta.name}/ready"


def settings_for(meta: ModelMetadata, **more: str) -> dict[str, str]:
    """The repository of ``meta`` alone, and no response cache: the pool repeats its requests, and every one
    of them is to reach the workers."""
    return {"MODEL_REPOSITORY": str(meta.path.parent), "CACHE": "off", **more}


def snapshot(system: RingServe, meta: ModelMetadata) -> dict[str, dict[str, Any]]:
    """Per worker: its memory (:func:`bench.tables.worker_memory`) and what /stats says it holds of the table."""
    held = tables.shards(system.stats(), meta)
    return {name: m | {"shard": held.get(name)} for name, m in tables.worker_memory(system, meta).items()}


def settled(stats: dict[str, Any], meta: ModelMetadata, include: str | None = None, exclude: str | None = None) -> bool:
    """Every member of the ring this /stats answer shows has loaded its rows of that ring (the gateway's own
    readiness rule), ``include`` is a member and ``exclude`` is not."""
    members = {node: float(weight) for node, weight in stats.get("members", {}).items()}
    if not members or (include is not None and include not in members) or exclude in members:
        return False
    held = tables.shards(stats, meta)
    return all(held.get(node, {}).get("ring") in (ring_digest(members), WHOLE_TABLE) for node in members)


def oom_killed(system: RingServe) -> str | None:
    """Why a system's limited workers will not become ready: the kernel killed some (None if it did not)."""
    kills = {}
    for node, directory in system.memory_cgroups().items():
        counters = cgroup.counters(directory)
        if counters is not None and counters.oom_kills:
            kills[node] = counters.oom_kills
    return f"OOM-killed under the worker memory limit {kills}: give a higher --limit" if kills else None


def wait_settled(tl: live.Timeline, system: RingServe, meta: ModelMetadata, event: str, **which: str) -> None:
    if tl.wait_for(lambda: settled(system.stats(), meta, **which), SETTLE_TIMEOUT_S):
        tl.event(event)
    else:
        print(f"the ring did not settle ({which}) within {SETTLE_TIMEOUT_S:g} s", flush=True)


def alone(ctx: Context, label: str, meta: ModelMetadata, **settings: str) -> dict[str, Any]:
    """The memory of the one worker of a system of its own, once it holds its rows."""
    with RingServe(ctx.run_dir(label), 1, settings_for(meta, **settings)) as system:
        system.wait_ready(ready_path(meta), READY_TIMEOUT_S)
        return snapshot(system, meta)["worker_1"]


def over_limit(ctx: Context, meta: ModelMetadata, limit: Callable[[int], int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An unsharded worker's memory; then one more unsharded worker added under ``limit(its memory)``, watched
    until the kernel killed it twice or it held the whole table or ``OOM_WAIT_S`` passed: how often it was
    killed, whether it announced itself (a worker does before it loads) and whether it ever held the table."""
    node = "worker_2"
    with RingServe(ctx.run_dir("unsharded"), 1, settings_for(meta, SHARDING="off")) as system:
        system.wait_ready(ready_path(meta), READY_TIMEOUT_S)
        whole = snapshot(system, meta)["worker_1"]
        bytes_ = limit(whole["total"])
        script = system.launch("add-worker", {"WORKER_MEMORY_LIMIT": str(bytes_)})
        start, announced, loaded, ready = time.monotonic(), False, False, Counter[str]()
        try:
            with Redis.from_url(system.redis_url) as redis:
                membership = Membership(redis, 0, ANNOUNCEMENTS)
                while time.monotonic() - start < OOM_WAIT_S and not loaded:
                    directory = system.memory_cgroups().get(node)
                    counters = None if directory is None else cgroup.counters(directory)
                    if counters is not None and counters.oom_kills >= OOM_KILLS_ENOUGH:
                        break
                    announced |= node in membership.alive()
                    loaded = tables.shards(system.stats(), meta).get(node, {}).get("ring") == WHOLE_TABLE
                    ready[str(live.http_status(system.url + ready_path(meta)))] += 1
                    time.sleep(0.2)
        finally:
            halt(script)
        watched = time.monotonic() - start
        if node in system.pids():
            system.control("stop", node)
        directory = system.memory_cgroups().get(node)
        counters = None if directory is None else cgroup.counters(directory)
        supervised = (system.run_dir / "logs" / "supervisord.log").read_text()
    return whole, {
        "node": node,
        "limit": bytes_,
        "announced": announced,
        "loaded": loaded,
        "model_ready_statuses": dict(ready),
        "watched_s": round(watched, 2),
        "cgroup": None if counters is None else counters.as_json(),
        "starts": supervised.count(f"spawned: '{node}'"),
        "killed": supervised.count(f"exited: {node} (terminated by SIGKILL"),
    }


def failed_between(records: list[Record], start: float, end: float) -> int:
    return sum(not r.ok and r.error != MISMATCH for r in live.overlapping(records, start, end))


def mismatches(run: dict[str, Any]) -> int:
    return sum(r.status == 200 and r.error == MISMATCH for r in records_of(run))


def deltas(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], field: str) -> dict[str, int]:
    """Per node, how much a cumulative /stats shard counter grew; a node new in ``after``, or whose counter
    went down (its process was restarted), counts from 0."""
    grown = {}
    for node, now in sorted(after.items()):
        then = int(before.get(node, {}).get(field, 0))
        grown[node] = int(now[field]) - then if int(now[field]) >= then else int(now[field])
    return grown


def held_once(stats: dict[str, Any], meta: ModelMetadata) -> bool:
    """No member holds rows it no longer owns: every row is held by ``replicas`` members, no more (the rows a
    change moved away are dropped a grace period after it)."""
    assert meta.sharding is not None
    held, members = tables.shards(stats, meta), stats.get("members", {})
    if not members or any(node not in held for node in members):  # a worker that says nothing may be dead
        return False
    return sum(int(held[node]["held"]) for node in members) <= meta.sharding.rows * meta.sharding.replicas


def sharded(
    ctx: Context, args: argparse.Namespace, meta: ModelMetadata, load: Load, limit: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``--workers`` sharded workers under ``limit``: memory, a steady load, then a join and a leave under load."""
    marks: dict[str, dict[str, Any]] = {}
    added: list[str] = []
    leaver, duration = args.leaver, args.live_duration

    def script(tl: live.Timeline) -> None:
        tl.sleep_until(duration * args.join_at)
        marks["before_join"] = tables.shards(system.stats(), meta)
        tl.event("add-worker")
        added.append(system.add_worker())
        tl.event("joined")
        wait_settled(tl, system, meta, "join loaded", include=added[0])
        if tl.wait_for(lambda: held_once(system.stats(), meta), SETTLE_TIMEOUT_S):
            tl.event("join dropped")
        marks["after_join"] = tables.shards(system.stats(), meta)
        tl.sleep_until(duration * args.leave_at)
        marks["before_leave"] = tables.shards(system.stats(), meta)
        tl.event("leave")
        system.control("stop", leaver)  # SIGTERM; supervisorctl returns once it exited
        tl.event("left")
        wait_settled(tl, system, meta, "leave loaded", exclude=leaver)
        marks["after_leave"] = tables.shards(system.stats(), meta)

    settings = settings_for(meta, SHARDING="on", WORKER_MEMORY_LIMIT=str(limit))
    with RingServe(ctx.run_dir("sharded"), args.workers, settings) as system:
        system.wait_ready(ready_path(meta), READY_TIMEOUT_S, give_up=lambda: oom_killed(system))
        memory = snapshot(system, meta)
        steady = trial.measure(system, ctx.name, "sharded", load, ctx.machine, args.warmup)
        timeline = live.Timeline(system.url, script, ready=True, ready_path=ready_path(meta))
        churn_load = dataclasses.replace(load, requests=None, duration_s=duration)
        churn = trial.measure(system, ctx.name, "sharded: join, leave", churn_load, ctx.machine, 0, during=timeline)
        memory_after = snapshot(system, meta)
        oom_kills = {node: cgroup.counters(path) for node, path in system.memory_cgroups().items()}  # the leaver's too
    if timeline.error is not None:
        raise timeline.error
    ev, records = timeline.events, timeline.aligned(churn)
    end = max((r.end_s for r in records), default=0.0)
    rows = meta.sharding.rows if meta.sharding else 0
    new, n = (added[0] if added else ""), args.workers
    before_join, after_join = marks.get("before_join", {}), marks.get("after_join", {})
    before_leave, after_leave = marks.get("before_leave", {}), marks.get("after_leave", {})
    join_loaded = deltas(before_join, after_join, "loaded")
    leave_loaded = deltas(before_leave, after_leave, "loaded")
    moved = int(after_join.get(new, {}).get("held", 0))
    leaver_held = int(before_leave.get(leaver, {}).get("held", 0))
    finding = {
        "memory": memory,
        "memory_after": memory_after,
        "oom_kills": {node: None if c is None else c.oom_kills for node, c in oom_kills.items()},
        "steady": run_figures(steady),
        "churn": run_figures(churn),
        "events_s": {k.replace(" ", "_").replace("-", "_"): v for k, v in ev.items()},
        "join": {
            "added": new,
            "workers_before": n,
            "failed": failed_between(records, ev.get("add-worker", end), ev.get("leave", end)),
            "add_worker_to_joined_s": _gap(ev, "add-worker", "joined"),
            "joined_to_loaded_s": _gap(ev, "joined", "join loaded"),
            "loaded_to_dropped_s": _gap(ev, "join loaded", "join dropped"),
            "load_s": after_join.get(new, {}).get("load_s"),
            "loaded": join_loaded,
            "dropped": deltas(before_join, after_join, "dropped"),
            "read_through": deltas(before_join, after_join, "read_through"),
            "moved_rows": moved,
            "moved_share": moved / rows if rows else None,
            "ideal_share": 1 / (n + 1),
            "loaded_over_ideal": sum(join_loaded.values()) / (rows / (n + 1)) if rows else None,
        },
        "leave": {
            "leaver": leaver,
            "failed": failed_between(records, ev.get("leave", end), end),
            "leave_to_left_s": _gap(ev, "leave", "left"),
            "left_to_loaded_s": _gap(ev, "left", "leave loaded"),
            "leaver_held": leaver_held,
            "loaded": leave_loaded,
            "loaded_over_leaver_held": sum(leave_loaded.values()) / leaver_held if leaver_held else None,
            "read_through": deltas(before_leave, after_leave, "read_through"),
        },
        "samples": timeline.samples,
    }
    return [steady, churn], finding


def _gap(events: dict[str, float], start: str, end: str) -> float | None:
    return events[end] - events[start] if start in events and end in events else None


def replicated(
    ctx: Context, args: argparse.Namespace, meta: ModelMetadata, load: Load
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--workers`` workers holding every row twice: memory, then one SIGKILLed under load (supervisord
    restarts it): failed requests, when the requests it held were answered, when it held its rows again."""
    victim, duration = args.leaver, args.kill_duration

    def script(tl: live.Timeline) -> None:
        if live.kill_until_back(tl, system, victim, duration / 3, SETTLE_TIMEOUT_S):
            wait_settled(tl, system, meta, "restored", include=victim)

    with RingServe(ctx.run_dir("replicas2"), args.workers, settings_for(meta, SHARDING="on")) as system:
        ttl_ms = Settings.from_env(system.env).member_ttl_ms
        system.wait_ready(ready_path(meta), READY_TIMEOUT_S)
        memory = snapshot(system, meta)
        timeline = live.Timeline(system.url, script, ready=True, ready_path=ready_path(meta))
        kill_load = dataclasses.replace(load, requests=None, duration_s=duration)
        run = trial.measure(system, ctx.name, "replicas 2: kill", kill_load, ctx.machine, args.warmup, during=timeline)
    if timeline.error is not None:
        raise timeline.error
    ev, records = timeline.events, timeline.aligned(run)
    kill = ev.get("kill", math.inf)
    caught = [r for r in live.overlapping(records, kill, kill) if r.ok]
    return run, {
        "memory": memory,
        "victim": victim,
        "member_ttl_ms": ttl_ms,
        "kill": run_figures(run),
        "events_s": ev,
        "caught_at_kill": len(caught),
        # the requests the kill caught wait for their rows' other holder: answered once the ring drops the victim
        "served_again_s": max((r.end_s for r in caught), default=kill) - kill if caught else None,
        "restored_s": _gap(ev, "kill", "restored"),
        "back_s": _gap(ev, "kill", "back"),
        "samples": timeline.samples,
    }


def run_figures(run: dict[str, Any]) -> dict[str, Any]:
    """What the report quotes of one load: throughput, p99, failures, wrong answers, the client's share."""
    summary, cpu = run["summary"], run.get("server", {}).get("cpu", {})
    capacity = summary["duration_s"] * (run.get("machine", {}).get("cores") or 1)
    client_s = cpu.get("cpu_s", {}).get("client", 0.0)
    wrong = mismatches(run)
    return {
        **headline(run),
        "failed": summary["failed"] - wrong,
        "failed_by_status": summary["failed_by_status"],
        "mismatches": wrong,
        "cached": sum(bool(r.cached) for r in records_of(run)),  # answers the response cache gave: 0 (it is off)
        "client_share_of_machine": client_s / capacity if capacity else None,
    }


def memory_finding(
    baseline: dict[str, Any], workers: dict[str, dict[str, Any]], table: int, replicas: int, count: int
) -> dict[str, Any]:
    """Per worker: its memory, the table's share (less the baseline) and that share over the ideal
    ``replicas`` x table / ``count`` workers."""
    ideal = table * replicas / count
    shares = {name: m["total"] - baseline["total"] for name, m in workers.items()}
    return {
        "ideal_share": ideal,
        "workers": {
            name: {"total": m["total"], "table_share": shares[name], "over_ideal": shares[name] / ideal}
            for name, m in workers.items()
        },
        "max_over_ideal": max((s / ideal for s in shares.values()), default=None),
        "target": TARGETS["table_share_over_ideal"],
    }


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    if "RINGSERVE_WORKER_MEMORY_LIMIT" in os.environ:
        raise SystemExit("sharding limits only its sharded workers: give --limit, not RINGSERVE_WORKER_MEMORY_LIMIT")
    if args.max_ids < 1 or args.workers < 2:
        raise SystemExit("sharding needs --max-ids >= 1 and --workers >= 2")
    with tempfile.TemporaryDirectory(prefix="ringserve-sharding-") as tmp:
        root = Path(tmp)
        small = tables.repository(root / "baseline", args.model, args.baseline_rows, 1)
        big = tables.repository(root / "replicas1", args.model, args.rows, 1)
        pool = tables.request_pool(big, args.keys, args.max_ids, args.seed, root / "pool.npz")
        load = dataclasses.replace(load_from_args(args), pool=str(pool), model_repository=str(big.path.parent))
        table = tables.table_bytes(big)
        baseline = alone(ctx, "baseline", small, SHARDING="on")
        unsharded, refused = over_limit(
            ctx,
            big,
            lambda whole: (
                limit_bytes(args.limit) if args.limit else auto_limit(baseline["total"], table, args.workers, whole)
            ),
        )
        limit = refused["limit"]
        runs, live_finding = sharded(ctx, args, big, load, limit)
        twice: dict[str, Any] | None = None
        if args.replicas2:
            doubled = tables.repository(root / "replicas2", args.model, args.rows, 2, tables.table_path(big))
            kill_run, twice = replicated(ctx, args, doubled, load)
            runs.append(kill_run)
    sharded_memory = live_finding.pop("memory")
    finding = {
        "model": args.model,
        "rows": args.rows,
        "table_bytes": table,
        "workers": args.workers,
        "limit": limit,
        "baseline": baseline,
        "unsharded": unsharded | {"table_share": unsharded["total"] - baseline["total"]},
        "over_limit": refused,
        "replicas1": {
            "raw": sharded_memory,
            **memory_finding(baseline, sharded_memory, table, 1, args.workers),
            "fits_limit": all(m["total"] < limit for m in sharded_memory.values()),
        },
        **live_finding,
        "replicas2": None,
        "mismatches": sum(mismatches(r) for r in runs),
        "targets": TARGETS,
    }
    if twice is not None:
        memory = twice.pop("memory")
        finding["replicas2"] = {"raw": memory, **memory_finding(baseline, memory, table, 2, args.workers), **twice}
    return live.runs_document(ctx, runs, finding, rows=args.rows, limit=limit)


SCENARIO = Scenario(
    "sharding",
    "ranker's table sharded over 3 workers vs whole: memory per worker, the memory limit, answers checked"
    " against the unsharded model, a join, a leave and (replicas 2) a kill under load",
    add_arguments,
    run,
    {
        "requests": None,
        "duration": 3.0,
        "concurrent": 4,
        "workers": 3,
        "warmup": 10,
        "keys": 256,
        "rows": 1_000_000,
        "live_duration": 16.0,
        "join_at": 0.1,
        "leave_at": 0.5,
        "kill_duration": 8.0,
    },
)
