"""The figures: every one with a title, axis labels with units and the configuration as a subtitle.

Built on matplotlib's object API (``Figure``), which renders with Agg and keeps no global state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

DPI = 110
LOG_SCALE_SPREAD = 30  # bars further apart than this share a log axis, so that the small ones stay visible
NINES = (0, 1, 2, 3)  # x positions 0..3 on the percentile plot: 0%, 90%, 99%, 99.9%


def _figure(title: str, subtitle: str, panels: int, width_per_panel: float = 6.0) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width_per_panel * panels, 5.2), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    fig.suptitle(f"{title}\n{subtitle}", fontsize=11)
    return fig, list(axes)


THOUSANDS = FuncFormatter(lambda value, _: f"{value:,.0f}")  # 3,500,000 rather than 3.5 and "1e6" above
MINOR_LABELS_SPREAD = 30  # a log axis spanning less than this also labels its minor ticks (2, 3, 5…)
FEW_MINOR_LABELS_SPREAD = 1000  # …and one spanning less than this its 2s and 5s


def _plain(value: float) -> str:
    return f"{value:,.0f}" if value >= 1 else f"{value:g}"


def _plain_log(axis: Any) -> None:
    """Plain numbers (20, 50, 1,000) on a log axis, rather than 2×10^1; minor ticks only on short spans."""

    def minor(value: float, _: Any) -> str:
        low, high = axis.get_view_interval()
        spread = high / max(low, 1e-12)
        leading = round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0
        if spread < MINOR_LABELS_SPREAD or (spread < FEW_MINOR_LABELS_SPREAD and leading in (2, 5)):
            return _plain(value)
        return ""

    axis.set_major_formatter(FuncFormatter(lambda value, _: _plain(value)))
    axis.set_minor_formatter(FuncFormatter(minor))


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _labels(runs: Sequence[dict[str, Any]]) -> list[str]:
    return [str(r.get("label", i)) for i, r in enumerate(runs)]


def _bar_values(ax: Axes, bars: Any, fmt: str = "{:,.0f}") -> None:
    for bar in bars:
        height = bar.get_height()
        if height and math.isfinite(height):
            ax.annotate(
                fmt.format(height),
                (bar.get_x() + bar.get_width() / 2, height),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )


def latency_distribution(latencies: dict[str, list[float]], subtitle: str, path: Path) -> Path:
    """Histogram (log-spaced bins) and latency by percentile up to p99.9, one line per run."""
    fig, (hist, pct) = _figure("Latency distribution (successful requests)", subtitle, 2)
    values = [v for vs in latencies.values() for v in vs if v > 0]
    if values:
        bins = np.logspace(math.log10(min(values)), math.log10(max(values)), 60).tolist()
        for label, vs in latencies.items():
            if not vs:
                continue
            hist.hist(vs, bins=bins, histtype="step", linewidth=1.5, label=label)
            ordered = np.sort(vs)
            q = np.linspace(0, 0.999, 400)
            pct.plot(-np.log10(1 - q), np.quantile(ordered, q), label=label)
            for mark in (0.5, 0.99):
                pct.plot(-math.log10(1 - mark), float(np.quantile(ordered, mark)), "o", color="black", markersize=3)
        hist.set_xscale("log")
        _plain_log(hist.xaxis)
        hist.legend(fontsize=8)
        pct.set_yscale("log")
        _plain_log(pct.yaxis)
        pct.legend(fontsize=8)
    hist.set(xlabel="latency (ms, log scale)", ylabel="requests", title="Histogram")
    pct.set_xticks(NINES, ["0%", "90%", "99%", "99.9%"])
    pct.set(xlabel="percentile", ylabel="latency (ms, log scale)", title="Latency by percentile (dots: p50, p99)")
    pct.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def node_distribution(runs: Sequence[dict[str, Any]], subtitle: str, path: Path) -> Path:
    """Successful requests per worker, one group of bars per run, with each run's balance."""
    fig, (ax,) = _figure("Requests per worker (consistent-hash ring)", subtitle, 1, 9)
    with_nodes = [r for r in runs if r["summary"]["nodes"]]
    nodes = sorted({n for r in with_nodes for n in r["summary"]["nodes"]})
    if not with_nodes:
        ax.text(0.5, 0.5, "no run reported its nodes (peers do not say)", ha="center", transform=ax.transAxes)
    width = 0.8 / max(len(with_nodes), 1)
    for i, run in enumerate(with_nodes):
        counts = [run["summary"]["nodes"].get(n, 0) for n in nodes]
        b = run["summary"]["balance"]
        label = f"{run.get('label')}: max/mean {b['max_over_mean']:.3f}, CV {b['cv']:.3f}"
        x = np.arange(len(nodes)) + i * width
        bars = ax.bar(x, counts, width, label=label)
        _bar_values(ax, bars)
        own = [j for j, n in enumerate(nodes) if n in run["summary"]["nodes"]]  # the mean over this run's nodes
        ax.hlines(
            sum(counts) / len(own),
            x[own[0]] - width / 2,
            x[own[-1]] + width / 2,
            color=bars[0].get_facecolor(),
            linestyle="--",
            linewidth=1,
        )
    ax.set_xticks(np.arange(len(nodes)) + width * (len(with_nodes) - 1) / 2, nodes)
    ax.set(xlabel="worker", ylabel="successful requests", title="dashed: each run's mean per worker")
    if with_nodes:
        ax.set_ylim(top=1.35 * max(max(r["summary"]["nodes"].values()) for r in with_nodes))  # room for the legend
        ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def performance_comparison(
    runs: Sequence[dict[str, Any]], references: Sequence[tuple[str, float]], subtitle: str, path: Path
) -> Path:
    """Throughput of every run, of references measured alongside (the in-process ceiling in rows/s, wrk),
    and the runs' p50/p99 latency."""
    fig, (tput, lat) = _figure("Performance comparison", subtitle, 2, 7)
    labels = _labels(runs) + [label for label, _ in references]
    values = [r["summary"]["throughput_rps"] for r in runs] + [value for _, value in references]
    colors = ["tab:blue"] * len(runs) + ["tab:gray"] * len(references)
    bars = tput.bar(range(len(values)), values, 0.6, color=colors)
    for bar in bars[len(runs) :]:
        bar.set_hatch("//")
    for i, run in enumerate(runs):
        if run.get("client", {}).get("saturated"):
            tput.annotate(
                "client-bound",
                (i, values[i]),
                ha="center",
                xytext=(0, 12),
                textcoords="offset points",
                color="tab:red",
                fontsize=8,
            )
    _bar_values(tput, bars)
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > LOG_SCALE_SPREAD:
        tput.set_yscale("log")
        _plain_log(tput.yaxis)
    else:
        tput.yaxis.set_major_formatter(THOUSANDS)
    tput.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    tput.set(
        ylabel="requests/s (ceiling: rows/s)"
        if any(lbl.startswith("ceiling") for lbl, _ in references)
        else "requests/s",
        title="Throughput (grey, hatched: measured alongside for reference)" if references else "Throughput",
        xlim=(-0.7, max(len(values), 2) - 0.3),
    )
    x = np.arange(len(runs))
    for offset, key, color in ((-0.2, "p50", "tab:green"), (0.2, "p99", "tab:orange")):
        heights = [r["summary"]["latency_ms"][key] or 0 for r in runs]
        _bar_values(lat, lat.bar(x + offset, heights, 0.4, label=key, color=color), "{:,.1f}")
    lat.set_xticks(x, _labels(runs), rotation=20, ha="right", fontsize=8)
    lat.set(ylabel="latency (ms)", title="Latency p50 and p99", xlim=(-0.7, max(len(runs), 2) - 0.3))
    lat.legend(fontsize=8)
    return _save(fig, path)


