"""What /metrics shows, read from Redis (:func:`read_snapshot`) and written in Prometheus' text format
(:func:`render`): Triton's families under their exact names, then ringserve's own.

Pure but for :func:`read_snapshot`; every entry read from Redis is validated, and what does not
decode is left out and counted (``ringserve_metrics_unreadable``), never fatal to a scrape.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.client import Pipeline

from app.submit import live_reports, reported_rows
from tasks.contract import (
    LATENCY_LE,
    MAX_NAME_CHARS,
    METRICS_GATEWAYS_KEY,
    METRICS_KEY,
    SERIES_LABELS,
    STATS_BATCHES_KEY,
    STATS_DROPPED_KEY,
    STATS_ERRORS_KEY,
    STATS_EXPIRED_KEY,
    STATS_ROUTED_KEY,
    STATS_SPILLED_KEY,
    ContractError,
    Drops,
    Series,
    decode_series,
    metrics_gauges_key,
    queue_name,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")  # Triton's, in its order
RESEND_CAUSES = ("worker_left", "worker_silent", "redis_lost")
BATCH_SIZE_LE = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # rows per forward

# -- reading ----------------------------------------------------------------------------------

STATS_HASHES = {
    "routed": STATS_ROUTED_KEY,
    "spilled": STATS_SPILLED_KEY,
    "expired": STATS_EXPIRED_KEY,
    "dropped": STATS_DROPPED_KEY,
    "errors": STATS_ERRORS_KEY,
    "batches": STATS_BATCHES_KEY,
}


@dataclass
class Snapshot:
    """What one scrape shows: counters and gauges from Redis, and this process's view of the ring."""

    counters: dict[Series, int]  # METRICS_KEY
    gauges: Counter[Series]  # summed over the gateway processes that report
    stats: dict[str, dict[str, int]]  # the /stats hashes, by their name in STATS_HASHES
    members: dict[str, float]  # node -> weight
    depths: dict[str, int]  # node -> messages waiting in its queue
    rows_in_flight: dict[str, int]
    unreadable: int  # entries left out because they did not decode


class _Decoder:
    """Decodes hash entries, leaving out (and counting, and logging once a second) what is garbage."""

    def __init__(self, drops: Drops) -> None:
        self.drops = drops
        self.unreadable = 0

    def _bad(self, why: str) -> None:
        self.unreadable += 1
        self.drops.drop("metrics entries that do not decode", why)

    def series(self, raw: Mapping[bytes, bytes]) -> dict[Series, int]:
        out = {}
        for field, value in raw.items():
            try:
                series, n = decode_series(field, value)
            except ContractError as exc:
                self._bad(str(exc))
                continue
            out[series] = n
        return out

    def counts(self, raw: Mapping[bytes, bytes]) -> dict[str, int]:
        out = {}
        for field, value in raw.items():
            name = field.decode(errors="replace")
            if not value.isdigit() or not 0 < len(name) <= MAX_NAME_CHARS:
                self._bad(f"{name[:40]!r}: {value[:20]!r} is not a count")
                continue
            out[name] = int(value)
        return out


def queue_stats(pipe: Pipeline, nodes: list[str]) -> None:
    """Queue the reads of the /stats hashes and of each node's queue depth (see :func:`stats_of`)."""
    for key in STATS_HASHES.values():
        pipe.hgetall(key)
    for node in nodes:
        pipe.llen(queue_name(node))


def stats_of(results: list[Any], nodes: list[str]) -> tuple[dict[str, Any], dict[str, int]]:
    """What :func:`queue_stats` read: the hashes by their name in STATS_HASHES, and node -> queue depth."""
    hashes, depths = results[: len(STATS_HASHES)], results[len(STATS_HASHES) :]
    return dict(zip(STATS_HASHES, hashes, strict=True)), dict(zip(nodes, depths, strict=True))


