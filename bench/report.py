"""Plain-text rendering of results: one-line configurations (plot subtitles) and performance_report.txt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.cpu import server_ms

FLOOR = "floor"  # the system name of the HTTP floor's runs (bench.peers.FLOOR)
DISTURBED_SHARE = 0.1  # CPU of processes outside the measurement, above which a run is flagged


def _n(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _percent(share: float | None, digits: int = 1) -> str:
    return "-" if share is None else f"{100 * share:.{digits}f} %"


def _moved_lines(seen: dict[str, Any], phases: dict[str, float | None], ideal: str, target: str) -> list[str]:
    """Keys moved by a join or leave, as observed in the answers (bench.scenarios.owners)."""
    if not seen["keys_in_both"]:
        return [
            f"   keys moved, observed in the answers: none to compare: no key was answered both before"
            f" {_n(phases['before_until'], 2)} s and after {_n(phases['after_from'], 2)} s"
            " (did the ring settle only after the load ended? a longer --duration would tell)"
        ]
    return [
        f"   keys moved, observed in the answers: of {seen['keys_in_both']:,} keys answered both before"
        f" {_n(phases['before_until'], 2)} s and after {_n(phases['after_from'], 2)} s, {seen['moved']:,} changed node:"
        f" {_percent(seen['moved_share'])} (ideal {ideal} = {_percent(seen['ideal'])};"
        f" {_n(seen['moved_over_ideal'], 2)}x the ideal; {target})",
        f"   of the {seen['stable_in_both']:,} of them answered by a single node in each phase,"
        f" {seen['moved_stable']:,} moved ({_percent(seen['moved_share_stable'])})",
    ]


def _affinity_lines(seen: dict[str, Any]) -> list[str]:
    """Keys answered by several nodes within one phase (same key routed twice, another node)."""
    aff = seen["affinity"]
    phases = [
        f"{name} {_percent(a['affinity'])} ({a['unstable']:,} unstable of {a['repeated']:,} keys answered"
        f" twice or more; {a['keys']:,} keys, {a['requests']:,} answers)"
        for name, a in (("before", aff["before"]), ("after", aff["after"]))
    ]
    return [
        f"   same key, same node (keys answered by one node only; target >= {_percent(aff['target'], 0)}):",
        *(f"     {p}" for p in phases),
    ]


def _redis_restart_lines(f: dict[str, Any]) -> list[str]:
    """Redis SIGKILLed and started again, empty: what the requests saw (bench.scenarios.redis_restart)."""
    ev, at, lat, rec, det = f["events_s"], f["in_flight_at_kill"], f["latency"], f["recovery"], f["detection_s"]
    timeout_s = f["request_timeout_ms"] / 1000
    lines = [
        f"== redis-restart: SIGKILL Redis at {ev['kill']:.2f} s, started again at {ev['restart']:.2f} s, answering"
        f" at {ev['redis_up']:.2f} s (outage {f['outage_s']:.2f} s; request timeout {timeout_s:g} s)",
        f"   failed: {f['failed']:,} of {f['requests']:,} {f['failed_by_status'] or ''}",
        f"   in flight at the kill: {at['requests']:,}, outcomes {at['outcomes']}; {at['timeout_outlasts_outage_ok']:,}"
        f" of the {at['timeout_outlasts_outage']:,} whose timeout outlasts the outage answered 200 (target: all);"
        f" slowest {_n(at['max_ms'], 1)} ms",
        f"   arrived while Redis was down: {f['arrived_while_down']['requests']:,},"
        f" outcomes {f['arrived_while_down']['outcomes']}; arrived after it answered: {f['arrived_after_up']}",
    ]
    for status, fs in f["failures"].items():
        lines.append(
            f"   {status}: {fs['count']:,} arrived {fs['before_kill']:,} before the kill, {fs['while_down']:,} while"
            f" Redis was down, {fs['after_up']:,} after it answered (first {fs['first_arrival_s']:.2f} s,"
            f" last {fs['last_arrival_s']:.2f} s)"
        )
    lines += [
        f"   detection: first 503 arrived {_n(det['down_first_503'], 2)} s after the kill,"
        f" last {_n(det['up_last_503'], 2)} s after Redis answered again"
        " (target: 503s only while it is down, plus the detection delay);"
        f" readiness probe (every {det['probe_interval_s']:g} s): 503 from {_n(det['down_not_ready'], 2)} s after the"
        f" kill, 200 again {_n(det['up_ready'], 2)} s after Redis answered",
        f"   slowest request {_n(lat['max_ms'], 1)} ms ({lat['max_status']}); {lat['over_timeout']:,} over the"
        f" {timeout_s:g} s request timeout (target 0); p99 before the kill {_n(lat['p99_before_kill_ms'], 1)} ms,"
        f" of those in flight at the kill {_n(lat['p99_in_flight_at_kill_ms'], 1)} ms",
        f"   full service {_n(rec['full_service_after_up_s'], 2)} s after Redis answered again (target <= 3 s): the"
        f" later of no failure after {_n(rec['no_failure_after_up_s'], 2)} s (last failed arrival) and throughput"
        f" back after {_n(rec['throughput_back_after_up_s'], 2)} s (first {rec['window_s']:g} s window with"
        f" >= {100 * rec['back_share']:.0f} % of the pre-kill {_n(rec['pre_kill_rps'])} req/s);"
        f" /stats answered again {_n(None if ev['stats_back'] is None else ev['stats_back'] - ev['redis_up'], 2)} s"
        " after",
        f"   throughput {_n(f['throughput_rps'])} req/s over the run",
    ]
    return lines


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
    if config.get("client"):
        parts.append(f"driven by {config['client']}")
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


def _per_request(per: dict[str, float]) -> str:
    """CPU ms per request of each process group, the largest first."""
    return "  ".join(f"{k} {v:.3f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))


def floor_cpu(runs: Sequence[dict[str, Any]]) -> dict[str, float] | None:
    """CPU ms per request of each process of the HTTP floor's run (scenario ``floor``) among ``runs``, if any."""
    for run in runs:
        if run.get("config", {}).get("system") == FLOOR and run.get("server", {}).get("cpu"):
            return run["server"]["cpu"]["cpu_ms_per_request"]  # type: ignore[no-any-return]
    return None


