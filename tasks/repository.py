"""Models on disk: metadata for all of them, weights loaded once per (model, version).

Weights of version V of model M come from one of two places:

* files in ``models/M/V/``: the arrays of ``weights.npz``, plus every ``<name>.npy`` there
  (large tables), opened with ``mmap_mode="r"`` so the OS pages in only the rows used;
* or, when config.json says ``"synthetic": {"seed": 7, "arrays": {"w1": [1024, 4096], ...}}``,
  generated from the seed (the same arrays for every version). Such a model's description
  must say it is synthetic, so that nobody mistakes its predictions for meaningful ones.
  They are drawn once per host and kept in ``models/M/.synthetic/<fingerprint>/`` (see
  :func:`stored_synthetic_weights`).

A table the config declares ``sharding`` is always ``models/M/V/<table>.npy``, opened as a
:class:`tasks.shards.ShardedTable` that holds no row until told which (by the worker's
:class:`tasks.shards.ShardKeeper`, or all of them with ``Repository(root, sharding=False)``).
A synthetic model lists it under ``"tables": {"<table>": {"dim": 64, "seed": 11}}``; it is
generated on first use (``sharding.rows`` rows) if the file is missing or of another shape.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tasks.contract import shard_table_name
from tasks.engine import Model
from tasks.metadata import Catalog, ModelConfigError, ModelMetadata
from tasks.shards import Shard, ShardedTable, write_table

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.npz"
SYNTHETIC_FOLDER = ".synthetic"  # models/M/.synthetic/<fingerprint>/<array>.npy: drawn weights, kept


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


def stored_synthetic_weights(metadata: ModelMetadata, seed: int, arrays: Mapping[str, list[int]]) -> dict[str, Any]:
    """:func:`synthetic_weights`, drawn once per host into the model's folder and mapped from there after.

    Why: drawing heavy's 25 M normals costs a core 0.5 s idle and 2.4 s on a loaded 2-core host,
    the largest part of a restarted worker's way back into the ring; mapping them costs nothing, and
    the workers of a host share their pages. The folder is named by a hash of the seed and the arrays
    in their order (the order they are drawn in), so a changed config draws anew. Kept arrays that do
    not read back (garbage) are drawn and kept again; a folder that cannot be written (a read-only
    repository) only means drawing them at every start.
    """
    fingerprint = hashlib.sha256(json.dumps([seed, list(arrays.items())]).encode()).hexdigest()[:16]
    folder = metadata.path / SYNTHETIC_FOLDER / fingerprint
    if folder.is_dir():
        try:
            return {name: _mapped(folder / f"{name}.npy", shape) for name, shape in arrays.items()}
        except (OSError, ValueError) as exc:
            log.warning("model %s: synthetic weights in %s unreadable (%s); drawn again", metadata.name, folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
    weights = synthetic_weights(seed, arrays)
    try:
        _write_arrays(folder, weights)
    except OSError as exc:
        log.warning("model %s: synthetic weights not kept (%s); drawn at each start", metadata.name, exc)
    return weights


def _mapped(path: Path, shape: list[int]) -> np.ndarray:
    """A kept float32 array of ``shape``, mapped read-only; ValueError if the file holds anything else."""
    array = np.asarray(np.load(path, mmap_mode="r"))
    if array.shape != tuple(shape) or array.dtype != np.float32:
        raise ValueError(f"{path.name} holds {array.dtype}{array.shape}, not float32{tuple(shape)}")
    return array


def _write_arrays(folder: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Every array as ``<name>.npy`` in ``folder``, written beside it and renamed into place, so a
    reader never sees half of them; of workers writing at once, the first rename wins."""
    temporary = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    temporary.mkdir(parents=True, exist_ok=True)
    try:
        for name, array in arrays.items():
            np.save(temporary / f"{name}.npy", array)
        os.rename(temporary, folder)
    except OSError:
        if not folder.is_dir():
            raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _synthetic_spec(metadata: ModelMetadata, spec: Any) -> tuple[int, dict[str, list[int]]]:
    where = f"model {metadata.name} synthetic"
    if "synthetic" not in str(metadata.config.get("description", "")).lower():
        raise ModelConfigError(f"{where} weights, but its description does not say so")
    try:
        seed = int(spec["seed"])
        arrays = {str(name): [int(d) for d in shape] for name, shape in spec["arrays"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelConfigError(f"{where}: needs an integer seed and arrays {{name: shape}} ({exc})") from None
    if not all(name.isidentifier() for name in arrays):  # each names a file where they are kept
        raise ModelConfigError(f"{where}: array names must be identifiers, got {sorted(arrays)}")
    if any(not shape or min(shape) <= 0 for shape in arrays.values()):
        raise ModelConfigError(f"{where}: every array shape must be non-empty and positive, got {arrays}")
    return seed, arrays


def load_weights(metadata: ModelMetadata, version: str) -> dict[str, Any]:
    """The arrays of one version, by name (see the module docstring for where they come from)."""
    spec = metadata.config.get("synthetic")
    weights: dict[str, Any] = (
        stored_synthetic_weights(metadata, *_synthetic_spec(metadata, spec))
        if spec is not None
        else _files(metadata, version)
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

    The repository may change while served (:meth:`refresh`): a version it gains is loaded
    before it counts as served; a version it loses is *retired*, still answered for
    ``grace_s`` (gateways that have not rescanned yet still send it), then dropped.
    """

    def __init__(
        self, root: str | Path, sharding: bool = True, grace_s: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._sharding = sharding
        self._grace_s = grace_s
        self._clock = clock
        self._catalog = Catalog(root)
        self._loaded: dict[tuple[str, str], Model] = {}
        self._retired: dict[tuple[str, str], float] = {}  # -> when it is dropped (self._clock)
        self._shards: dict[tuple[str, str], Shard] = {}
        self._lock = threading.RLock()

    def names(self) -> list[str]:
        """The models served, sorted."""
        return sorted(self._catalog.models)

    def metadata(self, name: str) -> ModelMetadata:
        """What model ``name`` takes and gives, without loading its weights."""
        try:
            return self._catalog.models[name]
        except KeyError:
            raise UnknownModelError(f"unknown model {name!r}; known: {self.names()}") from None

    def get(self, name: str, version: str | None = None) -> Model:
        """Version ``version`` of model ``name`` (None or "": its default version).

        One that is not known yet makes the repository rescan first: a gateway may have
        seen a new version before this worker's next periodic rescan.
        """
        with self._lock:
            model = self._find(name, version)
            if model is None and self.refresh():
                model = self._find(name, version)
            if model is not None:
                return model
            metadata = self.metadata(name)
            known = list(metadata.versions)
            raise UnknownModelError(f"model {name!r} has no version {version!r}; known: {known}")

    def _find(self, name: str, version: str | None) -> Model | None:
        """A served (or retired) version, loaded now if it was not; None if there is no such version."""
        if version and (name, version) in self._retired:
            return self._loaded[(name, version)]
        metadata = self._catalog.models.get(name)
        resolved = None if metadata is None else metadata.resolve_version(version)
        if metadata is None or resolved is None:
            return None
        if (name, resolved) not in self._loaded:
            self._loaded[(name, resolved)] = self._load(metadata, resolved)
        return self._loaded[(name, resolved)]

    def _load(self, metadata: ModelMetadata, version: str) -> Model:
        """Build one version (its weights, and its sharded table's record)."""
        weights = load_weights(metadata, version)
        if metadata.sharding is not None:
            table = weights[metadata.sharding.table]
            if not self._sharding:
                table.hold(np.arange(metadata.sharding.rows, dtype=np.int64))
            self._shards[(metadata.name, version)] = Shard(
                shard_table_name(metadata.name, version), metadata.sharding, table
            )
        return Model(metadata, version, weights)

    def refresh(self) -> bool:
        """Take in changes of the repository on disk; True if what is served changed.

        New versions are loaded before the new metadata replaces the old, so a version is
        never served half loaded; if one fails to load, nothing changes (and the error is
        logged). Versions retired longer than ``grace_s`` are dropped here too.
        """
        with self._lock:
            changed = self._catalog.refresh(accept=self._load_new)
            now = self._clock()
            served = {(n, v) for n, meta in self._catalog.models.items() for v in meta.versions}
            for key in self._loaded.keys() - served:
                self._retired.setdefault(key, now + self._grace_s)
            for key, until in list(self._retired.items()):
                if key in served:
                    del self._retired[key]
                elif until <= now:
                    del self._retired[key], self._loaded[key]
                    log.info("model %s version %s: dropped (retired %.1f s ago)", *key, self._grace_s)
            return changed

    def _load_new(self, models: dict[str, ModelMetadata]) -> None:
        """Load every version of ``models`` not loaded yet; all of them, or none (raises)."""
        fresh: dict[tuple[str, str], Model] = {}
        for name, metadata in models.items():
            for version in metadata.versions:
                if (name, version) not in self._loaded:
                    fresh[(name, version)] = self._load(metadata, version)
                    log.info("model %s version %s: loaded", name, version)
        self._loaded.update(fresh)

    def served(self) -> dict[str, list[str]]:
        """Model -> the versions loaded and in the repository (what this process answers for)."""
        with self._lock:
            served = {
                name: [v for v in meta.versions if (name, v) in self._loaded]
                for name, meta in self._catalog.models.items()
            }
        return {name: versions for name, versions in served.items() if versions}

    def shards(self) -> list[Shard]:
        """The sharded tables of the versions loaded so far."""
        with self._lock:
            return [self._shards[key] for key in sorted(self._shards)]

    def load_all(self) -> None:
        """Load every version of every model, so that no request waits for a load."""
        for name, metadata in self._catalog.models.items():
            for version in metadata.versions:
                self.get(name, version)
