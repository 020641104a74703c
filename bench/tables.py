"""Model repositories for the ``sharding`` scenario: one sharded model, its table at a chosen size, and what
each worker process holds of that table.

A repository is a copy of ``models/<model>`` alone (another model would add its own weights to every
worker's memory) whose config says how many rows the table has and how many workers hold each row;
the table is made by the model's own ``generate.py`` (seeded: the same rows every time), or linked
from a repository of the same size, so that a second configuration costs no second table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench import cgroup, procs
from bench.pool import RequestPool
from bench.system import ROOT, RingServe
from tasks.metadata import ModelMetadata, load_metadata
from tasks.repository import Repository

GENERATE_TIMEOUT_S = 900
WORKER_PREFIX = "worker_"


def repository(root: Path, model: str, rows: int, replicas: int, table_from: Path | None = None) -> ModelMetadata:
    """``root/<model>``: ``models/<model>`` with ``sharding.rows`` and ``sharding.replicas`` set, and its table
    (hard-linked from ``table_from`` when given, a table of the same rows; else generated)."""
    target = root / model
    shutil.copytree(ROOT / "models" / model, target, ignore=shutil.ignore_patterns("*.npy", ".*.lock"))
    config_file = target / "config.json"
    config = json.loads(config_file.read_text())
    config["sharding"] |= {"rows": rows, "replicas": replicas}
    config_file.write_text(json.dumps(config, indent=1) + "\n")
    meta = load_metadata(target)
    if table_from is not None:
        os.link(table_from, table_path(meta))
    print(f"preparing {table_path(meta)} ({rows:,} rows, replicas {replicas})", file=sys.stderr)
    subprocess.run(  # a no-op when a table of this shape is there
        [sys.executable, str(ROOT / "models" / model / "generate.py"), str(target)],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=GENERATE_TIMEOUT_S,
    )
    return meta


def table_path(meta: ModelMetadata) -> Path:
    assert meta.sharding is not None, f"model {meta.name} declares no sharded table"
    return meta.path / meta.default_version / f"{meta.sharding.table}.npy"


def table_bytes(meta: ModelMetadata) -> int:
    """Bytes of the table's rows (the file, less its header)."""
    return int(np.load(table_path(meta), mmap_mode="r").nbytes)


def request_pool(meta: ModelMetadata, size: int, max_rows: int, seed: int, path: Path) -> Path:
    """A :class:`RequestPool` for ``meta``'s model, answered by the unsharded model in this process (which
    holds the whole table while it builds, and lets it go after), saved at ``path``."""
    reference = Repository(meta.path.parent, sharding=False).get(meta.name)
    print(f"building {size:,} checked requests of 1-{max_rows} rows each", file=sys.stderr)
    return RequestPool.build(meta, reference.forward, size, max_rows, seed).save(path)


def worker_memory(system: RingServe, meta: ModelMetadata) -> dict[str, dict[str, Any]]:
    """Per worker of ``system``: its anonymous memory, its resident pages of the table file (if it maps it),
    their total, its peak RSS, and, when it runs in a memory cgroup, the cgroup's counters (bytes)."""
    cgroups = system.memory_cgroups()
    found: dict[str, dict[str, Any]] = {}
    for name, pid in sorted(system.pids().items()):
        memory = procs.memory(pid, table_path(meta)) if name.startswith(WORKER_PREFIX) else None
        if memory is None:
            continue
        counters = cgroup.counters(cgroups[name]) if name in cgroups else None
        found[name] = {
            "anonymous": memory.anonymous,
            "table_mapped": memory.mapped,
            "total": memory.total,
            "peak_rss": memory.peak_rss,
            "cgroup": None if counters is None else counters.as_json(),
        }
    return found


def shards(stats: dict[str, Any], meta: ModelMetadata) -> dict[str, dict[str, Any]]:
    """Node -> the counters ``/stats`` gives of ``meta``'s table on it (held, loaded, dropped, read_through, load_s)."""
    key = f"{meta.name}/{meta.default_version}"
    return {node: tables[key] for node, tables in stats.get("shards", {}).items() if key in tables}