def floor_line(per: dict[str, float], floor: dict[str, float]) -> str:
    """A run's CPU per request beside the floor's: what its server does beyond parsing a body under granian."""
    base = server_ms(floor)
    line = f"   vs floor:    the floor's server {base:.3f} CPU ms/req (wrk {floor.get('client', 0.0):.3f});"
    if "gateway" in per:
        own = per["gateway"] - base
        line += f" gateway {per['gateway']:.3f} = floor + {own:.3f} ({per['gateway'] / max(base, 1e-9):.2f}x);"
    total = server_ms(per)
    return line + f" whole server {total:.3f} ({total / max(base, 1e-9):.2f}x)"


def run_section(run: dict[str, Any], floor: dict[str, float] | None = None) -> list[str]:
    """One run; with ``floor`` (:func:`floor_cpu`), its CPU per request beside the floor's."""
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
        f"   client:      {client.get('tool', 'ours')}, {_n(s['client_cpu_percent'])}% of a core,"
        f" {_n(client.get('cpu_us_per_request'))} µs CPU/request"
        f" (could drive {_n(client.get('capacity_rps_per_core'), 0)} req/s per core)"
        + ("  ** CLIENT SATURATED: figures may be the client's limit **" if client.get("saturated") else ""),
    ]
    cpu = run.get("server", {}).get("cpu")
    if cpu:
        per = cpu["cpu_ms_per_request"]
        lines.append(f"   CPU ms/req:  {_per_request(per)}")
        if floor is not None and run.get("config", {}).get("system") != FLOOR and per:
            lines.append(floor_line(per, floor))
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
            f"== failover: SIGKILL {f['victim']} at {ev['kill']:.2f} s; supervisord restarts it"
            f" (member ttl {f['member_ttl_ms']} ms)",
            f"   failed: {f['failed']:,} {f['failed_by_status'] or ''}  (target 0)",
            f"   back in the ring (new incarnation announced) {_n(f['back_after_kill_s'], 2)} s after the kill"
            " (target <= 5 s)",
            f"   outage (kill -> back): {out['requests']:,} requests in flight, {out['failed']} failed,"
            f" p99 {_n(out['p99_ms'], 1)} ms (target <= 1000 ms);"
            f" p99 before the kill {_n(f['p99_before_kill_ms'], 1)} ms",
            f"   outage: slowest {_n(out.get('max_ms'), 1)} ms, {out.get('over_1s', '-')} requests over 1 s"
            " (those the killed worker held wait until its return is seen)",
            f"   throughput {_n(f['throughput_rps'])} req/s over the run",
        ]
    if "hotkey" in findings:
        h = findings["hotkey"]
        lines += [
            f"== hotkey: Zipf s={h['zipf']:g}, bounded loads on and off; in flight: rows per worker summed over every"
            " gateway process (/stats every 100 ms)",
            f"   bound = max(one batch = {h['batch_rows']} rows, {h['bound_load_factor']:g} x mean over workers);"
            " targets: bounded busiest/bound never > 1, spills > 0 at 200 users, bounded throughput and p99"
            " at least as good as unbounded",
        ]
        for point in h["levels"]:
            for mode, m in point["modes"].items():
                inf = m["in_flight"]
                lines.append(
                    f"   {point['concurrent']:>4} users {mode:<9} (load factor {m['load_factor']:g}):"
                    f" {_n(m['throughput_rps'])} req/s, p99 {_n(m['p99_ms'], 1)} ms"
                    f" (medians of {point['rounds']}: {', '.join(_n(t) for t in m['throughput_rps_rounds'])} req/s),"
                    f" failed {m['failed']:,},"
                    f" spilled {m['spilled']:,} of {m['routed']:,} {m['spilled_per_node'] or ''};"
                    f" busiest/bound max {_n(inf['max_over_bound'], 2)} ({inf['samples_over_bound']} of"
                    f" {inf['samples']} samples > 1, busiest {_n(inf['max_busiest_rows'])} rows),"
                    f" busiest/mean median {_n(inf['median_max_over_mean'], 2)}"
                    f" (p90 {_n(inf['p90_max_over_mean'], 2)});"
                    f" requests per node {m['requests_per_node']} max/mean {_n(m['requests_max_over_mean'], 3)}"
                )
            r = point["bounded_over_unbounded"]
            lines.append(
                f"   {point['concurrent']:>4} users bounded/unbounded: throughput {_n(r['throughput'], 3)}x,"
                f" p99 {_n(r['p99'], 3)}x (lower is better)"
            )
    if "join" in findings:
        j = findings["join"]
        ev, seen = j["events_s"], j["observed"]
        new, n = j["added"], len(j["initial_nodes"])
        lines += [
            f"== join: {new} added to {j['initial_nodes']} at {ev['add_worker']:.2f} s;"
            f" {j['concurrent']} concurrent users over {j['keys']:,} keys",
            f"   failed: {j['failed']:,} {j['failed_by_status'] or ''}  (target 0)",
            f"   announced in Redis at {_n(ev['announced'], 2)} s; every /stats sample shows it from"
            f" {_n(ev['shown'], 2)} s: {_n(j['shown_after_announced_s'], 2)} s after the announcement (target <= 2 s)",
            f"   requests per node before the announcement {j['requests_per_node_before']}"
            f"  after /stats showed it {j['requests_per_node_after']}",
            *_moved_lines(seen, j["phases_s"], f"1/{n + 1}", "target <= 1.1x"),
            f"   moved to {new}: {seen['moved_to_new']:,}, between old workers: {seen['moved_between_old']:,}"
            f" (target: all to {new}, 0 between old workers); routes {seen['routes'] or '-'}",
            *_affinity_lines(seen),
            f"   computed, not observed: hashing.ring.Ring {n} -> {n + 1} nodes ({j['computed']['vnodes']} vnodes)"
            f" moves {_percent(j['computed']['moved_share'])} of the {j['keys']:,} keys",
        ]
    if "leave" in findings:
        lv = findings["leave"]
        ev, seen = lv["events_s"], lv["observed"]
        gone, n = lv["leaver"], len(lv["initial_nodes"])
        lines += [
            f"== leave: SIGTERM to {gone} of {lv['initial_nodes']} at {ev['sigterm']:.2f} s;"
            f" {lv['concurrent']} concurrent users over {lv['keys']:,} keys",
            f"   failed: {lv['failed']:,} {lv['failed_by_status'] or ''}  (target 0)",
            f"   gone from Redis at {_n(ev['unannounced'], 2)} s; every /stats sample shows the ring without it from"
            f" {_n(ev['gone'], 2)} s: {_n(lv['gone_after_sigterm_s'], 2)} s after the SIGTERM",
            f"   requests per node before the SIGTERM {lv['requests_per_node_before']}"
            f"  after /stats dropped it {lv['requests_per_node_after']}",
            *_moved_lines(seen, lv["phases_s"], f"1/{n}", f"only {gone}'s keys should move"),
            f"   {gone}'s keys: {seen['leaver_keys']:,}, moved {seen['leaver_keys_moved']:,} (target: all);"
            f" other workers' keys moved: {seen['moved_others']:,} (target 0);"
            f" answers by {gone} after it was gone: {seen['answered_by_leaver_after']:,} (target 0)",
            f"   routes {seen['routes'] or '-'}",
            *_affinity_lines(seen),
            f"   computed, not observed: hashing.ring.Ring {n} -> {n - 1} nodes ({lv['computed']['vnodes']} vnodes)"
            f" moves {_percent(lv['computed']['moved_share'])} of the {lv['keys']:,} keys",
        ]
    if "redis-restart" in findings:
        lines += _redis_restart_lines(findings["redis-restart"])
    if "soak" in findings:
        lines += _soak_lines(findings["soak"])
    if "sharding" in findings:
        lines += _sharding_lines(findings["sharding"])
    if "cache" in findings:
        lines += _cache_lines(findings["cache"])
    if "binary" in findings:
        lines += _binary_lines(findings["binary"])
    if "floor" in findings:
        fl = findings["floor"]
        lines += [
            f"== floor ({fl['server']}, constant reply): {_n(fl['throughput_rps'])} req/s,"
            f" p99 {_n(fl['p99_ms'], 2)} ms",
            f"   CPU ms/req: {_per_request(fl['cpu_ms_per_request'])}  (the floor of any Flask gateway here)",
        ]
    if "compare" in findings:
        lines += _compare_lines(findings["compare"])
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
    floor = floor_cpu(runs)
    for run in runs:
        lines += run_section(run, floor) + [""]
    lines += findings_section(doc.get("findings", {}))
    return "\n".join(lines).rstrip() + "\n"