def ceiling(points: Sequence[dict[str, Any]], subtitle: str, path: Path) -> Path:
    """In-process rows/s of each model: one panel per model, a bar per (batch size, processes)."""
    models = list(dict.fromkeys(p["model"] for p in points))
    fig, axes = _figure("In-process ceiling: the forward pass alone (no HTTP, no queue)", subtitle, len(models), 5.5)
    for ax, model in zip(axes, models, strict=True):
        mine = [p for p in points if p["model"] == model]
        labels = [f"batch {p['batch']}\n{p['processes']} process{'es' if p['processes'] > 1 else ''}" for p in mine]
        _bar_values(ax, ax.bar(labels, [p["rows_per_s"] for p in mine], 0.6, color="tab:gray", hatch="//"))
        ax.yaxis.set_major_formatter(THOUSANDS)
        ax.set(ylabel="rows/s", title=model)
    return _save(fig, path)


def batching_gain(finding: dict[str, Any], histogram: dict[str, int], subtitle: str, path: Path) -> Path:
    """Dynamic batching on vs off: throughput, p99, and the batch sizes the workers ran."""
    fig, (tput, p99, sizes) = _figure(
        f"Dynamic batching: {finding['throughput_ratio']:.2f}x the throughput of max_batch_size=1", subtitle, 3, 5
    )
    names = ["on", "off"]
    _bar_values(tput, tput.bar(names, [finding["throughput_rps"][n] for n in names], color=["tab:blue", "tab:gray"]))
    tput.set(xlabel="dynamic batching", ylabel="requests/s", title="Throughput")
    _bar_values(p99, p99.bar(names, [finding["p99_ms"][n] for n in names], color=["tab:blue", "tab:gray"]), "{:,.1f}")
    p99.set(xlabel="dynamic batching", ylabel="latency (ms)", title="p99 latency")
    if histogram:
        sizes_sorted = sorted(histogram, key=int)
        sizes.bar([int(s) for s in sizes_sorted], [histogram[s] for s in sizes_sorted], color="tab:blue")
    sizes.set(
        xlabel="rows per forward pass",
        ylabel="forward passes",
        title=f"Batch sizes with batching on (mean {finding['mean_batch_size']['on']:.1f})",
    )
    return _save(fig, path)


