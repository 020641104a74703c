"""The load generator on its own: ``python -m bench.run --requests 5000 --concurrent 50`` against a running server.

Writes one run document (see :mod:`bench.results`) and, with ``--analyze``, its plots and report.
Start the system yourself (``./docker-free-run.sh``); with ``--run-dir`` (default: ./run when it
holds pid files) the CPU of its processes is measured too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlsplit

from bench import analyze, auth, machine
from bench.cli import DEFAULT_URL, add_load_arguments, load_from_args
from bench.cpu import CpuMeter
from bench.loadgen import run_load
from bench.results import RESULTS_FILE, run_document, write
from bench.system import ROOT, stats_delta, supervised_pids
from bench.trial import warm_up


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--url", default=DEFAULT_URL, help="server base URL, or the full URL to POST")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "run", help="directory for the results")
    p.add_argument("--label", default="run", help="name of this run in plots and reports")
    p.add_argument("--run-dir", type=Path, default=ROOT / "run", help="ringserve run directory whose pids to meter")
    p.add_argument("--analyze", action="store_true", help="also write the plots and report")
    add_load_arguments(p)
    return p


def server_stats(url: str) -> dict[str, Any] | None:
    """GET /stats from a ringserve gateway; None for anything else."""
    parts = urlsplit(url)
    try:
        with auth.get(f"{parts.scheme}://{parts.netloc}/stats", 5) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except (URLError, OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    load = load_from_args(args, args.url)
    warm_up(load, args.warmup)
    pids = supervised_pids(args.run_dir)
    meter = CpuMeter(pids)
    before = server_stats(args.url)
    result = run_load(load, args.label, meter=meter)
    after = server_stats(args.url)
    server: dict[str, Any] = {"cpu": meter.report(sum(r.ok for r in result.records), result.cpu_s)}
    if before is not None and after is not None:
        server["stats"] = stats_delta(before, after)
    config = {**load.config(), "warmup_requests": args.warmup, "metered_processes": sorted(pids)}
    doc = run_document("run", args.label, config, machine.describe(), result, server)
    path = write(doc, args.out / RESULTS_FILE)
    print(analyze.summary_text(doc))
    if args.analyze:
        analyze.write_all(doc, args.out)
    print(f"results: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
