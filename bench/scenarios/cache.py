"""``cache``: the response cache against no cache, on loads whose repeats come at least ``--gap`` s after their first.

Two systems side by side, started once and kept: one with ``RINGSERVE_CACHE=off``, one with it on. Each round
runs three loads in turn, each a scripted sequence of v2 requests of one row (``bench.pool``: every answer is
checked against the model run in this process, so a wrong cached answer is counted, not served unnoticed):

1. *off*: ``--distinct`` new inputs, the i-th interleaved with the repeat of the i-th input of the previous
   round (the first round repeats a prologue's): half the requests are repeats;
2. *repeats*: the same sequence against the cache, started no sooner than ``--gap`` s after the cached system's
   previous such load ended, so every repeat comes at least ``--gap`` s after its first (measured, too);
3. *no repeats*: ``2 x --distinct`` inputs never sent before: every request misses (lookup and lock, compute,
   store).

The prologue (each system gets it: its warm-up) sends the first ``--distinct`` inputs once. Figures are medians
over rounds; the hit rate is what ``/stats`` counted during the load. Targets: a hit rate of 50 +- 2 % with
repeats; throughput with repeats above the cache off; without repeats at least 0.95 x the cache off.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import trial
from bench.cli import load_from_args
from bench.cpu import server_ms
from bench.keys import KeySpace
from bench.loadgen import Load, run_load
from bench.pool import MISMATCH, RequestPool
from bench.results import headline, records_of, scenario_document
from bench.scenarios.spec import Context, Scenario, add_served_arguments
from bench.system import RingServe
from tasks.metadata import load_repository
from tasks.repository import Repository
from tasks.settings import MODEL_REPOSITORY

MODES = {"off": {"CACHE": "off"}, "repeats": {"CACHE": "on"}, "no repeats": {"CACHE": "on"}}
TARGETS = {"hit_rate": 0.5, "hit_rate_tolerance": 0.02, "repeats_over_off": 1.0, "no_repeats_over_off": 0.95}
COUNTS = ("hits", "coalesced", "misses")
MEDIANS = ("throughput_rps", "p99_ms", "gateway_cpu_ms", "server_cpu_ms", "hit_rate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_served_arguments(parser, concurrent=50, api="v2")
    group = parser.add_argument_group("cache (the sequence sets the requests: --requests, --duration, --keys unused)")
    group.add_argument("--distinct", type=int, default=2_500, help="new inputs per round, each repeated next round")
    group.add_argument("--rounds", type=int, default=3, help="rounds of the three loads, interleaved")
    group.add_argument("--gap", type=float, default=1.0, help="least seconds between an input's first and its repeat")


class Inputs:
    """Every request of the scenario, built and answered once: the prologue's and each round's new inputs
    (``(rounds + 1) x distinct``), then the inputs never repeated (``rounds x 2 x distinct``)."""

    def __init__(self, model: str, distinct: int, rounds: int, seed: int, folder: Path) -> None:
        meta = load_repository(MODEL_REPOSITORY)[model]
        forward = Repository(MODEL_REPOSITORY, sharding=False).get(model).forward
        self.distinct, self.folder = distinct, folder
        self.fresh_from = (rounds + 1) * distinct
        self.pool = RequestPool.build(meta, forward, self.fresh_from + rounds * 2 * distinct, 1, seed)

    def new(self, r: int) -> list[int]:
        """The inputs first sent in round ``r`` (0: the prologue)."""
        return list(range(r * self.distinct, (r + 1) * self.distinct))

    def repeating(self, r: int) -> list[int]:
        """Round ``r``'s sequence: its i-th new input, then the repeat of round ``r - 1``'s i-th."""
        return [i for pair in zip(self.new(r), self.new(r - 1), strict=True) for i in pair]

    def never_repeated(self, r: int) -> list[int]:
        start = self.fresh_from + (r - 1) * 2 * self.distinct
        return list(range(start, start + 2 * self.distinct))

    def saved(self, name: str, sequence: Sequence[int]) -> str:
        """A pool file whose request ``n`` is input ``sequence[n]``."""
        pool = self.pool
        picked = RequestPool(
            pool.model,
            [pool.bodies[i] for i in sequence],
            {name: [parts[i] for i in sequence] for name, parts in pool.expected.items()},
        )
        return str(picked.save(self.folder / f"{name}.npz"))


def sequence_load(base: Load, pool: str, length: int) -> Load:
    """``base`` sending the pool's requests once each, in order."""
    keys = KeySpace(length, ordered=True)
    return dataclasses.replace(base, pool=pool, requests=length, duration_s=None, keys=keys)


def sent_at(run_origin: float, records: Sequence[Any], sequence: Sequence[int]) -> dict[int, float]:
    """Input -> when (this machine's monotonic clock) its request started, from a load's records."""
    return {sequence[r.key]: run_origin + r.start_s for r in records if r.key is not None}