def _soak_lines(f: dict[str, Any]) -> list[str]:
    window = f["window_s"]
    lines = [
        f"== soak: {f['duration_s']:.0f} s of steady load, {f['failed']:,} failed, {_n(f['throughput_rps'])} req/s;"
        f" memory: mean of the first {window:.0f} s vs the last {window:.0f} s (target: ratio <= 1.10)",
    ]
    for name, m in f["memory"].items():
        first, last = _n(m["first_mb"], 1), _n(m["last_mb"], 1)
        lines.append(f"   {name:<22} {first:>9} MB -> {last:>9} MB   x{_n(m['ratio'], 3)}")
    return lines


def _setting(setting: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items()) or "-"


def _compare_lines(c: dict[str, Any]) -> list[str]:
    """Each system at its best setting, the winner, then every setting's medians and rounds."""
    m = c["method"]
    blas = " ".join(f"{k}={v}" for k, v in m["blas"].items())
    lines = [
        f"== compare: each system at its best setting; {m['client']}, {m['rounds']} interleaved round(s) of"
        f" {_n(m['duration_s'], 0)} s, medians over rounds; {blas} in every process",
        f"   {'system':<10} {'best setting':<26} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}  server CPU ms/req",
    ]
    for name, b in c["best"].items():
        lines.append(
            f"   {name:<10} {_setting(b['setting']):<26} {_n(b['throughput_rps'], 0):>10} {_n(b['p50_ms'], 2):>8}"
            f" {_n(b['p99_ms'], 2):>8}  {b['server_cpu_ms_per_request']:.3f}"
        )
    ranked = sorted((b for name, b in c["best"].items() if name != FLOOR), key=lambda b: -b["throughput_rps"])
    if c.get("winner") and len(ranked) > 1:
        ratio = ranked[0]["throughput_rps"] / max(ranked[1]["throughput_rps"], 1e-9)
        lines.append(
            f"   winner: {c['winner']} at {_setting(ranked[0]['setting'])},"
            f" {ratio:.2f}x the runner-up {ranked[1]['system']} at {_setting(ranked[1]['setting'])}"
        )
    elif c.get("winner"):
        lines.append(f"   winner: {c['winner']} (the only server measured)")
    lines.append("   every setting: median req/s, p99 ms, server CPU ms/req (req/s of each round)")
    for p in c["configs"]:
        rounds = ", ".join(_n(r["throughput_rps"], 0) for r in p["rounds"])
        lines.append(
            f"     {p['label']:<36} {_n(p['throughput_rps'], 0):>10}  p99 {_n(p['p99_ms'], 2):>7}"
            f"  {p['server_cpu_ms_per_request']:.3f}  ({rounds})"
        )
    return lines


