"""Plots and a report from results: ``python -m bench.analyze bench/results/medium [more…] --out DIR``.

Writes latency_distribution.png, node_distribution.png, performance_comparison.png,
performance_report.txt and benchmark_results.json (several inputs are merged into one document),
plus the plots of the scenarios whose findings are present: batching_gain.png, scaling.png,
ring_balance.png, failover_timeline.png, hotkey_balance.png, join_timeline.png, leave_timeline.png,
redis_restart_timeline.png, soak_memory.png, sharding_memory.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bench import plots, report
from bench.results import RESULTS_FILE, load, records_of, runs_of, scenario_document, write
from bench.stats import histogram

REPORT_FILE = "performance_report.txt"


def latencies(run: dict[str, Any]) -> list[float]:
    """Latencies (ms) of successful requests; from the histogram (bin centres) when records were not kept."""
    if "records" in run:
        return [r.latency_ms for r in records_of(run) if r.ok]
    h = run.get("histogram") or histogram([])
    edges, counts = h["edges"], h["counts"]
    return [(edges[i] * edges[i + 1]) ** 0.5 for i, c in enumerate(counts) for _ in range(c)]


def summary_text(run: dict[str, Any]) -> str:
    return "\n".join(report.run_section(run))


def write_all(doc: dict[str, Any], out: Path) -> list[Path]:
    """Every artifact for one results document (a run or a scenario) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    runs = runs_of(doc)
    findings = doc.get("findings", {})
    machine = doc.get("machine") or (runs[0].get("machine", {}) if runs else {})
    sub = report.subtitle(runs, machine)
    written = [write(doc, out / RESULTS_FILE)]
    (out / REPORT_FILE).write_text(report.report(doc, runs))
    written.append(out / REPORT_FILE)
    references = [
        (f"ceiling {c['model']}\nbatch {c['batch']} ×{c['processes']}\n(rows/s, no HTTP)", c["rows_per_s"])
        for c in findings.get("ceiling", {}).get("points", [])
    ]
    if "wrk" in findings:
        references.append((f"wrk -t{findings['wrk']['threads']}\n(C client)", findings["wrk"]["throughput_rps"]))
    if runs:
        by_label = {str(r.get("label")): latencies(r) for r in runs}
        written.append(plots.latency_distribution(by_label, sub, out / "latency_distribution.png"))
        written.append(plots.node_distribution(runs, sub, out / "node_distribution.png"))
    comparison = out / "performance_comparison.png"
    if runs:
        written.append(plots.performance_comparison(runs, references, sub, comparison))
    elif "ceiling" in findings:
        ceiling_sub = f"{doc.get('config', {}).get('description', '')}\n{report.machine_line(machine)}"
        written.append(plots.ceiling(findings["ceiling"]["points"], ceiling_sub, comparison))
    if "batching" in findings:
        on = next(r for r in runs if r.get("label") == findings["batching"]["labels"]["on"])
        hist = on.get("server", {}).get("stats", {}).get("batch_size_histogram", {})
        written.append(plots.batching_gain(findings["batching"], hist, sub, out / "batching_gain.png"))
    if "scaling" in findings:
        written.append(plots.scaling(findings["scaling"], sub, out / "scaling.png"))
    if "failover" in findings:
        written.append(plots.failover_timeline(findings["failover"], sub, out / "failover_timeline.png"))
    if "hotkey" in findings:
        written.append(plots.hotkey_balance(findings["hotkey"], sub, out / "hotkey_balance.png"))
    if "join" in findings:
        written.append(plots.join_timeline(findings["join"], sub, out / "join_timeline.png"))
    if "leave" in findings:
        written.append(plots.leave_timeline(findings["leave"], sub, out / "leave_timeline.png"))
    if "redis-restart" in findings:
        written.append(plots.redis_restart_timeline(findings["redis-restart"], sub, out / "redis_restart_timeline.png"))
    if "soak" in findings:
        written.append(plots.soak_memory(findings["soak"], sub, out / "soak_memory.png"))
    if "sharding" in findings:
        written.append(plots.sharding_memory(findings["sharding"], sub, out / "sharding_memory.png"))
    if "ring" in findings:
        ring = findings["ring"]
        ring_sub = f"{ring['keys']:,} keys · {ring['vnodes']} vnodes per node · {ring['hash']}\n" + report.machine_line(
            machine
        )
        written.append(plots.ring_balance(ring, ring_sub, out / "ring_balance.png"))
    return written


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One document from several: all their runs, their findings merged (later inputs win)."""
    if len(docs) == 1:
        return docs[0]
    runs = [run for doc in docs for run in runs_of(doc)]
    findings: dict[str, Any] = {}
    for doc in docs:
        findings.update(doc.get("findings", {}))
    machine = docs[0].get("machine") or (runs[0].get("machine", {}) if runs else {})
    sources = [str(doc.get("scenario")) for doc in docs]
    return scenario_document("+".join(sources), {"sources": sources}, machine, runs, findings)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.analyze", description=__doc__)
    p.add_argument("inputs", nargs="+", type=Path, help="results files, or directories holding benchmark_results.json")
    p.add_argument("--out", type=Path, help="output directory (default: the first input's directory)")
    args = p.parse_args(argv)
    docs = [load(path) for path in args.inputs]
    out = args.out or (args.inputs[0] if args.inputs[0].is_dir() else args.inputs[0].parent)
    for path in write_all(merge(docs), out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
