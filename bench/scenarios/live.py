"""What the live scenarios (failover, hotkey, join, leave) share: a script run during the load, /stats sampled
every 100 ms, and per-second series of the records.

Times are seconds on the monotonic clock from the moment the load started (``Timeline.start``,
called by the load generator when it releases its users); records count from the first request's
start, a few milliseconds later, which is within the precision quoted.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import threading
import time
import urllib.error
from collections.abc import Callable, Sequence
from typing import Any

from redis import Redis

from bench import auth
from bench.record import Record
from bench.results import records_of, scenario_document
from bench.scenarios.spec import Context
from bench.stats import percentile, status_key
from bench.system import RingServe
from hashing.membership import Membership
from tasks.contract import ANNOUNCEMENTS

SAMPLE_INTERVAL_S = 0.1
READY_PATH = "/v2/health/ready"
STATS_TIMEOUT_S = 1.0
SCRIPT_GRACE_S = 90.0  # how long the script may go on after the load (e.g. waiting for a rejoin)


class Timeline:
    """A :class:`bench.loadgen.Meter` that samples ``GET /stats`` (and, given a Redis URL, the members
    announced there; with ``ready``, the HTTP status of ``GET ready_path``: ``/v2/health/ready`` is 503 while
    the answering gateway process cannot read Redis, ``/v2/models/<m>/ready`` while a worker still loads the
    rows of a sharded model it owns) every ``interval_s`` and runs ``script(timeline)`` in a thread, both from
    the load's start.

    ``script`` waits with :meth:`sleep_until` and notes what it did with :meth:`event`.
    """

    def __init__(
        self,
        url: str,
        script: Callable[[Timeline], None] | None = None,
        redis_url: str | None = None,
        interval_s: float = SAMPLE_INTERVAL_S,
        ready: bool = False,
        ready_path: str = READY_PATH,
    ) -> None:
        self.url = url
        self.ready = ready
        self.ready_path = ready_path
        self.script = script
        self.redis = Redis.from_url(redis_url) if redis_url else None
        self.interval_s = interval_s
        self.t0 = 0.0
        # {"t", "members", "rows_in_flight"[, "shards"]} or {"t", "error"}; + "announced", "ready" when asked for
        self.samples: list[dict[str, Any]] = []
        self.events: dict[str, float] = {}
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._script_done = threading.Event()
        self._threads: list[threading.Thread] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    def sleep_until(self, t: float) -> None:
        time.sleep(max(0.0, t - self.now()))

    def event(self, name: str) -> float:
        t = self.now()
        self.events[name] = t
        print(f"\n[{t:6.2f} s] {name}", file=sys.stderr)
        return t

    def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Poll ``condition`` every ``interval_s`` until it holds (True) or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                return False
            time.sleep(self.interval_s / 2)
        return True

    def start(self) -> None:
        self.t0 = time.monotonic()
        self._threads = [threading.Thread(target=self._sample, name="bench-sampler", daemon=True)]
        if self.script is None:
            self._script_done.set()
        else:
            self._threads.append(threading.Thread(target=self._run_script, name="bench-script", daemon=True))
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._script_done.wait(SCRIPT_GRACE_S)
        self._stop.set()
        for t in self._threads:
            t.join()
        if self.redis is not None:
            self.redis.close()

    def _run_script(self) -> None:
        try:
            assert self.script is not None
            self.script(self)
        except BaseException as exc:  # reported by the scenario after the load
            self.error = exc
        finally:
            self._script_done.set()

    def _sample(self) -> None:
        while True:
            t = self.now()
            sample: dict[str, Any] = {"t": round(t, 3)}
            try:
                with auth.get(f"{self.url}/stats", STATS_TIMEOUT_S) as response:
                    stats = json.loads(response.read())
                sample["members"] = sorted(stats.get("members", {}))
                sample["rows_in_flight"] = stats.get("rows_in_flight_per_node", {})  # summed over every gateway
                if "shards" in stats:  # what each worker holds of each sharded model
                    sample["shards"] = stats["shards"]
            except (OSError, ValueError) as exc:
                sample["error"] = type(exc).__name__
            if self.ready:
                sample["ready"] = http_status(self.url + self.ready_path)
            if self.redis is not None:
                try:
                    sample["announced"] = sorted(Membership(self.redis, 0, ANNOUNCEMENTS).alive())
                except Exception as exc:  # noqa: BLE001 - a sample that failed is recorded, not fatal
                    sample["announced_error"] = type(exc).__name__
            self.samples.append(sample)
            if self._stop.wait(max(0.0, self.interval_s - (self.now() - t))):
                return

    def stable_since(
        self, field: str, holds: Callable[[list[str]], bool], after: float = 0.0, until: float = math.inf
    ) -> float | None:
        """Time of the first sample in [``after``, ``until``) from which on ``holds(sample[field])`` is true in
        every sample up to ``until`` (so every gateway process agrees), or None."""
        found: float | None = None
        for s in self.samples:
            if s["t"] < after or s["t"] >= until or field not in s:
                continue
            if holds(s[field]):
                found = s["t"] if found is None else found
            else:
                found = None
        return found

    def aligned(self, run: dict[str, Any]) -> list[Record]:
        """The records of ``run`` (measured with this timeline) on its clock, exactly: records count from the
        first request's start, the timeline from its own start, a few milliseconds apart."""
        offset = self.t0 - float(run["client"]["origin_monotonic_s"])
        return [r.shifted(offset) for r in records_of(run)]

    def first(self, field: str, holds: Callable[[list[str]], bool], after: float = 0.0) -> float | None:
        return next((s["t"] for s in self.samples if s["t"] >= after and field in s and holds(s[field])), None)


