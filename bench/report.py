"""Plain-text rendering of results: one-line configurations (plot subtitles) and performance_report.txt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DISTURBED_SHARE = 0.1  # CPU of processes outside the measurement, above which a run is flagged


def _n(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def machine_line(machine: dict[str, Any]) -> str:
    load = machine.get("load_average_1m")
    return f"{machine.get('cores')} cores {machine.get('cpu_model')}, Python {machine.get('python')}" + (
        f", load avg {load:.1f} at start" if load is not None else ""
    )


def load_line(config: dict[str, Any]) -> str:
    """The load of a run in one line: model, size, concurrency, API, keys, system (what ``config`` has of them)."""
    parts = []
    if config.get("model"):
        parts.append(str(config["model"]))
    if config.get("requests") and config.get("duration_s"):
        parts.append(f"{config['duration_s']:g} s or {config['requests']:,} req, whichever first")
    elif config.get("requests"):
        parts.append(f"{config['requests']:,} req")
    elif config.get("duration_s"):
        parts.append(f"{config['duration_s']:g} s")
    if config.get("concurrent"):
        parts.append(f"{config['concurrent']} concurrent")
    if config.get("api"):
        parts.append(f"{config['api']} API")
    if config.get("keys"):
        parts.append(str(config["keys"]))
    if config.get("workers") is not None:
        parts.append(f"{config['workers']} workers")
    if config.get("settings"):
        parts.append(" ".join(f"{k}={v}" for k, v in config["settings"].items()))
    return " · ".join(parts)


def subtitle(runs: Sequence[dict[str, Any]], machine: dict[str, Any]) -> str:
    """What the runs' configurations have in common (what differs is in their labels) and the machine."""
    common = {k: v for k, v in runs[0]["config"].items() if all(r["config"].get(k) == v for r in runs)} if runs else {}
    line = load_line(common)
    return f"{line}\n{machine_line(machine)}" if line else machine_line(machine)


