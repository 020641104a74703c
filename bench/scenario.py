"""One command per scenario: ``python -m bench.scenario NAME [options]`` (``./docker-free-run.sh bench NAME``).

Each scenario starts what it needs, runs, stops what it started (also on error, Ctrl-C or
SIGTERM) and writes its results, plots and report to bench/results/NAME/ (or ``--out``).
``--tiny`` shrinks it to a few seconds (the test suite's size); explicit options still win.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from types import FrameType

from bench import analyze, machine
from bench.scenarios import (
    batching,
    binary,
    cache,
    ceiling,
    client,
    compare,
    failover,
    floor,
    hotkey,
    join,
    leave,
    load,
    redis_restart,
    ring,
    scaling,
    sharding,
    soak,
)
from bench.scenarios.spec import Context, Scenario
from bench.system import ROOT

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        *load.SCENARIOS,
        batching.SCENARIO,
        ceiling.SCENARIO,
        scaling.SCENARIO,
        ring.SCENARIO,
        compare.SCENARIO,
        floor.SCENARIO,
        client.SCENARIO,
        failover.SCENARIO,
        hotkey.SCENARIO,
        join.SCENARIO,
        leave.SCENARIO,
        redis_restart.SCENARIO,
        soak.SCENARIO,
        binary.SCENARIO,
        sharding.SCENARIO,
        cache.SCENARIO,
    )
}
RESULTS_DIR = ROOT / "bench" / "results"


def parser(tiny: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.scenario", description=__doc__)
    subs = p.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for s in SCENARIOS.values():
        sub = subs.add_parser(s.name, help=s.help, description=s.help)
        s.add_arguments(sub)
        sub.add_argument("--out", type=Path, help=f"results directory (default: {RESULTS_DIR}/{s.name})")
        sub.add_argument("--tiny", action="store_true", help="a run of seconds, for tests")
        if tiny:
            sub.set_defaults(**s.tiny)
    return p


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every `with`, which stops the systems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser("--tiny" in argv).parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    out: Path = args.out or RESULTS_DIR / scenario.name
    command = "python -m bench.scenario " + shlex.join(argv)
    ctx = Context(scenario.name, out, machine.describe(), command)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        doc = scenario.run(ctx, args)
    except KeyboardInterrupt:
        print(f"\n{scenario.name}: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    for path in analyze.write_all(doc, out):
        print(path, file=sys.stderr)
    print((out / analyze.REPORT_FILE).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