def figures(run: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What one load measured: throughput, latency, CPU per request, and what the cache counted meanwhile."""
    summary, per_request = run["summary"], run["server"]["cpu"]["cpu_ms_per_request"]
    counted = {k: int(after.get(k, 0)) - int(before.get(k, 0)) for k in COUNTS}
    total = sum(counted.values())
    records = records_of(run)
    return headline(run) | {
        "failed": summary["failed"],
        "mismatches": sum(r.error == MISMATCH for r in records),
        "cached_answers": sum(r.cached is True for r in records),
        "counted": counted,
        "hit_rate": (counted["hits"] + counted["coalesced"]) / total if total else None,
        "gateway_cpu_ms": per_request.get("gateway"),
        "server_cpu_ms": server_ms(per_request),
    }


def _median(rounds: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rounds if r[key] is not None]
    return statistics.median(values) if values else None


Rounds = dict[str, list[dict[str, Any]]]


def summarize(by_mode: Rounds, gap_s: float | None, args: argparse.Namespace) -> dict[str, Any]:
    """Medians per mode, the two throughput ratios and the gateway's CPU per request on a miss and on a hit."""
    medians = {mode: {key: _median(rounds, key) for key in MEDIANS} for mode, rounds in by_mode.items()}
    off, repeats, fresh = (medians[m] for m in MODES)
    gateway = {"off": off["gateway_cpu_ms"], "miss": fresh["gateway_cpu_ms"], "half_hits": repeats["gateway_cpu_ms"]}
    hit = None  # half the repeats load hits, half misses like every request without repeats
    if gateway["miss"] is not None and gateway["half_hits"] is not None:
        hit = 2 * gateway["half_hits"] - gateway["miss"]
    return {
        "model": args.model,
        "distinct": args.distinct,
        "rounds": args.rounds,
        "concurrent": args.concurrent,
        "workers": args.workers,
        "gap_s": args.gap,
        "min_gap_s": gap_s,
        "modes": {mode: medians[mode] | {"rounds": rounds} for mode, rounds in by_mode.items()},
        "hit_rate": repeats["hit_rate"],
        "repeats_over_off": _ratio(repeats["throughput_rps"], off["throughput_rps"]),
        "no_repeats_over_off": _ratio(fresh["throughput_rps"], off["throughput_rps"]),
        "gateway_cpu_ms": gateway | {"hit_derived": hit},
        "failed": sum(r["failed"] for rounds in by_mode.values() for r in rounds),
        "mismatches": sum(r["mismatches"] for rounds in by_mode.values() for r in rounds),
        "targets": TARGETS,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    if args.processes != 1 or args.distinct < 1 or args.rounds < 1:
        raise SystemExit("cache sends a scripted sequence: --processes 1, --distinct and --rounds at least 1")
    base = load_from_args(args)
    runs: list[dict[str, Any]] = []
    by_mode: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    first_sent: dict[int, float] = {}  # input -> when the cached system got it first
    gaps: list[float] = []
    repeats_ended = 0.0  # when the cached system's last load with first sends ended
    with tempfile.TemporaryDirectory(prefix="ringserve-cache-") as tmp, ExitStack() as stack:
        inputs = Inputs(args.model, args.distinct, args.rounds, args.seed, Path(tmp))
        systems = {
            name: stack.enter_context(RingServe(ctx.run_dir(name), args.workers, settings))
            for name, settings in (("off", MODES["off"]), ("on", MODES["repeats"]))
        }
        prologue = inputs.saved("prologue", inputs.new(0))
        for name, system in systems.items():
            load = dataclasses.replace(sequence_load(base, prologue, args.distinct), url=system.url)
            done = run_load(load, f"prologue ({name})", progress=False)
            if name == "on":
                first_sent |= sent_at(done.origin_s, done.records, inputs.new(0))
                repeats_ended = done.origin_s + max(r.end_s for r in done.records)
        for r in range(1, args.rounds + 1):
            repeating, fresh = inputs.repeating(r), inputs.never_repeated(r)
            repeating_pool = inputs.saved(f"repeating-{r}", repeating)
            plan = [
                ("off", systems["off"], repeating_pool, repeating),
                ("repeats", systems["on"], repeating_pool, repeating),
                ("no repeats", systems["on"], inputs.saved(f"fresh-{r}", fresh), fresh),
            ]
            for mode, system, pool, sequence in plan:
                if mode == "repeats":
                    time.sleep(max(0.0, repeats_ended + args.gap - time.monotonic()))
                before = system.stats()["cache"]
                load = sequence_load(base, pool, len(sequence))
                doc = trial.measure(system, ctx.name, f"{mode} r{r}", load, ctx.machine, warmup=0)
                runs.append(doc)
                by_mode[mode].append(figures(doc, before, system.stats()["cache"]))
                if mode == "repeats":
                    origin, records = doc["client"]["origin_monotonic_s"], records_of(doc)
                    now_sent = sent_at(origin, records, sequence)
                    gaps += [now_sent[i] - first_sent[i] for i in inputs.new(r - 1) if i in now_sent]
                    first_sent |= {i: now_sent[i] for i in inputs.new(r) if i in now_sent}
                    repeats_ended = origin + max(rec.end_s for rec in records)
    finding = summarize(by_mode, min(gaps) if gaps else None, args)
    for doc in runs:
        doc["config"]["command"] = ctx.command
    config = {**runs[0]["config"], "modes": MODES, "distinct": args.distinct, "rounds": args.rounds}
    return scenario_document(ctx.name, config, ctx.machine, runs, {ctx.name: finding})


SCENARIO = Scenario(
    "cache",
    "the response cache off, on with repeats (each >= 1 s after its first) and on without: hit rate, throughput,"
    " gateway CPU per request on a miss and a hit",
    add_arguments,
    run,
    {"concurrent": 4, "workers": 1, "warmup": 0, "distinct": 20, "rounds": 1},
)