def _binary_lines(f: dict[str, Any]) -> list[str]:
    lines = [f"== binary: tritonclient's binary bytes vs v2 JSON, 1 row per request, {f['workers']} workers"]
    for model, m in f["models"].items():
        lines.append(
            f"   {model}: in-process ceiling {_n(m['ceiling_rows_per_s'], 0)} rows/s;"
            f" gateway CPU JSON/binary {_n(m['gateway_cpu_json_over_binary'], 2)}x;"
            f" throughput binary/JSON {_n(m['binary_over_json_throughput'], 2)}x"
        )
        for api, a in m["apis"].items():
            lines.append(
                f"     {api:<7} {_n(a['throughput_rps'], 0):>8} req/s  p99 {_n(a['p99_ms'], 1)} ms"
                f"  {100 * a['share_of_ceiling']:.1f}% of the ceiling  gateway {_n(a['gateway_cpu_ms_per_request'], 3)}"
                f" CPU ms/req  failed {a['failed']}"
            )
        peer = m.get("peer_best_json")
        if peer is None:
            continue
        if "throughput_rps" not in peer:
            why = "; ".join(sorted(set(peer["skipped"].values())))
            lines.append(f"     {peer['system']}: not run ({why})")
            continue
        setting = " ".join(f"{k}={v}" for k, v in peer["setting"].items())
        lines.append(
            f"     {peer['system']}'s best JSON, of {peer['settings_tried']} settings ({setting}):"
            f" {_n(peer['throughput_rps'], 0)} req/s  p99 {_n(peer['p99_ms'], 1)} ms;"
            f" ringserve binary/{peer['system']} {_n(m['binary_over_peer_best_json'], 2)}x"
        )
    return lines


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:,.1f} MB"


