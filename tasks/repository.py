"""Models on disk: metadata for all of them, weights loaded once per (model, version).

Weights of version V of model M come from one of two places:

* files in ``models/M/V/``: the arrays of ``weights.npz``, plus every ``<name>.npy`` there
  (large tables), opened with ``mmap_mode="r"`` so the OS pages in only the rows used;
* or, when config.json says ``"synthetic": {"seed": 7, "arrays": {"w1": [1024, 4096], ...}}``,
  generated from the seed (the same arrays for every version). Such a model's description
  must say it is synthetic, so that nobody mistakes its predictions for meaningful ones.

A table the config declares ``sharding`` is always ``models/M/V/<table>.npy``, opened as a
:class:`tasks.shards.ShardedTable` that holds no row until told which (by the worker's
:class:`tasks.shards.ShardKeeper`, or all of them with ``Repository(root, sharding=False)``).
A synthetic model lists it under ``"tables": {"<table>": {"dim": 64, "seed": 11}}``; it is
generated on first use (``sharding.rows`` rows) if the file is missing or of another shape.
"""

from __future__ import annotations

import fcntl
import math
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tasks.contract import shard_table_name
from tasks.engine import Model
from tasks.metadata import ModelConfigError, ModelMetadata, load_repository
from tasks.shards import Shard, ShardedTable, write_table

WEIGHTS_FILE = "weights.npz"


class UnknownModelError(KeyError):
    """No model of that name, or no such version of it (the gateway's 404).

    A KeyError, so ``except KeyError`` and ``except LookupError`` both catch it; its text is
    the plain message (KeyError would otherwise print it in quotes).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def synthetic_weights(seed: int, arrays: Mapping[str, list[int]]) -> dict[str, np.ndarray]:
    """Float32 arrays drawn from ``default_rng(seed)`` in the order given.

    Matrices (2-D and up) are He-scaled normals, std sqrt(2 / shape[0]) with shape[0] the
    fan-in, so activations keep their scale through relu layers; vectors (biases) are zeros.
    """
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for name, shape in arrays.items():
        if len(shape) == 1:
            weights[name] = np.zeros(shape, dtype=np.float32)
        else:
            scale = np.float32(math.sqrt(2.0 / shape[0]))
            weights[name] = rng.standard_normal(tuple(shape), dtype=np.float32) * scale
    return weights


def _synthetic_spec(metadata: ModelMetadata, spec: Any) -> tuple[int, dict[str, list[int]]]:
    where = f"model {metadata.name} synthetic"
    if "synthetic" not in str(metadata.config.get("description", "")).lower():
        raise ModelConfigError(f"{where} weights, but its description does not say so")
    try:
        seed = int(spec["seed"])
        arrays = {str(name): [int(d) for d in shape] for name, shape in spec["arrays"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelConfigError(f"{where}: needs an integer seed and arrays {{name: shape}} ({exc})") from None
    if any(not shape or min(shape) <= 0 for shape in arrays.values()):
        raise ModelConfigError(f"{where}: every array shape must be non-empty and positive, got {arrays}")
    return seed, arrays


def load_weights(metadata: ModelMetadata, version: str) -> dict[str, Any]:
    """The arrays of one version, by name (see the module docstring for where they come from)."""
    spec = metadata.config.get("synthetic")
    weights: dict[str, Any] = (
        synthetic_weights(*_synthetic_spec(metadata, spec)) if spec is not None else _files(metadata, version)
    )
    if metadata.sharding is not None:
        weights[metadata.sharding.table] = sharded_table(metadata, version)
    return weights


def sharded_table(metadata: ModelMetadata, version: str) -> ShardedTable:
    """The sharded table of one version, generated first if the model is synthetic and the file
    is missing or of another shape (under a lock: workers starting together generate it once)."""
    assert metadata.sharding is not None
    name, rows = metadata.sharding.table, metadata.sharding.rows
    path = metadata.path / version / f"{name}.npy"
    spec = (metadata.config.get("synthetic") or {}).get("tables", {}).get(name)
    if spec is not None:
        try:
            dim, seed = int(spec["dim"]), int(spec["seed"])
        except (KeyError, TypeError, ValueError) as exc:
            where = f"model {metadata.name}: synthetic table {name}"
            raise ModelConfigError(f"{where} needs dim and seed ({exc})") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.is_file() or ShardedTable(path).shape != (rows, dim):
                write_table(path, rows, dim, seed)
    table = ShardedTable(path)
    if table.shape[0] != rows:
        raise ModelConfigError(f"table {path} has {table.shape[0]} rows, the config's sharding says {rows}")
    return table


def _files(metadata: ModelMetadata, version: str) -> dict[str, Any]:
    folder = metadata.path / version
    if not folder.is_dir():
        raise ModelConfigError(f"model {metadata.name}: version folder {folder} is missing")
    weights: dict[str, np.ndarray] = {}
    if (folder / WEIGHTS_FILE).is_file():
        with np.load(folder / WEIGHTS_FILE) as archive:
            weights.update((name, archive[name]) for name in archive.files)
    sharded = None if metadata.sharding is None else metadata.sharding.table
    for path in sorted(folder.glob("*.npy")):
        if path.stem == sharded:
            continue
        if path.stem in weights:
            raise ModelConfigError(f"{path}: array {path.stem!r} is also in {WEIGHTS_FILE}")
        weights[path.stem] = np.load(path, mmap_mode="r")
    return weights


class Repository:
    """All models under ``root``; :meth:`get` loads a version's weights on first use only.

    Safe to share between threads: a version is loaded at most once. With ``sharding`` off,
    each sharded table holds every row once loaded (the unsharded model, in this process).
    """

    def __init__(self, root: str | Path, sharding: bool = True) -> None:
        self._sharding = sharding
        self._metadata: dict[str, ModelMetadata] = load_repository(root)
        self._loaded: dict[tuple[str, str], Model] = {}
        self._shards: dict[tuple[str, str], Shard] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The models served, sorted."""
        return sorted(self._metadata)

    def metadata(self, name: str) -> ModelMetadata:
        """What model ``name`` takes and gives, without loading its weights."""
        try:
            return self._metadata[name]
        except KeyError:
            raise UnknownModelError(f"unknown model {name!r}; known: {self.names()}") from None

    def get(self, name: str, version: str | None = None) -> Model:
        """Version ``version`` of model ``name`` (None or "": its default version)."""
        metadata = self.metadata(name)
        resolved = metadata.resolve_version(version)
        if resolved is None:
            known = list(metadata.versions)
            raise UnknownModelError(f"model {name!r} has no version {version!r}; known: {known}")
        key = (name, resolved)
        with self._lock:
            if key not in self._loaded:
                weights = load_weights(metadata, resolved)
                if metadata.sharding is not None:
                    table = weights[metadata.sharding.table]
                    if not self._sharding:
                        table.hold(np.arange(metadata.sharding.rows, dtype=np.int64))
                    self._shards[key] = Shard(shard_table_name(name, resolved), metadata.sharding, table)
                self._loaded[key] = Model(metadata, resolved, weights)
            return self._loaded[key]

    def shards(self) -> list[Shard]:
        """The sharded tables of the versions loaded so far."""
        with self._lock:
            return [self._shards[key] for key in sorted(self._shards)]

    def load_all(self) -> None:
        """Load every version of every model, so that no request waits for a load."""
        for name, metadata in self._metadata.items():
            for version in metadata.versions:
                self.get(name, version)