def scaling(finding: dict[str, Any], subtitle: str, path: Path) -> Path:
    """Throughput and p99 against the worker count, with linear scaling from one worker for reference."""
    fig, (tput, p99) = _figure(f"Scaling with workers on {finding['cores']} cores", subtitle, 2)
    points = finding["points"]
    workers = [p["workers"] for p in points]
    rps = [p["throughput_rps"] for p in points]
    cores = finding["cores"]
    tput.plot(workers, rps, "o-", label="measured (labels: mean rows per forward)")
    for p in points:
        if p.get("mean_batch_size"):
            tput.annotate(
                f"{p['mean_batch_size']:.1f}",
                (p["workers"], p["throughput_rps"]),
                xytext=(4, 6),
                textcoords="offset points",
                fontsize=8,
            )
    ideal = [rps[0] * min(w, cores) / min(workers[0], cores) for w in workers]
    tput.plot(workers, ideal, "--", color="gray", label=f"linear from {workers[0]}, up to {cores} cores")
    tput.axvline(cores, color="tab:red", linestyle=":", label=f"{cores} cores")
    tput.set(xlabel="workers", ylabel="requests/s", title="Throughput", xticks=workers)
    tput.yaxis.set_major_formatter(THOUSANDS)
    tput.set_ylim(bottom=0, top=1.15 * max(ideal + rps))
    tput.legend(fontsize=8)
    p99.plot(workers, [p["p99_ms"] for p in points], "o-", color="tab:orange")
    p99.set(xlabel="workers", ylabel="latency (ms)", title="p99 latency", xticks=workers)
    p99.set_ylim(bottom=0)
    return _save(fig, path)


def ring_balance(finding: dict[str, Any], subtitle: str, path: Path) -> Path:
    """Load spread and keys moved on add/remove against the ideal, for each ring size."""
    fig, (spread, cv, moved) = _figure("Consistent-hash ring: balance and movement", subtitle, 3, 5)
    points = finding["points"]
    n = [p["nodes"] for p in points]
    spread.plot(n, [p["max_over_mean"] for p in points], "o-")
    spread.axhline(1.0, color="gray", linestyle="--", label="perfect")
    spread.set(xlabel="nodes", ylabel="max / mean keys per node", title="Most loaded node", xticks=n)
    spread.legend(fontsize=8)
    cv.plot(n, [p["cv"] for p in points], "o-", color="tab:purple")
    cv.set(xlabel="nodes", ylabel="coefficient of variation", title="Spread of keys per node", xticks=n)
    cv.set_ylim(bottom=0)
    moved.plot(n, [100 * p["moved_on_add"] for p in points], "o", color="tab:blue", label="moved on add")
    moved.plot(n, [100 * p["ideal_on_add"] for p in points], "-", color="tab:blue", alpha=0.5, label="ideal 1/(N+1)")
    moved.plot(n, [100 * p["moved_on_remove"] for p in points], "s", color="tab:orange", label="moved on remove")
    moved.plot(n, [100 * p["ideal_on_remove"] for p in points], "-", color="tab:orange", alpha=0.5, label="ideal 1/N")
    moved.set(xlabel="nodes before the change (N)", ylabel="keys moved (%)", title="Keys moved", xticks=n)
    moved.legend(fontsize=8)
    return _save(fig, path)


