"""Sharded tables on a worker: hold the rows the ring assigns us, follow the ring as it changes.

A :class:`ShardedTable` copies into this process's own memory only the rows it is told to
hold, reading them from the table's ``.npy`` file in chunks; it keeps no mapping of the file,
so the rest of the table costs this worker nothing. The engine indexes it like an array.

A :class:`ShardKeeper` decides what each table holds: the rows whose holders
(:func:`hashing.shards.held_rows`) include this node, on the ring of the announced members
(one that missed its heartbeats stays until its announcement expires: a crashed worker
restarted within the ttl finds its part where it left it). It works on its own thread, so
serving never pauses for a load, and a worker announces itself before its first load:

* a change of membership, once settled, first *grows* each table to what it holds plus what
  it now owns, then reports the new ring as loaded (readiness follows these reports);
* ``grace_s`` later, if nothing changed meanwhile, it *shrinks* each table to what it owns.
  Until then gateways that still route by the old ring find the rows where they left them.

A row asked for that the table does not hold (a gateway's ring is ahead of ours, or a load is
still running) is read from the file for that request: answered all the same, and counted as
``read_through``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hashing.ring import Ring
from hashing.shards import held_rows, ring_digest
from tasks.contract import WHOLE_TABLE, ShardStatus
from tasks.metadata import ModelConfigError, Sharding

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 * 1024 * 1024  # of the file read at a time while loading
SPARSE_ROWS = 256  # up to this many rows are read one by one (pread) rather than by chunk


def write_table(path: Path, rows: int, dim: int, seed: int) -> None:
    """A synthetic float32 table (standard normals from ``seed``), written in chunks, then renamed
    into place: a reader never sees half a file, and concurrent writers each write a whole one."""
    rng = np.random.default_rng(seed)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    chunk = max(1, CHUNK_BYTES // (4 * dim))
    with open(temporary, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)})
        for start in range(0, rows, chunk):
            f.write(rng.standard_normal((min(chunk, rows - start), dim), dtype=np.float32).tobytes())
    os.replace(temporary, path)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's default, kept fixed


def release_free_memory() -> None:
    """Hand memory freed by a load back to the OS now (glibc ``malloc_trim``); elsewhere, nothing to do."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    """glibc, with its mmap threshold fixed at the default.

    glibc raises the threshold after freeing a large block (up to 32 MB), so a load's chunk-sized
    temporaries would then come from the heap and stay there, fragmented: measured, a worker
    holding 250 MB of rows kept 330 MB resident. Fixed, every large array is its own mapping
    and goes back to the OS when freed.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    return libc


_LIBC = _glibc()


class LoadCancelled(Exception):
    """A load stopped part-way because the ring changed again; nothing it read was kept."""