def _memory_lines(name: str, m: dict[str, Any], limit: int) -> list[str]:
    """Each sharded worker's memory, its table share against the ideal, and its cgroup when it had one."""
    lines = [
        f"   {name}: ideal share {_mb(m['ideal_share'])}; largest share {_n(m['max_over_ideal'], 3)}x the ideal"
        f" (target <= {m['target']:.2f}x)"
    ]
    for node, w in m["workers"].items():
        raw = m["raw"][node]
        cg = raw.get("cgroup")
        held = (raw.get("shard") or {}).get("held")
        lines.append(
            f"     {node}: {_mb(w['total'])} (anonymous {_mb(raw['anonymous'])}, table mapped"
            f" {_mb(raw['table_mapped'])}, peak RSS {_mb(raw['peak_rss'])}); table share {_mb(w['table_share'])}"
            f" = {_n(w['over_ideal'], 3)}x; holds {_n(held)} rows"
            + (f"; cgroup usage {_mb(cg['usage'])}, peak {_mb(cg['max_usage'])}, OOM kills {cg['oom_kills']}"
               f" (limit {_mb(limit)})" if cg else "")
        )  # fmt: skip
    return lines


def _load_line(name: str, r: dict[str, Any]) -> str:
    share = r["client_share_of_machine"]
    return (
        f"   {name}: {_n(r['throughput_rps'])} req/s, p50 {_n(r['p50_ms'], 1)} ms, p99 {_n(r['p99_ms'], 1)} ms,"
        f" {r['requests']:,} requests, failed {r['failed']:,} {r['failed_by_status'] or ''}, wrong answers"
        f" {r['mismatches']:,} (target 0), from the response cache {_n(r.get('cached'))}; client {_percent(share)} of"
        " the machine"
        + (" ** over 5 %: the client takes a visible share of the cores **" if share and share > 0.05 else "")
    )