def read_snapshot(redis: Redis, members: Mapping[str, float], drops: Drops) -> Snapshot:
    """Everything /metrics shows, in five round trips (and one more to prune departed reporters).
    Raises RedisError."""
    nodes = sorted(members)
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(METRICS_KEY)
    queue_stats(pipe, nodes)
    raw, *rest = pipe.execute()
    raw_stats, depths = stats_of(rest, nodes)
    decoder = _Decoder(drops)
    gauges: Counter[Series] = Counter()
    for _, report in live_reports(redis, METRICS_GATEWAYS_KEY, metrics_gauges_key):
        gauges.update(decoder.series(report))
    return Snapshot(
        counters=decoder.series(raw),
        gauges=gauges,
        stats={name: decoder.counts(h) for name, h in raw_stats.items()},
        members=dict(members),
        depths=depths,
        rows_in_flight=dict(reported_rows(redis)),
        unreadable=decoder.unreadable,
    )


# -- the text format --------------------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


class _Text:
    """Prometheus' text format (0.0.4), written line by line."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, labels: Iterable[tuple[str, str]], value: float) -> None:
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
        self.lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")

    def samples(self, name: str, label_names: tuple[str, ...], values: Mapping[tuple[str, ...], float]) -> None:
        for labels in sorted(values):  # labels sorted by name, as Triton writes them
            self.sample(name, sorted(zip(label_names, labels, strict=True)), values[labels])


TRITON_FAMILIES = (
    ("nv_inference_request_success", "counter", "Inference requests answered 200, each counted once whatever its rows"),
    ("nv_inference_request_failure", "counter", "Inference requests answered an error, by Triton's reason"),
    ("nv_inference_count", "counter", "Rows computed by the workers (cached answers excluded)"),
    ("nv_inference_exec_count", "counter", "Forward passes run by the workers; count / exec_count is the mean batch"),
    ("nv_inference_request_duration_us", "counter", "Cumulative gateway time of successful requests, microseconds"),
    ("nv_inference_queue_duration_us", "counter", "Cumulative time requests waited on their worker for a batch, us"),
    ("nv_inference_compute_infer_duration_us", "counter", "Cumulative forward time of each computed request, us"),
    ("nv_inference_pending_request_count", "gauge", "Requests sent to a worker and not answered yet"),
    ("nv_cache_num_hits_per_model", "counter", "Response cache lookups that found the answer"),
    ("nv_cache_num_misses_per_model", "counter", "Response cache lookups that did not"),
)
HISTOGRAMS = (
    ("ringserve_request_duration_seconds", "Gateway time of successful inference requests", "_sum_us"),
    ("ringserve_queue_wait_seconds", "Time a computed request waited on its worker for its batch", None),
    ("ringserve_batch_compute_seconds", "Duration of one forward pass", "_sum_us"),
)


def render(snap: Snapshot, served: Mapping[str, tuple[str, ...]]) -> str:
    """The exposition: Triton's families (every served model version, even at 0), then ringserve's."""
    by_name: dict[str, dict[tuple[str, ...], int]] = defaultdict(dict)
    for series, n in [*snap.counters.items(), *snap.gauges.items()]:
        by_name[series.name][series.labels] = n
    out = _Text()
    versions = [(m, v) for m, vs in served.items() for v in vs]
    for name, kind, help_text in TRITON_FAMILIES:
        values = by_name[name]
        extra = [(reason,) for reason in FAILURE_REASONS] if name == "nv_inference_request_failure" else [()]
        for model, version in versions:
            for more in extra:
                values.setdefault((model, version, *more), 0)
        out.family(name, kind, help_text)
        out.samples(name, SERIES_LABELS[name], values)
    _ringserve(out, snap, by_name)
    out.lines.append("")
    return "\n".join(out.lines)


def _ringserve(out: _Text, snap: Snapshot, by_name: Mapping[str, dict[tuple[str, ...], int]]) -> None:
    s = snap.stats
    per_node = (
        ("ringserve_requests_routed_total", "Requests sent to each worker (a re-sent one counts again)", s["routed"]),
        ("ringserve_requests_spilled_total", "Requests bounded loads sent past their key's owner", s["spilled"]),
        ("ringserve_requests_expired_total", "Requests a worker skipped: their deadline had passed", s["expired"]),
    )
    for name, help_text, values in per_node:
        out.family(name, "counter", help_text)
        out.samples(name, ("node",), {(k,): v for k, v in values.items()})
    resent = {(cause,): 0 for cause in RESEND_CAUSES} | by_name["ringserve_requests_resent"]
    out.family("ringserve_requests_resent_total", "counter", "Requests sent again after their worker was lost")
    out.samples("ringserve_requests_resent_total", ("cause",), resent)
    out.family("ringserve_requests_refused_for_memory_total", "counter", "Requests answered 503: Redis was full")
    refused = by_name["ringserve_requests_refused_for_memory"].get((), 0)
    out.sample("ringserve_requests_refused_for_memory_total", (), refused)
    out.family("ringserve_messages_dropped_total", "counter", "Messages dropped because they did not decode")
    out.samples("ringserve_messages_dropped_total", ("source",), {(k,): v for k, v in s["dropped"].items()})
    out.family("ringserve_http_errors_total", "counter", "Error answers of every route, by HTTP status")
    out.samples("ringserve_http_errors_total", ("status",), {(k,): v for k, v in s["errors"].items()})

    out.family("ringserve_ring_members", "gauge", "Workers in the ring")
    out.sample("ringserve_ring_members", (), len(snap.members))
    gauges = (
        ("ringserve_ring_member_weight", "Each worker's weight on the ring", snap.members),
        ("ringserve_queue_depth", "Messages waiting in each worker's queue", snap.depths),
        ("ringserve_rows_in_flight", "Rows the gateways have in flight at each worker", snap.rows_in_flight),
    )
    for name, help_text, node_values in gauges:
        out.family(name, "gauge", help_text)
        out.samples(name, ("node",), {(k,): v for k, v in node_values.items()})
    breakers = {(node,): 0 for node in snap.members} | by_name["ringserve_breaker_open"]
    out.family("ringserve_breaker_open", "gauge", "Gateway processes whose circuit breaker for a worker is not closed")
    out.samples("ringserve_breaker_open", ("node",), breakers)

    for name, help_text, sum_suffix in HISTOGRAMS:
        sums = by_name[name + sum_suffix] if sum_suffix else by_name["nv_inference_queue_duration_us"]
        _histogram(out, name, help_text, by_name[name + "_bucket"], sums)
    _batch_sizes(out, s["batches"])
    out.family("ringserve_metrics_unreadable", "gauge", "Entries of the metrics' Redis hashes this scrape left out")
    out.sample("ringserve_metrics_unreadable", (), snap.unreadable)


def _histogram(
    out: _Text,
    name: str,
    help_text: str,
    buckets: Mapping[tuple[str, ...], int],
    sums_us: Mapping[tuple[str, ...], int],
) -> None:
    """A histogram from per-bucket counts (labels end with ``le``) and sums in microseconds."""
    per_labels: dict[tuple[str, ...], dict[str, int]] = defaultdict(dict)
    for labels, n in buckets.items():
        per_labels[labels[:-1]][labels[-1]] = n
    out.family(name, "histogram", help_text)
    for labels in sorted(per_labels):
        pairs = list(zip(("model", "version"), labels, strict=True))
        total = 0
        for le in LATENCY_LE:
            total += per_labels[labels].get(le, 0)
            out.sample(name + "_bucket", [*pairs, ("le", le)], total)
        out.sample(name + "_sum", pairs, sums_us.get(labels, 0) / 1e6)
        out.sample(name + "_count", pairs, total)


def _batch_sizes(out: _Text, histogram: Mapping[str, int]) -> None:
    """Rows per forward, from /stats' {rows: forwards} (every worker, every model)."""
    sizes = {int(k): n for k, n in histogram.items() if k.isdigit()}
    out.family("ringserve_batch_size", "histogram", "Rows per forward pass, every worker and model")
    for le in BATCH_SIZE_LE:
        out.sample("ringserve_batch_size_bucket", [("le", str(le))], sum(n for k, n in sizes.items() if k <= le))
    out.sample("ringserve_batch_size_bucket", [("le", "+Inf")], sum(sizes.values()))
    out.sample("ringserve_batch_size_sum", (), sum(k * n for k, n in sizes.items()))
    out.sample("ringserve_batch_size_count", (), sum(sizes.values()))
