"""What a scenario is: a name, its options, a tiny size for tests, and a run that returns a results document."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cli import add_load_arguments


@dataclass(frozen=True)
class Context:
    """Where a scenario writes, on what machine, and the command that ran it (for the report)."""

    name: str
    out: Path
    machine: dict[str, Any]
    command: str

    def run_dir(self, label: str) -> Path:
        """The RINGSERVE_RUN_DIR of the system started for run ``label`` (its pids and logs)."""
        return self.out / "run" / label


@dataclass(frozen=True)
class Scenario:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Context, argparse.Namespace], dict[str, Any]]
    tiny: dict[str, Any] = field(default_factory=dict)  # option defaults that make it run in seconds


def add_served_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """Load options plus ``--workers``, for scenarios that start ringserve."""
    parser.add_argument("--workers", type=int, help="ringserve workers (celery processes)")
    parser.set_defaults(workers=3)
    add_load_arguments(parser, **defaults)


TINY_LOAD = {"requests": 60, "duration": None, "concurrent": 4, "workers": 1, "warmup": 10}