def _sharding_lines(f: dict[str, Any]) -> list[str]:
    """The sharding scenario: memory per worker against the whole table, the limit, the load, join, leave, kill."""
    base, whole, refused = f["baseline"], f["unsharded"], f["over_limit"]
    j, lv = f["join"], f["leave"]
    ocg = refused.get("cgroup") or {}
    lines = [
        f"== sharding: {f['model']}, {f['rows']:,} rows = {_mb(f['table_bytes'])} of table, {f['workers']} workers;"
        f" memory = anonymous + resident pages of the table file; share = memory - the baseline worker's",
        f"   baseline worker (a table of 1,000 rows): {_mb(base['total'])} (anonymous {_mb(base['anonymous'])})",
        f"   unsharded worker (RINGSERVE_SHARDING=off): {_mb(whole['total'])}, table share {_mb(whole['table_share'])}"
        f" ({_n(whole['table_share'] / f['table_bytes'], 3)}x the table)",
        *_memory_lines("replicas 1", f["replicas1"], f["limit"]),
    ]
    if f.get("replicas2"):
        lines += _memory_lines("replicas 2 (no limit)", f["replicas2"], f["limit"])
    lines += [
        f"   memory limit {_mb(f['limit'])} ({f['limit'] / 2**20:,.0f} MiB): sharded workers"
        f" {'all fit' if f['replicas1']['fits_limit'] else 'DO NOT all fit'}; an unsharded worker added under it was"
        f" started {refused['starts']} times, killed {refused['killed']} times (cgroup OOM kills"
        f" {ocg.get('oom_kills', '-')}, peak usage {_mb(ocg.get('max_usage'))}); it announced itself:"
        f" {'yes' if refused['announced'] else 'no'}, ever held the table: {'YES' if refused['loaded'] else 'never'};"
        f" /v2/models/{f['model']}/ready answered {refused['model_ready_statuses']}"
        f" (watched {refused['watched_s']:g} s)",
        f"   OOM kills of the sharded workers under the limit, through every load, the join and the leave:"
        f" {f['oom_kills']} (target 0)"
        + (
            "; ** a killed worker is restarted and loads its rows again: the rows loaded by the join and the leave"
            " count those reloads **"
            if any(f["oom_kills"].values())
            else ""
        ),
        _load_line("steady load", f["steady"]),
        _load_line("load with join and leave", f["churn"]),
        f"   join of {j['added']}: failed {j['failed']:,} (target 0); add-worker -> in the ring"
        f" {_n(j['add_worker_to_joined_s'], 2)} s, -> every worker holds its rows {_n(j['joined_to_loaded_s'], 2)} s"
        f" later (its load {_n(j['load_s'], 2)} s), the others dropped what moved {_n(j['loaded_to_dropped_s'], 2)} s"
        f" after that; rows moved {j['moved_rows']:,} = {_percent(j['moved_share'])}"
        f" (ideal 1/{j['workers_before'] + 1} = {_percent(j['ideal_share'])}); rows loaded {j['loaded']}"
        f" = {_n(j['loaded_over_ideal'], 3)}x rows/(N+1) (target <= 1.1x); dropped {j['dropped']};"
        f" read from the file meanwhile {j['read_through']}",
        f"   graceful leave of {lv['leaver']}: failed {lv['failed']:,} (target 0); stopped in"
        f" {_n(lv['leave_to_left_s'], 2)} s, every worker holds its rows {_n(lv['left_to_loaded_s'], 2)} s later;"
        f" it held {lv['leaver_held']:,} rows, the others loaded {lv['loaded']}"
        f" = {_n(lv['loaded_over_leaver_held'], 3)}x that; read from the file meanwhile {lv['read_through']}",
    ]
    r2 = f.get("replicas2")
    if r2:
        ttl_s = r2["member_ttl_ms"] / 1000
        lines += [
            _load_line("replicas 2, SIGKILL under load", r2["kill"]),
            f"   SIGKILL {r2['victim']}: failed {r2['kill']['failed']:,} (target 0); the {r2['caught_at_kill']}"
            f" requests in flight at the kill answered within {_n(r2['served_again_s'], 2)} s (its rows served"
            f" again by their other holder; target <= member TTL + 1 s = {ttl_s + 1:g} s); back in the ring"
            f" {_n(r2['back_s'], 2)} s, every worker holding its rows again {_n(r2['restored_s'], 2)} s after the kill",
        ]
    lines.append(f"   wrong answers over every load: {f['mismatches']:,} (target 0; every answer checked to 1e-6)")
    return lines