def kill_until_back(tl: Timeline, system: RingServe, victim: str, at_s: float, timeout_s: float) -> bool:
    """At ``at_s``, SIGKILL worker ``victim`` (event ``kill``; supervisord restarts it) and wait until it is back
    in the ring as a new incarnation (event ``back``, True), or ``timeout_s`` passed (False)."""
    with Redis.from_url(system.redis_url) as redis:
        membership = Membership(redis, 0, ANNOUNCEMENTS)
        old = membership.alive()[victim].incarnation
        tl.sleep_until(at_s)
        system.kill(victim)
        tl.event("kill")

        def back() -> bool:
            member = membership.alive().get(victim)
            return member is not None and member.incarnation != old

        if tl.wait_for(back, timeout_s):
            tl.event("back")
            return True
    print(f"{victim} was not back within {timeout_s:g} s", flush=True)
    return False


def http_status(url: str) -> int | str:
    """The HTTP status of ``GET url``, or the name of the error when there was no answer."""
    try:
        with auth.get(url, STATS_TIMEOUT_S) as response:  # a model's readiness needs the API key, if any
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError as exc:
        return type(exc).__name__


def overlapping(records: Sequence[Record], start: float, end: float) -> list[Record]:
    """Requests in flight at any time within [start, end]."""
    return [r for r in records if r.end_s >= start and r.start_s <= end]


def p99_ms(records: Sequence[Record]) -> float | None:
    lat = sorted(r.latency_ms for r in records if r.ok)
    return percentile(lat, 99) if lat else None


def per_second(records: Sequence[Record], bin_s: float = 1.0) -> dict[str, Any]:
    """Per bin of ``bin_s`` by end time: successful requests/s, p99 ms, failed requests/s, and per node."""
    if not records:
        return {"t": [], "throughput_rps": [], "p99_ms": [], "errors_per_s": [], "nodes": {}}
    bins = max(1, round(max(r.end_s for r in records) / bin_s))  # the last answers, a few ms late, join the last bin
    ok: list[list[float]] = [[] for _ in range(bins)]
    errors = [0] * bins
    nodes: dict[str, list[int]] = {}
    for r in records:
        i = min(int(r.end_s / bin_s), bins - 1)
        if r.ok:
            ok[i].append(r.latency_ms)
            if r.node:
                nodes.setdefault(r.node, [0] * bins)[i] += 1
        else:
            errors[i] += 1
    return {
        "t": [round((i + 0.5) * bin_s, 3) for i in range(bins)],
        "throughput_rps": [len(v) / bin_s for v in ok],
        "p99_ms": [percentile(sorted(v), 99) if v else None for v in ok],
        "max_ms": [max(v) if v else None for v in ok],
        "errors_per_s": [e / bin_s for e in errors],
        "nodes": {n: [c / bin_s for c in counts] for n, counts in sorted(nodes.items())},
    }


def requests_per_node(records: Sequence[Record]) -> dict[str, int]:
    """Successful requests per node that answered, by node name."""
    out: dict[str, int] = {}
    for r in records:
        if r.ok and r.node:
            out[r.node] = out.get(r.node, 0) + 1
    return dict(sorted(out.items()))


def failed_by_status(records: Sequence[Record]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        if not r.ok:
            out[status_key(r)] = out.get(status_key(r), 0) + 1
    return out


def in_flight_balance(
    samples: Sequence[dict[str, Any]], nodes: Sequence[str], batch_rows: int, load_factor: float
) -> dict[str, Any]:
    """The busiest worker's rows in flight (summed over every gateway process) in each sample that has any.

    Per sample: busiest / max(``batch_rows``, ``load_factor`` × mean over ``nodes``), the bound bounded
    loads aim at (missing nodes count 0); its maximum over samples (> 1: the bound was exceeded at least
    once), how many samples exceeded it, and the median and p90 of busiest / mean.
    """
    over_bound, over_mean, busiest = [], [], []
    for s in samples:
        counts = [int(s.get("rows_in_flight", {}).get(n, 0)) for n in nodes]
        total = sum(counts)
        if "rows_in_flight" not in s or total <= 0:
            continue
        mean = total / len(nodes)
        busiest.append(max(counts))
        over_mean.append(max(counts) / mean)
        over_bound.append(max(counts) / max(batch_rows, load_factor * mean))
    return {
        "samples": len(over_bound),
        "samples_without_load": sum("rows_in_flight" in s for s in samples) - len(over_bound),
        "batch_rows": batch_rows,
        "load_factor": load_factor,
        "max_over_bound": max(over_bound, default=None),
        "samples_over_bound": sum(r > 1 for r in over_bound),
        "max_busiest_rows": max(busiest, default=None),
        "median_max_over_mean": statistics.median(over_mean) if over_mean else None,
        "p90_max_over_mean": percentile(sorted(over_mean), 90) if over_mean else None,
    }


def one_run_document(ctx: Context, doc: dict[str, Any], finding: dict[str, Any], **config: Any) -> dict[str, Any]:
    """The scenario document of a single live run: its command stamped on the run and on the whole."""
    return runs_document(ctx, [doc], finding, **config)


def runs_document(
    ctx: Context, runs: Sequence[dict[str, Any]], finding: dict[str, Any], **config: Any
) -> dict[str, Any]:
    """The scenario document of ``runs``: the command stamped on each and on the whole, whose configuration is
    the first run's plus ``config``."""
    for run in runs:
        run["config"]["command"] = ctx.command
    return scenario_document(ctx.name, {**runs[0]["config"], **config}, ctx.machine, runs, {ctx.name: finding})