def run_section(run: dict[str, Any]) -> list[str]:
    s = run["summary"]
    lat = s["latency_ms"]
    client = run.get("client", {})
    lines = [
        f"== {run.get('label')} ({run.get('scenario')})",
        f"   load:        {load_line(run['config'])}",
        f"   requests:    {_n(s['requests'])}  successful {_n(s['successful'])}  failed {_n(s['failed'])}"
        + (f"  by status {s['failed_by_status']}" if s["failed_by_status"] else ""),
        f"   throughput:  {_n(s['throughput_rps'])} req/s over {_n(s['duration_s'], 2)} s",
        "   latency ms:  "
        + "  ".join(f"{k} {_n(lat[k], 2)}" for k in ("mean", "p50", "p95", "p99", "p999", "max", "std")),
        f"   nodes:       {s['nodes'] or '-'}  max/mean {_n(s['balance']['max_over_mean'], 3)}"
        f"  CV {_n(s['balance']['cv'], 3)}",
        f"   batch size:  mean {_n(s['mean_batch_size'], 2)} rows per forward",
        f"   client:      {_n(s['client_cpu_percent'])}% of a core,"
        f" {_n(client.get('cpu_us_per_request'))} µs CPU/request"
        f" (could drive {_n(client.get('capacity_rps_per_core'), 0)} req/s per core)"
        + ("  ** CLIENT SATURATED: figures may be the client's limit **" if client.get("saturated") else ""),
    ]
    cpu = run.get("server", {}).get("cpu")
    if cpu:
        per = cpu["cpu_ms_per_request"]
        lines.append(
            "   CPU ms/req:  " + "  ".join(f"{k} {v:.3f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))
        )
        busy = cpu["machine_busy_s"]
        share = cpu["cpu_s"].get("other", 0.0) / busy if busy else 0.0
        available = s["duration_s"] * (run.get("machine", {}).get("cores") or 1)
        lines.append(
            f"   machine busy {busy:.1f} of {available:.1f} CPU s ({100 * busy / max(available, 1e-9):.0f}%),"
            f" {100 * share:.0f}% of that by other processes"
            + ("  ** DISTURBED: a neighbour used the cores **" if share > DISTURBED_SHARE else "")
        )
    return lines


def findings_section(findings: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if "batching" in findings:
        b = findings["batching"]
        lines += [
            "== batching: dynamic batching on vs max_batch_size=1, same load",
            f"   throughput ratio on/off: {_n(b['throughput_ratio'], 2)}x",
            f"   p99 ms: on {_n(b['p99_ms']['on'], 1)}  off {_n(b['p99_ms']['off'], 1)}",
            f"   mean batch size: on {_n(b['mean_batch_size']['on'], 2)}  off {_n(b['mean_batch_size']['off'], 2)}",
        ]
    if "ceiling" in findings:
        lines.append("== ceiling: the model in-process (no HTTP, no queue), single-threaded BLAS")
        for p in findings["ceiling"]["points"]:
            lines.append(
                f"   {p['model']:<8} batch {p['batch']:>3}  {p['processes']} process(es):"
                f" {_n(p['rows_per_s'], 0)} rows/s"
            )
    if "served_vs_ceiling" in findings:
        for label, ratio in findings["served_vs_ceiling"].items():
            lines.append(f"   served/ceiling {label}: {100 * ratio:.3g}% of the in-process rows/s")
    if "scaling" in findings:
        sc = findings["scaling"]
        lines.append(f"== scaling on {sc['cores']} cores (every process shares them)")
        for p in sc["points"]:
            lines.append(f"   {p['workers']} workers: {_n(p['throughput_rps'])} req/s  p99 {_n(p['p99_ms'], 1)} ms")
    if "ring" in findings:
        r = findings["ring"]
        lines.append(f"== ring: {r['keys']:,} keys, {r['vnodes']} vnodes, hash {r['hash']}")
        lines.append("   nodes  max/mean     CV   moved on add (ideal)   moved on remove (ideal)")
        for p in r["points"]:
            lines.append(
                f"   {p['nodes']:>5}  {p['max_over_mean']:8.3f} {p['cv']:6.3f}   {p['moved_on_add']:.4f} "
                f"({p['ideal_on_add']:.4f})        {p['moved_on_remove']:.4f} ({p['ideal_on_remove']:.4f})"
            )
    if "wrk" in findings:
        w = findings["wrk"]
        lat = w["latency_ms"]
        lines += [
            f"== wrk -t{w['threads']} -c{w['connections']} on the same system (the C client, for reference)",
            f"   {_n(w['throughput_rps'])} req/s, p50 {_n(lat.get('p50'), 2)} ms, p99 {_n(lat.get('p99'), 2)} ms,"
            f" non-2xx {w['non_2xx']}, socket errors {w['socket_errors']};"
            f" wrk used {_n(w['cpu_percent'])}% of a core, {_n(w['cpu_us_per_request'])} µs CPU/request",
        ]
    if "failover" in findings:
        f = findings["failover"]
        ev, out = f["events_s"], f["outage"]
        lines += [
            f"== failover: SIGKILL {f['victim']} at {ev['kill']:.2f} s, restarted at {ev['restart']:.2f} s"
            f" (member ttl {f['member_ttl_ms']} ms)",
            f"   failed: {f['failed']:,} {f['failed_by_status'] or ''}  (target 0)",
            f"   ring healed {_n(f['heal_after_kill_s'], 2)} s after the kill (target <= 5 s);"
            f" rejoined {_n(f['rejoin_after_restart_s'], 2)} s after the restart",
            f"   outage (kill -> healed): {out['requests']:,} requests in flight, {out['failed']} failed,"
            f" p99 {_n(out['p99_ms'], 1)} ms (target <= 1000 ms);"
            f" p99 before the kill {_n(f['p99_before_kill_ms'], 1)} ms",
            f"   outage: slowest {_n(out.get('max_ms'), 1)} ms, {out.get('over_1s', '-')} requests over 1 s"
            " (those the killed worker held wait for the heal)",
            f"   throughput {_n(f['throughput_rps'])} req/s over the run",
        ]
    if "hotkey" in findings:
        h = findings["hotkey"]
        lines.append(f"== hotkey: Zipf s={h['zipf']:g}, bounded loads on and off")
        for mode, m in h["modes"].items():
            inf = m["in_flight"]
            lines.append(
                f"   {mode:<9} load factor {m['load_factor']:g}: requests per node {m['requests_per_node']}"
                f" max/mean {_n(m['requests_max_over_mean'], 3)}; in-flight busiest/mean median"
                f" {_n(inf['median_max_over_mean'], 2)} (p90 {_n(inf['p90_max_over_mean'], 2)},"
                f" {inf['samples']} samples);"
                f" {_n(m['throughput_rps'])} req/s, p99 {_n(m['p99_ms'], 1)} ms"
            )
        lines.append(f"   target: bounded in-flight busiest/mean <= {h['target_in_flight_max_over_mean']:g}")
    if "join" in findings:
        j = findings["join"]
        ev = j["events_s"]
        lines += [
            f"== join: {j['added']} added to {j['initial_nodes']} at {ev['add_worker']:.2f} s",
            f"   failed: {j['failed']:,} {j['failed_by_status'] or ''}  (target 0)",
            f"   announced in Redis at {_n(ev['announced'], 2)} s; every /stats sample shows it from"
            f" {_n(ev['shown'], 2)} s: {_n(j['shown_after_announced_s'], 2)} s after the announcement (target <= 2 s)",
            f"   requests per node before {j['requests_per_node_before']}  after {j['requests_per_node_after']}",
            f"   keys moved ({j['keys']:,} keys, {j['vnodes']} vnodes): {j['keys_moved']:.4f}"
            f" (ideal {j['ideal_moved']:.4f}, {j['moved_over_ideal']:.3f}x; target <= 1.1x)",
        ]
    if "skipped" in findings:
        for name, why in findings["skipped"].items():
            lines.append(f"== skipped {name}: {why}")
    return lines


def report(doc: dict[str, Any], runs: Sequence[dict[str, Any]]) -> str:
    machine = doc.get("machine") or (runs[0].get("machine", {}) if runs else {})
    config = doc.get("config", {})
    lines = [
        f"ringserve benchmark report: {doc.get('scenario')}",
        f"machine: {machine_line(machine)}",
        f"packages: {machine.get('packages')}  commit {machine.get('git_commit')}",
    ]
    if config.get("command"):
        lines.append(f"command: {config['command']}")
    lines.append("")
    for run in runs:
        lines += run_section(run) + [""]
    lines += findings_section(doc.get("findings", {}))
    return "\n".join(lines).rstrip() + "\n"