def _cache_lines(f: dict[str, Any]) -> list[str]:
    """The cache scenario: hit rate, the three throughputs side by side, the gateway's CPU on a miss and a hit."""
    t, m, cpu = f["targets"], f["modes"], f["gateway_cpu_ms"]
    lines = [
        f"== cache: {f['model']}, {f['distinct']:,} new inputs a round, each repeated in the next;"
        f" {f['rounds']} interleaved rounds, medians; {f['concurrent']} users, {f['workers']} workers",
        f"   hit rate with repeats (/stats): {_percent(f['hit_rate'])} (target {_percent(t['hit_rate'], 0)}"
        f" +- {_percent(t['hit_rate_tolerance'], 0)}); repeats came >= {_n(f['min_gap_s'], 2)} s after their first"
        f" (wanted >= {f['gap_s']:g} s)",
    ]
    for mode, x in m.items():
        lines.append(
            f"   {mode:<10}: {_n(x['throughput_rps'])} req/s, p99 {_n(x['p99_ms'], 1)} ms, gateway"
            f" {_n(x['gateway_cpu_ms'], 3)} CPU ms/req, server {_n(x['server_cpu_ms'], 3)};"
            f" rounds {[round(r['throughput_rps']) for r in x['rounds']]} req/s"
        )
    lines += [
        f"   repeats / off: {_n(f['repeats_over_off'], 3)}x (target > {t['repeats_over_off']:g});"
        f" no repeats / off: {_n(f['no_repeats_over_off'], 3)}x (target >= {t['no_repeats_over_off']:g})",
        f"   gateway CPU ms/request: cache off {_n(cpu['off'], 3)}, miss {_n(cpu['miss'], 3)},"
        f" half hits {_n(cpu['half_hits'], 3)}, so a hit about {_n(cpu['hit_derived'], 3)} (2 x half hits - miss)",
        f"   failed {f['failed']:,}; wrong answers {f['mismatches']:,} (target 0; every answer checked to 1e-6)",
    ]
    return lines
