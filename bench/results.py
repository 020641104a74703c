"""The results files: one run's document, a scenario's document of several runs, reading them back.

A run document (what ``python -m bench.run`` writes, and each entry of a scenario's ``runs``)::

    {"scenario", "label", "config", "machine", "summary", "client", "server"?, "records" | "histogram"}

A run driven by wrk has no records: its histogram is rebuilt from wrk's quantiles, its ``client`` is
wrk's (with a ``tool``) and ``wrk`` holds wrk's own figures.

A scenario of several runs (batching, scaling, compare) or of none (ceiling, ring) writes::

    {"scenario", "config", "machine", "runs": [run, ...], "findings": {...}}

``summary`` always has exactly :data:`bench.stats.SUMMARY_KEYS`. Records are kept raw up to
:data:`MAX_RECORDS` per run; bigger runs keep a latency histogram instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import wrk
from bench.loadgen import LoadResult
from bench.record import Record
from bench.stats import histogram, summarize

RESULTS_FILE = "benchmark_results.json"
MAX_RECORDS = 200_000


def run_document(
    scenario: str,
    label: str,
    config: dict[str, Any],
    machine: dict[str, Any],
    result: LoadResult,
    server: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything about one run; the summary is computed here, from every record."""
    summary = summarize(result.records, result.cpu_s)
    doc: dict[str, Any] = {
        "scenario": scenario,
        "label": label,
        "config": config,
        "machine": machine,
        "summary": summary,
        "client": result.client(),
    }
    if server is not None:
        doc["server"] = server
    if len(result.records) <= MAX_RECORDS:
        doc["records"] = [r.as_json() for r in result.records]
    else:
        doc["histogram"] = histogram(r.latency_ms for r in result.records if r.ok)
    return doc


def wrk_run_document(
    scenario: str,
    label: str,
    config: dict[str, Any],
    machine: dict[str, Any],
    result: dict[str, Any],
    summary: dict[str, Any],
    server: dict[str, Any],
) -> dict[str, Any]:
    """Everything about one run driven by wrk (``result``: ``bench.wrk.run``; ``summary``: ``bench.wrk.summary``)."""
    return {
        "scenario": scenario,
        "label": label,
        "config": config,
        "machine": machine,
        "summary": summary,
        "client": wrk.client(result),
        "server": server,
        "histogram": wrk.latency_histogram(result),
        "wrk": {k: v for k, v in result.items() if k != "quantiles_ms"},
    }


def scenario_document(
    scenario: str,
    config: dict[str, Any],
    machine: dict[str, Any],
    runs: Sequence[dict[str, Any]] = (),
    findings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {"scenario": scenario, "config": config, "machine": machine, "runs": list(runs), "findings": findings or {}}


def headline(run: dict[str, Any]) -> dict[str, Any]:
    """The figures a scenario's findings quote of one run: its label, requests, throughput, p50 and p99."""
    summary = run["summary"]
    return {
        "label": run["label"],
        "requests": summary["requests"],
        "throughput_rps": summary["throughput_rps"],
        "p50_ms": summary["latency_ms"]["p50"],
        "p99_ms": summary["latency_ms"]["p99"],
    }


def runs_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The run documents inside either kind of results document."""
    if "runs" in doc:
        return list(doc["runs"])
    return [doc] if "summary" in doc else []


def records_of(run: dict[str, Any]) -> list[Record]:
    return [Record.from_json(r) for r in run.get("records", [])]


def _finite(value: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write(doc: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(doc), indent=1, allow_nan=False) + "\n")
    return path


def load(path: Path) -> dict[str, Any]:
    """A results document from a file, or from ``<dir>/benchmark_results.json``."""
    if path.is_dir():
        path = path / RESULTS_FILE
    return json.loads(path.read_text())  # type: ignore[no-any-return]