EVENT_STYLES = {
    "kill": ("tab:red", "-"),
    "back": ("tab:green", "--"),
    "restart": ("tab:purple", "-"),
    "add_worker": ("tab:purple", "-"),
    "announced": ("tab:orange", ":"),
    "shown": ("tab:green", "--"),
    "sigterm": ("tab:red", "-"),
    "unannounced": ("tab:orange", ":"),
    "gone": ("tab:green", "--"),
    "redis_up": ("tab:green", "--"),
    "full_service": ("tab:blue", ":"),
    "not_ready": ("tab:orange", ":"),
    "ready_again": ("tab:olive", ":"),
}


def _events(ax: Axes, events: dict[str, float | None], label: bool) -> None:
    for name, t in events.items():
        if t is None or name not in EVENT_STYLES:
            continue
        color, style = EVENT_STYLES[name]
        ax.axvline(t, color=color, linestyle=style, linewidth=1.2, label=f"{name} ({t:.1f} s)" if label else None)


def failover_timeline(finding: dict[str, Any], subtitle: str, path: Path) -> Path:
    """Requests/s, p99 and errors per second over the run, with the kill and the worker's return marked."""
    back = finding["back_after_kill_s"]
    title = f"Failover: SIGKILL {finding['victim']}, {finding['failed']:,} failed requests" + (
        f", back in the ring {back:.1f} s after the kill" if back is not None else ", never back"
    )
    fig = Figure(figsize=(11, 8), layout="constrained")
    tput, p99, errors = fig.subplots(3, 1, sharex=True)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=11)
    series = finding["series"]
    t = series["t"]
    tput.plot(t, series["throughput_rps"], "o-", markersize=3)
    tput.set(ylabel="successful requests/s", title="Throughput per second (by end time)")
    tput.yaxis.set_major_formatter(THOUSANDS)
    tput.set_ylim(bottom=0)
    p99.plot(t, [v if v is not None else math.nan for v in series["p99_ms"]], "o-", markersize=3, color="tab:orange")
    if "max_ms" in series:
        p99.plot(t, [v if v is not None else math.nan for v in series["max_ms"]], ".", color="tab:gray", label="max")
    p99.axhline(finding["targets"]["outage_p99_ms"], color="gray", linestyle=":", label="target 1 s (outage p99)")
    p99.set_yscale("log")
    _plain_log(p99.yaxis)
    p99.set(
        ylabel="latency (ms, log scale)", title="p99 (line) and max (dots) latency per second (successful, by end time)"
    )
    errors.bar(t, series["errors_per_s"], width=0.8, color="tab:red")
    errors.set(xlabel="time since the load started (s)", ylabel="failed requests/s", title="Errors per second")
    for ax in (tput, p99, errors):
        _events(ax, finding["events_s"], ax is tput)
        ax.grid(True, alpha=0.3)
    tput.legend(fontsize=8, loc="lower left")
    p99.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def redis_restart_timeline(finding: dict[str, Any], subtitle: str, path: Path) -> Path:
    """Requests/s, p99 and max latency, and failures per second by status over the run, with the Redis
    kill, its restart, the moment it answered again and full service marked."""
    rec = finding["recovery"]
    full = rec["full_service_after_up_s"]
    title = (
        f"Redis SIGKILLed, restarted empty {finding['outage_s']:.1f} s later: {finding['failed']:,} failed"
        f" of {finding['requests']:,}, "
        + (f"full service {full:.1f} s after Redis answered again" if full is not None else "service never full again")
    )
    fig = Figure(figsize=(11, 8), layout="constrained")
    tput, lat, errors = fig.subplots(3, 1, sharex=True)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=11)
    series = finding["series"]
    t = series["t"]
    tput.plot(t, series["throughput_rps"], "o-", markersize=3)
    tput.axhline(rec["pre_kill_rps"], color="gray", linestyle="--", linewidth=1, label="pre-kill rate")
    tput.axhline(
        rec["back_share"] * rec["pre_kill_rps"],
        color="gray",
        linestyle=":",
        linewidth=1,
        label=f"{100 * rec['back_share']:.0f} % of it (throughput back)",
    )
    tput.set(ylabel="successful requests/s", title="Throughput per second (by end time)")
    tput.yaxis.set_major_formatter(THOUSANDS)
    tput.set_ylim(bottom=0)
    lat.plot(
        t,
        [v if v is not None else math.nan for v in series["p99_ms"]],
        "o-",
        markersize=3,
        color="tab:orange",
        label="p99",
    )
    lat.plot(t, [v if v is not None else math.nan for v in series["max_ms"]], ".", color="tab:gray", label="max")
    lat.axhline(finding["request_timeout_ms"], color="tab:red", linestyle=":", label="request timeout")
    lat.set_yscale("log")
    _plain_log(lat.yaxis)
    lat.set(
        ylabel="latency (ms, log scale)", title="p99 (line) and max (dots) latency per second (successful, by end time)"
    )
    bottom = np.zeros(len(t))
    for status, counts in finding["series"]["errors_by_status_per_s"].items():
        errors.bar(t, counts, width=0.8, bottom=bottom, label=status)
        bottom += np.array(counts)
    errors.set(
        xlabel="time since the load started (s)",
        ylabel="failed requests/s",
        title="Failures per second by status (by end time)",
    )
    events = {
        k: finding["events_s"][k] for k in ("kill", "not_ready", "restart", "redis_up", "ready_again", "full_service")
    }
    for ax in (tput, lat, errors):
        _events(ax, events, ax is tput)
        ax.grid(True, alpha=0.3)
    tput.legend(fontsize=8, loc="lower left")
    lat.legend(fontsize=8, loc="upper left")
    if finding["series"]["errors_by_status_per_s"]:
        errors.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def hotkey_balance(finding: dict[str, Any], subtitle: str, path: Path) -> Path:
    """Per run (users × bounded loads on/off): share of requests per worker, the busiest worker's rows in
    flight against the bound, and throughput with p99."""
    fig, (share, inflight, perf) = _figure(
        f"Hot keys (Zipf s={finding['zipf']:g}): bounded loads on and off", subtitle, 3, 5.5
    )
    runs = [(f"{p['concurrent']} users\n{mode}", m) for p in finding["levels"] for mode, m in p["modes"].items()]
    nodes = sorted({n for _, m in runs for n in m["nodes"]})
    width = 0.8 / max(len(nodes), 1)
    pos = np.arange(len(runs))
    for i, node in enumerate(nodes):
        values = [100 * m["share_per_node"].get(node, 0.0) for _, m in runs]
        share.bar(pos - 0.4 + (i + 0.5) * width, values, width, label=node)
    if nodes:
        share.axhline(100 / len(nodes), color="gray", linestyle="--", linewidth=1, label="even share")
    share.set_xticks(pos, [label for label, _ in runs], fontsize=8)
    share.set(ylabel="share of successful requests (%)", title="Requests per worker")
    share.set_ylim(top=1.3 * max([100 * v for _, m in runs for v in m["share_per_node"].values()] + [1]))
    share.legend(fontsize=8, loc="upper right")
    bound = [m["in_flight"]["max_over_bound"] or 0.0 for _, m in runs]
    medians = [m["in_flight"]["median_max_over_mean"] or 0.0 for _, m in runs]
    _bar_values(inflight, inflight.bar(pos - 0.2, bound, 0.4, label="max busiest / bound", color="tab:red"), "{:.2f}")
    _bar_values(inflight, inflight.bar(pos + 0.2, medians, 0.4, label="median busiest / mean"), "{:.2f}")
    inflight.axhline(1.0, color="tab:red", linestyle=":", label="target (bounded): max busiest / bound <= 1")
    inflight.set_xticks(pos, [f"{label}\n{m['in_flight']['samples']} samples" for label, m in runs], fontsize=8)
    inflight.set(
        ylabel="ratio",
        title=f"Rows in flight (all gateways, /stats every 100 ms)\nbound = max({finding['batch_rows']} rows,"
        f" {finding['bound_load_factor']:g} x mean)",
    )
    inflight.set_ylim(0, 1.3 * max(bound + medians + [1.5]))
    inflight.legend(fontsize=8, loc="upper left")
    colors = ["tab:blue" if "bounded" in label and "unbounded" not in label else "tab:gray" for label, _ in runs]
    _bar_values(perf, perf.bar(pos, [m["throughput_rps"] for _, m in runs], 0.6, color=colors))
    perf.set_xticks(pos, [label for label, _ in runs], fontsize=8)
    perf.set(ylabel="successful requests/s", title="Throughput (bars) and p99 (dots, right axis)")
    perf.yaxis.set_major_formatter(THOUSANDS)
    p99 = perf.twinx()
    p99.plot(pos, [m["p99_ms"] or math.nan for _, m in runs], "o", color="tab:orange")
    for x, (_, m) in zip(pos, runs, strict=True):
        if m["p99_ms"] is not None:
            p99.annotate(
                f"{m['p99_ms']:.0f} ms", (x, m["p99_ms"]), xytext=(6, 0), textcoords="offset points", fontsize=8
            )
    p99.set_ylabel("p99 latency (ms)")
    p99.set_ylim(bottom=0, top=1.3 * max([m["p99_ms"] or 0.0 for _, m in runs] + [1.0]))
    return _save(fig, path)