class ShardedTable:
    """Some rows of a 2-D little-endian float ``.npy`` table, held in memory by their global ids.

    Looks like the whole table to the engine (``shape``, ``ndim``, ``table[ids]``). What it
    holds is replaced in one assignment, so a reader on another thread sees the old rows or
    the new ones, never a mix.
    """

    def __init__(self, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, fortran_order, dtype = read_header(f)
                self._offset = f.tell()
        except (OSError, ValueError) as exc:
            raise ModelConfigError(f"table {path}: {exc}") from None
        if len(shape) != 2 or fortran_order or dtype.kind != "f" or dtype.byteorder == ">":
            raise ModelConfigError(f"table {path}: need a C-order little-endian float [rows, dim] array")
        self.path = path
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.ndim = 2
        self.dtype = dtype
        self._row_bytes = dtype.itemsize * self.shape[1]
        self._fd = os.open(path, os.O_RDONLY)
        # Ids are kept as int32 when they fit: 4 bytes per row held, not 8 (1.6 % of a 64-float row).
        self._ids = np.dtype(np.int32 if self.shape[0] <= np.iinfo(np.int32).max else np.int64)
        self._held: tuple[np.ndarray, np.ndarray] = (np.empty(0, self._ids), np.empty((0, self.shape[1]), dtype))
        self.assigned = False  # read-throughs count once something was assigned (not the start-up dry run)
        self.loaded = 0
        self.dropped = 0
        self.read_through = 0

    @property
    def held(self) -> np.ndarray:
        """The ids held, ascending."""
        return self._held[0]

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (any shape) as an array of shape ``ids.shape + (dim,)``."""
        flat = np.asarray(ids).ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= self.shape[0]):
            raise IndexError(f"row ids must be in [0, {self.shape[0]})")
        flat = flat.astype(self._ids, copy=False)  # as held: searchsorted would otherwise cast the held ids
        held, rows = self._held
        out = np.empty((flat.size, self.shape[1]), self.dtype)
        hit = np.zeros(flat.size, dtype=bool)
        if held.size:
            at = np.minimum(np.searchsorted(held, flat), held.size - 1)
            hit = held[at] == flat
            out[hit] = rows[at[hit]]
        missing = np.flatnonzero(~hit)
        if missing.size:
            out[missing] = self._read(flat[missing])
            if self.assigned:
                self.read_through += int(missing.size)
        return out.reshape(*np.shape(ids), self.shape[1])

    def hold(self, wanted: np.ndarray, cancelled: Callable[[], bool] = lambda: False) -> int:
        """Hold exactly the rows ``wanted`` (ascending unique ids): keep those already held, read
        the others from the file. Returns how many rows were read. ``cancelled`` is asked
        between chunks of the file; when it says yes, LoadCancelled is raised and nothing changes."""
        if wanted.size and (wanted[0] < 0 or wanted[-1] >= self.shape[0]):
            raise IndexError(f"row ids must be in [0, {self.shape[0]})")
        held, rows = self._held
        wanted = wanted.astype(self._ids, copy=False)
        if np.array_equal(held, wanted):
            self.assigned = True
            return 0
        out = np.empty((wanted.size, self.shape[1]), self.dtype)
        present = np.zeros(wanted.size, dtype=bool)
        if held.size and wanted.size:
            at = np.minimum(np.searchsorted(held, wanted), held.size - 1)
            present = held[at] == wanted
            kept_at, kept_from = np.flatnonzero(present), at[present]
            step = max(1, CHUNK_BYTES // self._row_bytes)  # a fancy-indexed copy makes a temporary: bound it
            for lo in range(0, kept_at.size, step):
                out[kept_at[lo : lo + step]] = rows[kept_from[lo : lo + step]]
        missing = np.flatnonzero(~present)
        self._fill(out, missing, wanted[missing], cancelled)
        self.dropped += held.size - int(present.sum())
        self.loaded += int(missing.size)
        self.assigned = True
        self._held = (wanted, out)
        return int(missing.size)

    def _read(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (any order) from the file."""
        order = np.argsort(ids, kind="stable")
        out = np.empty((ids.size, self.shape[1]), self.dtype)
        self._fill(out, order, ids[order])
        return out

    def _fill(
        self, out: np.ndarray, where: np.ndarray, ids: np.ndarray, cancelled: Callable[[], bool] = lambda: False
    ) -> None:
        """``out[where[k]] = row ids[k]`` for ascending ``ids``: one pread per row when they are few,
        else chunk by chunk of the file (no chunk's worth of memory is ever doubled)."""
        if ids.size and (ids[0] < 0 or ids[-1] >= self.shape[0]):
            raise IndexError(f"row ids must be in [0, {self.shape[0]})")
        if ids.size <= SPARSE_ROWS:
            for k, row in zip(where.tolist(), ids.tolist(), strict=True):
                out[k] = np.frombuffer(self._pread(row, 1), self.dtype)
            return
        chunk_rows = max(1, CHUNK_BYTES // self._row_bytes)
        for start in range(int(ids[0]) - int(ids[0]) % chunk_rows, int(ids[-1]) + 1, chunk_rows):
            lo, hi = np.searchsorted(ids, [start, start + chunk_rows])
            if lo == hi:
                continue
            if cancelled():
                raise LoadCancelled
            count = min(chunk_rows, self.shape[0] - start)
            chunk = np.frombuffer(self._pread(start, count), self.dtype).reshape(count, self.shape[1])
            out[where[lo:hi]] = chunk[ids[lo:hi] - start]

    def _pread(self, row: int, count: int) -> bytes:
        size = count * self._row_bytes
        data = os.pread(self._fd, size, self._offset + row * self._row_bytes)
        if len(data) != size:
            raise OSError(f"table {self.path} is shorter than its header says")
        return data

    def close(self) -> None:
        os.close(self._fd)


@dataclass(frozen=True)
class Shard:
    """One sharded table of one model version, as the keeper tracks it."""

    name: str  # "model/version", as reports name it
    sharding: Sharding
    table: ShardedTable


class ShardKeeper:
    """Keeps every :class:`Shard` holding what the ring assigns ``node_id``; see the module docstring.

    ``whole``: hold every row (sharding off; the unsharded baseline). A load starts once the
    membership has stayed the same for ``settle_s`` (workers started together see each other
    first, rather than each loading the whole table alone), and a change during a load
    cancels it for the newer ring. ``on_loaded`` is called (on the keeper's thread) after each
    load and drop, so that the new status is reported at once.
    """

    def __init__(
        self,
        node_id: str,
        weight: float,
        vnodes: int,
        shards: list[Shard],
        whole: bool,
        settle_s: float,
        grace_s: float,
        on_loaded: Callable[[], None],
    ) -> None:
        self._node_id = node_id
        self._weight = weight
        self._vnodes = vnodes
        self._shards = shards
        self._whole = whole
        self._settle_s = settle_s
        self._grace_s = grace_s
        self._on_loaded = on_loaded
        self._views: queue.SimpleQueue[dict[str, float] | None] = queue.SimpleQueue()
        self._ring = ""  # digest of the view whose rows are loaded (WHOLE_TABLE: all rows)
        self._load_s: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="ringserve-shards", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self, members: dict[str, float]) -> None:
        """Start following, from the live members seen now (node -> weight)."""
        self.follow(members)
        self._thread.start()

    def stop(self) -> None:
        self._views.put(None)
        self._thread.join()
        for shard in self._shards:
            shard.table.close()

    def follow(self, members: dict[str, float]) -> None:
        """The live members changed: bring the tables in line, on the keeper's thread."""
        self._views.put({**members, self._node_id: self._weight})  # our part is ours before we announce

    def statuses(self) -> dict[str, ShardStatus]:
        return {
            s.name: ShardStatus(
                self._ring,
                int(s.table.held.size),
                s.table.loaded,
                s.table.dropped,
                s.table.read_through,
                round(self._load_s.get(s.name, 0.0), 3),
            )
            for s in self._shards
        }

    def _wanted(self, ring: Ring, shard: Shard) -> np.ndarray:
        if self._whole:
            return np.arange(shard.sharding.rows, dtype=np.int64)
        return held_rows(ring, self._node_id, shard.sharding.replicas, shard.sharding.rows)

    def _grow(self, view: dict[str, float]) -> None:
        """Hold what we held plus what ``view`` gives us; raises LoadCancelled if the ring moves on."""
        ring = Ring.from_nodes(view, self._vnodes)
        for shard in self._shards:
            started = time.perf_counter()
            wanted = np.union1d(shard.table.held, self._wanted(ring, shard))
            loaded = shard.table.hold(wanted, cancelled=lambda: not self._views.empty())
            self._load_s[shard.name] = time.perf_counter() - started
            log.info(
                "node %s: %s holds %d rows (%d loaded in %.2f s) for ring %s",
                self._node_id, shard.name, wanted.size, loaded, self._load_s[shard.name], sorted(view),
            )  # fmt: skip
        self._ring = WHOLE_TABLE if self._whole else ring_digest(view)
        self._on_loaded()

    def _shrink(self, view: dict[str, float]) -> None:
        """Hold only what ``view`` gives us."""
        ring = Ring.from_nodes(view, self._vnodes)
        for shard in self._shards:
            before = shard.table.dropped
            shard.table.hold(self._wanted(ring, shard))
            dropped = shard.table.dropped - before
            if dropped:
                log.info("node %s: %s dropped %d rows it no longer owns", self._node_id, shard.name, dropped)
        self._on_loaded()

    def _run(self) -> None:
        loaded: dict[str, float] | None = None  # the view whose rows we hold
        pending: dict[str, float] | None = None  # a newer view, loaded once it has settled
        load_at = shrink_at = math.inf
        while True:
            due = min(load_at, shrink_at)
            try:
                view = self._views.get(timeout=None if due == math.inf else max(0.0, due - time.monotonic()))
            except queue.Empty:
                view = None
                if load_at <= shrink_at and pending is not None:
                    load_at = math.inf
                    outcome = self._attempt(self._grow, pending)
                    if outcome == "done":
                        loaded, pending, shrink_at = pending, None, time.monotonic() + self._grace_s
                    elif outcome == "cancelled":  # the ring moved: settle on whichever view is newest
                        load_at = time.monotonic() + self._settle_s
                else:
                    shrink_at = math.inf
                    if loaded is not None:
                        self._attempt(self._shrink, loaded)
                continue
            if view is None:
                return
            if view != (pending or loaded):
                pending, load_at = view, time.monotonic() + self._settle_s
            elif view == loaded:
                pending, load_at = None, math.inf

    def _attempt(self, step: Callable[[dict[str, float]], None], view: dict[str, float]) -> str:
        """Run ``step``: "done", "cancelled" or "failed" (the rows held then stay as they were)."""
        try:
            step(view)
            return "done"
        except LoadCancelled:
            log.info("node %s: the ring changed during a load; loading for the newest ring", self._node_id)
            return "cancelled"
        except Exception:  # a failed load leaves the old rows in place; the next change retries
            log.exception("node %s: sharded tables could not follow the ring %s", self._node_id, sorted(view))
            return "failed"
        finally:
            release_free_memory()  # the step's temporaries are gone by now: return their pages to the OS