def _membership_timeline(finding: dict[str, Any], title: str, moved: dict[str, int], subtitle: str, path: Path) -> Path:
    """Requests/s per worker over the run with the membership events marked, and what the answers showed
    of the keys: answered in both phases, moved (split as ``moved`` says), unstable within a phase."""
    fig = Figure(figsize=(15, 5.6), layout="constrained")
    ax, keys = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.4, 1]})
    fig.suptitle(f"{title}\n{subtitle}", fontsize=11)
    series = finding["series"]
    for node, values in series["nodes"].items():
        ax.plot(series["t"], values, "o-", markersize=3, label=node)
    _events(ax, finding["events_s"], True)
    for name, t in finding["phases_s"].items():
        if t is not None and name == "before_until":
            ax.axvspan(0, t, color="tab:gray", alpha=0.08, label="before phase")
        elif t is not None:
            ax.axvspan(t, max(series["t"], default=t) + 0.5, color="tab:green", alpha=0.08, label="after phase")
    ax.set(
        xlabel="time since the load started (s)",
        ylabel="successful requests/s",
        title="Requests per second per worker (by end time)",
    )
    ax.yaxis.set_major_formatter(THOUSANDS)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    seen = finding["observed"]
    aff = seen["affinity"]
    labels = ["answered\nin both", *moved, "unstable\nbefore", "unstable\nafter"]
    values = [seen["keys_in_both"], *moved.values(), aff["before"]["unstable"], aff["after"]["unstable"]]
    colors = ["tab:gray"] + ["tab:blue"] * len(moved) + ["tab:red"] * 2
    _bar_values(keys, keys.bar(range(len(values)), values, 0.6, color=colors))
    keys.axhline(
        seen["ideal"] * seen["keys_in_both"],
        color="tab:blue",
        linestyle=":",
        label="ideal moved share × answered in both",
    )
    keys.set_xticks(range(len(labels)), labels, fontsize=8)
    keys.set(
        ylabel="routing keys",
        xlabel="unstable: answered by more than one node within a phase",
        title="Routing keys, from the answers' node",
    )
    keys.set_ylim(top=1.2 * max(values + [1]))
    keys.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def join_timeline(finding: dict[str, Any], subtitle: str, path: Path) -> Path:
    """A live join: requests/s per worker with add-worker, announcement and ring update marked; keys moved."""
    seen, new = finding["observed"], finding["added"]
    share = seen["moved_share"]
    title = f"Live join of {new}: {finding['failed']:,} failed requests, " + (
        f"keys moved {100 * share:.1f}% observed (ideal {100 * seen['ideal']:.1f}%)"
        if share is not None
        else "no key answered both before and after"
    )
    moved = {f"moved to\n{new}": seen["moved_to_new"], "moved between\nold workers": seen["moved_between_old"]}
    return _membership_timeline(finding, title, moved, subtitle, path)


def leave_timeline(finding: dict[str, Any], subtitle: str, path: Path) -> Path:
    """A graceful leave: requests/s per worker with the SIGTERM and ring update marked; keys moved."""
    seen, gone = finding["observed"], finding["leaver"]
    share = seen["moved_share"]
    title = f"Graceful leave of {gone} (SIGTERM): {finding['failed']:,} failed requests, " + (
        f"keys moved {100 * share:.1f}% observed (ideal {100 * seen['ideal']:.1f}%)"
        if share is not None
        else "no key answered both before and after"
    )
    moved = {f"moved:\n{gone}'s": seen["leaver_keys_moved"], "moved:\nothers'": seen["moved_others"]}
    return _membership_timeline(finding, title, moved, subtitle, path)


def soak_memory(finding: dict[str, Any], subtitle: str, path: Path) -> Path:
    """Redis's used memory and each process's resident memory over a long steady load."""
    worst, ratio = finding["worst"], finding["max_ratio"]
    title = f"Soak: memory over {finding['duration_s']:.0f} s of steady load, {finding['failed']:,} failed" + (
        f"; largest last/first-minute ratio {ratio:.3f} ({worst})" if ratio is not None else ""
    )
    fig = Figure(figsize=(11, 6), layout="constrained")
    ax = fig.subplots()
    fig.suptitle(f"{title}\n{subtitle}", fontsize=11)
    samples = finding["memory_samples"]
    for name in finding["memory"]:
        points = [(s["t"], s[name] / 1e6) for s in samples if name in s]
        ax.plot([t for t, _ in points], [v for _, v in points], ".-", markersize=3, label=name)
    ax.set(xlabel="time since the load started (s)", ylabel="MB", title="Redis used_memory and process RSS")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    return _save(fig, path)


def sharding_memory(finding: dict[str, Any], subtitle: str, path: Path) -> Path:
    """Memory per worker, split into what a worker costs without the table (the baseline) and the table's
    share: the sharded workers (replicas 1, and 2), the unsharded worker, with the memory limit; and each
    worker's table share over its ideal (table x replicas / workers)."""
    table_mb, baseline = finding["table_bytes"] / 1e6, finding["baseline"]["total"] / 1e6
    groups = [(f"sharded\n{name}", m) for name, m in finding["replicas1"]["raw"].items()]
    if finding.get("replicas2"):
        groups += [(f"replicas 2\n{name}", m) for name, m in finding["replicas2"]["raw"].items()]
    groups.append(("unsharded\nworker_1", finding["unsharded"]))
    title = (
        f"Sharded table ({finding['rows']:,} rows, {table_mb:,.0f} MB) over {finding['workers']} workers:"
        f" largest share {finding['replicas1']['max_over_ideal']:.2f}x table/W"
    )
    fig, (mem, ratio) = _figure(title, subtitle, 2, 7)
    x = np.arange(len(groups))
    totals = [m["total"] / 1e6 for _, m in groups]
    mem.bar(x, [baseline] * len(groups), 0.6, color="tab:gray", label=f"baseline worker ({baseline:,.0f} MB)")
    mem.bar(x, [t - baseline for t in totals], 0.6, bottom=baseline, color="tab:blue", label="the table's share")
    for i, total in enumerate(totals):
        mem.annotate(f"{total:,.0f}", (i, total), ha="center", va="bottom", fontsize=8)
    peaks = [m["peak_rss"] / 1e6 for _, m in groups]
    mem.plot(x, peaks, "_", color="black", markersize=22, label="peak RSS (VmHWM: also files)")
    limit = finding["limit"] / 1e6
    mem.axhline(limit, color="tab:red", linestyle="--", label=f"limit {finding['limit'] / 2**20:,.0f} MiB")
    mem.set_xticks(x, [label for label, _ in groups], fontsize=8)
    mem.set(ylabel="MB (anonymous + mapped table)", title="Memory per worker")
    mem.set_ylim(top=1.2 * max(totals + peaks + [limit]))
    mem.legend(fontsize=8, loc="upper left")
    ideal = [("replicas1", 1)] + ([("replicas2", 2)] if finding.get("replicas2") else [])
    shares = [(f"r{r}\n{name}", w["over_ideal"]) for key, r in ideal for name, w in finding[key]["workers"].items()]
    shares.append(("unsharded\n(ideal: table)", finding["unsharded"]["table_share"] / finding["table_bytes"]))
    _bar_values(ratio, ratio.bar(range(len(shares)), [v for _, v in shares], 0.6), "{:.2f}")
    ratio.axhline(finding["replicas1"]["target"], color="tab:red", linestyle=":", label="target 1.10")
    ratio.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="ideal: table x replicas / workers")
    ratio.set_xticks(range(len(shares)), [label for label, _ in shares], fontsize=8)
    ratio.set(ylabel="table share / ideal", title="Each sharded worker's table share against its ideal")
    ratio.set_ylim(0, 1.3 * max([v for _, v in shares] + [1.2]))
    ratio.legend(fontsize=8, loc="upper left")
    return _save(fig, path)
