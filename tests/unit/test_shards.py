"""Sharded tables: which rows a worker holds, how it holds them, how it follows the ring, how a request is split."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hashing.shards
import tasks.shards
from app.breaker import Breaker
from app.errors import BadGateway, BadRequest
from app.routing import Router
from app.shards import Part, Placement, gather, row_ids, split, take_rows
from hashing.membership import Member
from hashing.ring import Ring
from hashing.shards import hash_id, hash_ids, held_rows, holders, ring_digest
from tasks.contract import WHOLE_TABLE, Result, ShardStatus, Tensor
from tasks.metadata import ModelConfigError, Sharding, load_metadata
from tasks.repository import Repository, synthetic_weights
from tasks.shards import LoadCancelled, Shard, ShardedTable, ShardKeeper, write_table

MODELS = Path(__file__).resolve().parents[2] / "models"
ROWS, DIM = 5_000, 8
EVENS = np.arange(0, ROWS, 2, dtype=np.int64)

fast = settings(max_examples=25, deadline=None)
node_ids = st.text(alphabet="abcdefghij_0123456789", min_size=1, max_size=6)


# --- the hash of a row id ----------------------------------------------------------------------


def test_hash_id_known_values() -> None:
    # Regression anchors: changing these moves every row of every sharded table to other workers.
    assert hash_id(0) == 16294208416658607535
    assert hash_id(1) == 10451216379200822465


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_hash_id_equals_hash_ids(row: int) -> None:
    assert hash_id(row) == int(hash_ids(np.array([row], dtype=np.int64))[0])


@pytest.mark.parametrize("row", [0, 1, 2**32, 2**62, 2**63 - 1])
def test_hash_id_equals_hash_ids_at_the_edges(row: int) -> None:
    assert hash_id(row) == int(hash_ids(np.array([row], dtype=np.int64))[0])
    assert 0 <= hash_id(row) < 2**64


@fast
@given(st.lists(st.integers(min_value=0, max_value=2**63 - 1), max_size=50))
def test_hash_ids_hashes_every_id(rows: list[int]) -> None:
    hashed = hash_ids(np.array(rows, dtype=np.int64))
    assert hashed.dtype == np.uint64
    assert [int(h) for h in hashed] == [hash_id(r) for r in rows]


def test_hash_ids_keeps_the_shape_and_never_collides() -> None:
    ids = np.arange(100_000, dtype=np.int64)
    hashed = hash_ids(ids)
    assert np.unique(hashed).size == ids.size  # a bijection of 64-bit ints
    assert hash_ids(ids.reshape(1000, 100)).shape == (1000, 100)


# --- held_rows and holders ---------------------------------------------------------------------


def holder_counts(ring: Ring, replicas: int, rows: int) -> np.ndarray:
    """How many nodes hold each row, from held_rows (each node's list checked sorted and unique)."""
    counts = np.zeros(rows, dtype=np.int64)
    for node in ring.nodes:
        held = held_rows(ring, node, replicas, rows)
        assert held.dtype == np.int64 and bool(np.all(np.diff(held) > 0))
        counts[held] += 1
    return counts


@settings(max_examples=15, deadline=None)
@given(
    nodes=st.dictionaries(node_ids, st.sampled_from([0.5, 1.0, 2.0]), min_size=3, max_size=5),
    rows=st.integers(min_value=0, max_value=50_000),
)
def test_rows_are_held_by_exactly_replicas_nodes(nodes: dict[str, float], rows: int) -> None:
    ring = Ring.from_nodes(nodes)
    assert bool(np.all(holder_counts(ring, 1, rows) == 1))  # one replica: a partition of the rows
    assert bool(np.all(holder_counts(ring, 2, rows) == 2))
    assert bool(np.all(holder_counts(ring, len(nodes) + 1, rows) == len(nodes)))  # more replicas than nodes


@settings(max_examples=30, deadline=None)
@given(
    nodes=st.lists(node_ids, min_size=1, max_size=5, unique=True),
    vnodes=st.sampled_from([1, 3, 150]),
    replicas=st.integers(min_value=1, max_value=3),
    rows=st.integers(min_value=0, max_value=1_500),
)
def test_held_rows_are_the_rows_whose_holders_include_the_node(
    nodes: list[str], vnodes: int, replicas: int, rows: int
) -> None:
    ring = Ring.from_nodes(dict.fromkeys(nodes, 1.0), vnodes=vnodes)
    of_row = [holders(ring, row, replicas) for row in range(rows)]
    for row in range(min(rows, 50)):
        assert of_row[row] == ring.preference_hash(hash_id(row), replicas)
        assert of_row[row][0] == ring.lookup_hash(hash_id(row))
    for node in nodes:
        expected = [row for row in range(rows) if node in of_row[row]]
        assert held_rows(ring, node, replicas, rows).tolist() == expected


def test_held_rows_are_the_same_in_small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = Ring.from_nodes({"a": 1.0, "b": 2.0, "c": 1.0})
    rows = [0, 1, 999, 1_000, 1_001, 4_321, 5_000]
    whole = {(node, r, n): held_rows(ring, node, r, n) for node in "abc" for r in (1, 2) for n in rows}
    monkeypatch.setattr(hashing.shards, "CHUNK_IDS", 1_000)
    for (node, r, n), held in whole.items():
        assert np.array_equal(held_rows(ring, node, r, n), held)


def test_colliding_points_give_their_rows_to_the_smallest_node_id() -> None:
    ring = Ring.from_nodes({"c": 1.0, "a": 1.0, "b": 1.0}, vnodes=3, hash_fn=lambda data: 2**63)
    assert np.array_equal(held_rows(ring, "a", 1, 100), np.arange(100))
    assert held_rows(ring, "b", 1, 100).size == held_rows(ring, "c", 1, 100).size == 0
    assert np.array_equal(held_rows(ring, "b", 2, 100), np.arange(100))
    assert all(holders(ring, row, 2) == ["a", "b"] for row in range(100))


def owner_of_each_row(ring: Ring, rows: int) -> np.ndarray:
    owners = np.full(rows, "", dtype=object)
    for node in ring.nodes:
        owners[held_rows(ring, node, 1, rows)] = node
    return owners


@pytest.mark.parametrize("size", [3, 4, 5])
def test_a_join_moves_only_rows_to_the_newcomer_about_one_in_n_plus_one(size: int) -> None:
    rows = 50_000
    nodes = {f"worker_{i}": 1.0 for i in range(1, size + 1)}
    before = owner_of_each_row(Ring.from_nodes(nodes), rows)
    after = owner_of_each_row(Ring.from_nodes({**nodes, "newcomer": 1.0}), rows)
    moved = before != after
    assert set(after[moved]) == {"newcomer"}
    assert bool(np.all(after != ""))
    share = float(moved.mean()) * (size + 1)
    assert 1 / 1.25 <= share <= 1.25


def test_a_leave_moves_only_the_leavers_rows() -> None:
    nodes = {f"worker_{i}": 1.0 for i in range(1, 6)}
    before = owner_of_each_row(Ring.from_nodes(nodes), 20_000)
    del nodes["worker_3"]
    after = owner_of_each_row(Ring.from_nodes(nodes), 20_000)
    moved = before != after
    assert set(before[moved]) == {"worker_3"} and "worker_3" not in set(after)


def test_a_node_outside_the_ring_holds_nothing() -> None:
    ring = Ring.from_nodes({"a": 1.0, "b": 1.0})
    for held in (held_rows(ring, "z", 1, 1_000), held_rows(Ring(), "a", 1, 1_000)):
        assert held.dtype == np.int64 and held.size == 0


# --- ring_digest -------------------------------------------------------------------------------


def test_ring_digest_names_a_membership() -> None:
    assert ring_digest({"a": 1.0, "b": 2.0}) == ring_digest({"b": 2.0, "a": 1.0})
    different = [{"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 1.0}, {"a": 1.0}, {"a": 1.0, "c": 2.0}, {}]
    assert len({ring_digest(view) for view in different}) == len(different)


@fast
@given(st.dictionaries(node_ids, st.floats(min_value=0.01, max_value=100), min_size=1, max_size=8), st.data())
def test_ring_digest_ignores_order(view: dict[str, float], data: st.DataObject) -> None:
    shuffled = dict(data.draw(st.permutations(list(view.items()))))
    assert ring_digest(shuffled) == ring_digest(view)
    node = next(iter(view))
    assert ring_digest({**view, node: view[node] * 2}) != ring_digest(view)
    assert ring_digest({k: w for k, w in view.items() if k != node}) != ring_digest(view)


# --- ShardedTable ------------------------------------------------------------------------------


@pytest.fixture
def table_path(tmp_path: Path) -> Path:
    path = tmp_path / "table.npy"
    write_table(path, ROWS, DIM, seed=3)
    return path


@pytest.fixture
def table(table_path: Path) -> Iterator[ShardedTable]:
    table = ShardedTable(table_path)
    yield table
    table.close()


@pytest.fixture(params=[None, 100, 1], ids=["one-chunk", "100-row-chunks", "1-row-chunks"])
def chunk_rows(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int | None:
    """Rows of the file read at a time while loading (None: the default, the whole test table at once)."""
    if request.param is not None:
        monkeypatch.setattr(tasks.shards, "CHUNK_BYTES", request.param * DIM * 4)
    return request.param


def test_write_table_writes_a_plain_npy_from_the_seed(table_path: Path) -> None:
    written = np.load(table_path)
    assert written.dtype == np.float32 and written.shape == (ROWS, DIM)
    assert np.array_equal(written, np.random.default_rng(3).standard_normal((ROWS, DIM), dtype=np.float32))
    assert [p.name for p in table_path.parent.iterdir()] == [table_path.name]  # no temporary left behind
    write_table(table_path, ROWS, DIM, seed=4)
    assert not np.array_equal(np.load(table_path), written)


def test_write_table_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks.shards, "CHUNK_BYTES", 7 * DIM * 4)
    write_table(tmp_path / "t.npy", 50, DIM, seed=3)  # 7 rows at a time: the same table
    assert np.array_equal(np.load(tmp_path / "t.npy"), np.random.default_rng(3).standard_normal((50, DIM), np.float32))


def test_a_table_looks_like_the_whole_table(table: ShardedTable) -> None:
    assert table.shape == (ROWS, DIM) and table.ndim == 2 and table.dtype == np.float32
    assert table.held.size == 0 and (table.loaded, table.dropped, table.read_through) == (0, 0, 0)


@pytest.mark.parametrize(
    "ids",
    [
        EVENS[:100],  # held
        EVENS[:100] + 1,  # not held, one by one
        np.arange(1, ROWS, 2),  # not held, by chunk
        np.random.default_rng(1).integers(0, ROWS, 3_000),  # mixed, unsorted, repeated
        np.array([ROWS - 1, 0, 1, ROWS - 2, 0]),
        np.random.default_rng(2).integers(0, ROWS, (40, 3)),  # 2-D
        np.random.default_rng(3).integers(0, ROWS, (600, 2)),
        np.empty(0, dtype=np.int64),
        np.empty((0, 2), dtype=np.int64),
    ],
    ids=["held", "sparse-missing", "chunked-missing", "mixed", "edges", "2-D", "2-D-big", "empty", "empty-2-D"],
)
def test_lookups_equal_the_file(table_path: Path, table: ShardedTable, chunk_rows: int | None, ids: np.ndarray) -> None:
    expected = np.load(table_path)[ids]
    assert np.array_equal(table[ids], expected)  # before any hold: all from the file
    table.hold(EVENS)
    got = table[ids]
    assert got.shape == ids.shape + (DIM,) and got.dtype == np.float32
    assert np.array_equal(got, expected)
    assert np.array_equal(table[ids.astype(np.int32)], expected)


def test_read_through_counts_missing_rows_once_something_was_held(table: ShardedTable) -> None:
    table[np.arange(1_000)]
    assert table.read_through == 0  # nothing assigned yet: the start-up dry run is not counted
    table.hold(EVENS)
    table[EVENS[:500]]
    assert table.read_through == 0
    table[np.array([0, 1, 2, 3])]
    assert table.read_through == 2
    table[np.array([[5, 6], [7, 8]])]
    assert table.read_through == 4
    table[np.arange(1, ROWS, 2)]
    assert table.read_through == 4 + ROWS // 2


def test_an_empty_hold_starts_the_count(table: ShardedTable) -> None:
    assert table.hold(np.empty(0, dtype=np.int64)) == 0
    table[np.array([1, 2])]
    assert table.read_through == 2


def test_hold_reads_only_what_it_lacks(table_path: Path, table: ShardedTable, chunk_rows: int | None) -> None:
    reference = np.load(table_path)
    assert table.hold(EVENS) == ROWS // 2
    assert (table.loaded, table.dropped) == (ROWS // 2, 0)
    assert np.array_equal(table.held, EVENS)
    assert table.hold(EVENS.copy()) == 0  # the same rows again: nothing read
    assert (table.loaded, table.dropped) == (ROWS // 2, 0)
    first_half = np.arange(ROWS // 2, dtype=np.int64)
    assert table.hold(first_half) == ROWS // 4  # the odd ids of the first half
    assert (table.loaded, table.dropped) == (ROWS // 2 + ROWS // 4, ROWS // 4)
    assert np.array_equal(table.held, first_half)
    assert np.array_equal(table[first_half], reference[first_half])  # kept and read rows, all right
    assert table.read_through == 0
    assert table.hold(np.array([7, 4_999], dtype=np.int64)) == 1
    assert np.array_equal(table[np.array([4_999, 7])], reference[[4_999, 7]]) and table.read_through == 0
    assert (table.loaded, table.dropped) == (3_751, 1_250 + 2_499)
    assert table.hold(np.empty(0, dtype=np.int64)) == 0
    assert table.held.size == 0 and (table.loaded, table.dropped) == (3_751, 3_751)


OUTSIDE = [[-1], [ROWS], [0, ROWS + 7], [[1, 2], [3, -5]], [2**40]]


@pytest.mark.parametrize("bad", OUTSIDE)
def test_lookups_outside_the_table_raise_index_error(table: ShardedTable, bad: list[int]) -> None:
    table.hold(EVENS)
    with pytest.raises(IndexError):
        table[np.array(bad)]


@pytest.mark.parametrize(
    "bad",
    OUTSIDE,
)
def test_holding_ids_outside_the_table_raises_index_error(table: ShardedTable, bad: list[int]) -> None:
    table.hold(EVENS)
    with pytest.raises(IndexError):
        table.hold(np.array(sorted(np.ravel(bad)), dtype=np.int64))
    assert np.array_equal(table.held, EVENS) and (table.loaded, table.dropped) == (ROWS // 2, 0)


@pytest.mark.parametrize("cancel_at", [1, 3])
def test_a_cancelled_hold_changes_nothing(
    table_path: Path, table: ShardedTable, monkeypatch: pytest.MonkeyPatch, cancel_at: int
) -> None:
    monkeypatch.setattr(tasks.shards, "CHUNK_BYTES", 100 * DIM * 4)
    table.hold(EVENS)
    asked: list[bool] = []

    def cancelled() -> bool:
        asked.append(True)
        return len(asked) >= cancel_at

    with pytest.raises(LoadCancelled):
        table.hold(np.arange(ROWS, dtype=np.int64), cancelled)
    assert len(asked) == cancel_at
    assert np.array_equal(table.held, EVENS) and (table.loaded, table.dropped) == (ROWS // 2, 0)
    assert np.array_equal(table[EVENS], np.load(table_path)[EVENS]) and table.read_through == 0


def test_hold_asks_whether_it_is_cancelled_between_chunks(table: ShardedTable, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks.shards, "CHUNK_BYTES", 1_000 * DIM * 4)
    asked: list[bool] = []

    def cancelled() -> bool:
        asked.append(False)
        return False

    assert table.hold(np.arange(ROWS, dtype=np.int64), cancelled) == ROWS
    assert len(asked) == ROWS // 1_000  # once per chunk read
    table.hold(EVENS, cancelled)  # nothing to read: nothing to cancel
    assert len(asked) == ROWS // 1_000


def test_a_npy_of_version_2_is_read(tmp_path: Path) -> None:
    data = np.arange(40, dtype=np.float64).reshape(10, 4)
    with open(tmp_path / "v2.npy", "wb") as f:
        np.lib.format.write_array(f, data, version=(2, 0))
    table = ShardedTable(tmp_path / "v2.npy")
    try:
        assert table.shape == (10, 4) and table.dtype == np.float64
        table.hold(np.array([2, 3], dtype=np.int64))
        assert np.array_equal(table[np.array([3, 0, 9])], data[[3, 0, 9]])
    finally:
        table.close()


@pytest.mark.parametrize(
    "write",
    [
        lambda path: path.write_text("not a numpy file"),
        lambda path: path.write_bytes(b""),
        lambda path: np.save(path, np.zeros(5, dtype=np.float32)),  # 1-D
        lambda path: np.save(path, np.zeros((5, 2, 2), dtype=np.float32)),  # 3-D
        lambda path: np.save(path, np.zeros((5, 2), dtype=">f4")),  # big-endian
        lambda path: np.save(path, np.zeros((5, 2), dtype=np.int32)),  # not float
        lambda path: np.save(path, np.asfortranarray(np.zeros((5, 2), dtype=np.float32))),
        lambda path: None,  # missing
    ],
    ids=["text", "empty", "1-D", "3-D", "big-endian", "int32", "fortran", "missing"],
)
def test_a_table_that_is_not_a_2d_little_endian_float_npy_is_refused(
    tmp_path: Path, write: Callable[[Path], None]
) -> None:
    path = tmp_path / "bad.npy"
    write(path)
    with pytest.raises(ModelConfigError):
        ShardedTable(path)


def test_a_truncated_table_fails_to_load(tmp_path: Path) -> None:
    path = tmp_path / "short.npy"
    write_table(path, 100, DIM, seed=0)
    path.write_bytes(path.read_bytes()[: -DIM * 4 * 10])
    table = ShardedTable(path)
    try:
        with pytest.raises(OSError):
            table.hold(np.arange(100, dtype=np.int64))
        assert table.held.size == 0
    finally:
        table.close()


def test_the_table_file_is_never_mapped(table_path: Path, table: ShardedTable) -> None:
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    table.hold(EVENS)
    table[np.arange(ROWS)]
    table[np.array([1, 3])]
    table.hold(np.arange(100, dtype=np.int64))
    assert str(table_path) not in maps.read_text()


# --- ShardKeeper -------------------------------------------------------------------------------

KEEPER_ROWS = 2_000
TABLE_NAME = "t/1"


@dataclass(frozen=True)
class Report:
    """What the keeper said at one of its ``on_loaded`` calls, and the rows it held then."""

    status: ShardStatus
    held: np.ndarray
    at: float


class Reports:
    """Collects the keeper's reports (on its thread); the test waits on them, never sleeps."""

    def __init__(self) -> None:
        self.seen: list[Report] = []
        self._changed = threading.Condition()

    def record(self, keeper: ShardKeeper, table: ShardedTable) -> None:
        with self._changed:
            self.seen.append(Report(keeper.statuses()[TABLE_NAME], table.held.copy(), time.monotonic()))
            self._changed.notify_all()

    def wait_for(self, what: Callable[[Report], bool], timeout_s: float = 5.0) -> Report:
        """The first report that satisfies ``what``, waiting for it up to ``timeout_s``."""
        with self._changed:
            found = self._changed.wait_for(lambda: next((r for r in self.seen if what(r)), None), timeout_s)
            assert found is not None, f"no such report within {timeout_s} s; seen {[r.status for r in self.seen]}"
            return found

    def wait_count(self, count: int, timeout_s: float = 5.0) -> list[Report]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.seen) >= count, timeout_s), [r.status for r in self.seen]
            return list(self.seen)


class GatedTable(ShardedTable):
    """Its next hold() after ``armed`` is set waits for ``proceed``: a load held open by the test."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.armed = False
        self.entered = threading.Event()
        self.proceed = threading.Event()

    def hold(self, wanted: np.ndarray, cancelled: Callable[[], bool] = lambda: False) -> int:
        if self.armed:
            self.armed = False
            self.entered.set()
            assert self.proceed.wait(5)
        return super().hold(wanted, cancelled)


@pytest.fixture
def keeper_table(tmp_path: Path) -> GatedTable:
    write_table(tmp_path / "t.npy", KEEPER_ROWS, 4, seed=1)
    return GatedTable(tmp_path / "t.npy")


def start_keeper(
    table: ShardedTable, members: dict[str, float], whole: bool = False, grace_s: float = 0.2
) -> tuple[ShardKeeper, Reports]:
    """A keeper of node "a" (weight 1) for one table, started from ``members``."""
    reports = Reports()
    shard = Shard(TABLE_NAME, Sharding("t", "id", KEEPER_ROWS, 1), table)
    keeper = ShardKeeper("a", 1.0, 150, [shard], whole, 0.05, grace_s, lambda: reports.record(keeper, table))
    keeper.start(members)
    return keeper, reports


def rows_of_a(view: dict[str, float]) -> np.ndarray:
    return held_rows(Ring.from_nodes(view, 150), "a", 1, KEEPER_ROWS)


def test_keeper_grows_reports_then_shrinks_after_the_grace(keeper_table: GatedTable) -> None:
    alone, pair = {"a": 1.0}, {"a": 1.0, "b": 1.0}
    keeper, reports = start_keeper(keeper_table, alone)
    try:
        first = reports.wait_for(lambda r: r.status.ring == ring_digest(alone))
        assert (first.status.held, first.status.loaded, first.status.dropped) == (KEEPER_ROWS, KEEPER_ROWS, 0)
        assert keeper.statuses()[TABLE_NAME].ring == ring_digest(alone)
        reports.wait_count(2)  # and its shrink, which drops nothing

        keeper.follow(pair)
        grown = reports.wait_for(lambda r: r.status.ring == ring_digest(pair))
        assert grown.status.held == KEEPER_ROWS and grown.status.dropped == 0  # the union, until the grace ends
        shrunk = reports.wait_for(lambda r: r.status.dropped > 0)
        assert shrunk.status.ring == ring_digest(pair)
        assert np.array_equal(shrunk.held, rows_of_a(pair))
        assert shrunk.status.held == rows_of_a(pair).size
        assert shrunk.status.dropped == KEEPER_ROWS - rows_of_a(pair).size
        assert shrunk.status.loaded == KEEPER_ROWS
        assert shrunk.at - grown.at >= 0.2 * 0.9  # not before the grace
        assert keeper.alive
    finally:
        keeper.stop()
    assert not keeper.alive


def test_keeper_loads_only_its_rows_when_it_starts_with_others(keeper_table: GatedTable) -> None:
    view = {"a": 1.0, "b": 1.0, "c": 2.0}
    keeper, reports = start_keeper(keeper_table, {"b": 1.0, "c": 2.0})  # its own weight is added
    try:
        first = reports.wait_for(lambda r: r.status.ring == ring_digest(view))
        assert np.array_equal(first.held, rows_of_a(view))
        assert first.status.loaded == first.status.held == rows_of_a(view).size and first.status.load_s >= 0
    finally:
        keeper.stop()


def test_keeper_with_sharding_off_holds_every_row(keeper_table: GatedTable) -> None:
    keeper, reports = start_keeper(keeper_table, {"a": 1.0, "b": 1.0}, whole=True)
    try:
        for report in reports.wait_count(2):  # the load, then a shrink that drops nothing
            assert report.status.ring == WHOLE_TABLE
            assert (report.status.held, report.status.dropped) == (KEEPER_ROWS, 0)
            assert np.array_equal(report.held, np.arange(KEEPER_ROWS))
    finally:
        keeper.stop()


def test_a_change_during_a_load_cancels_it_for_the_newer_ring(keeper_table: GatedTable) -> None:
    first_view, lost_b, with_c = {"a": 1.0, "b": 1.0}, {"a": 1.0}, {"a": 1.0, "c": 1.0}
    keeper, reports = start_keeper(keeper_table, {"b": 1.0})
    try:
        before = reports.wait_count(2)[-1]  # loaded, and the grace passed
        keeper_table.armed = True
        keeper.follow({})  # b left: a starts loading b's rows ...
        assert keeper_table.entered.wait(5)
        keeper.follow({"c": 1.0})  # ... and c joined meanwhile
        keeper_table.proceed.set()
        grown = reports.wait_for(lambda r: r.status.ring == ring_digest(with_c))
        assert all(r.status.ring != ring_digest(lost_b) for r in reports.seen)
        assert np.array_equal(grown.held, np.union1d(rows_of_a(first_view), rows_of_a(with_c)))
        assert grown.status.loaded == before.status.loaded + grown.held.size - before.held.size
    finally:
        keeper.stop()


def test_the_same_view_again_during_a_load_does_not_lose_it(keeper_table: GatedTable) -> None:
    lost_b = {"a": 1.0}
    keeper, reports = start_keeper(keeper_table, {"b": 1.0})
    try:
        reports.wait_count(2)
        keeper_table.armed = True
        keeper.follow({})  # b went silent: a loads b's rows ...
        assert keeper_table.entered.wait(5)
        keeper.follow({})  # ... and b's announcement expired: the same live members, said again
        keeper_table.proceed.set()
        reports.wait_for(lambda r: r.status.ring == ring_digest(lost_b), timeout_s=1.5)
    finally:
        keeper.stop()


# --- metadata: sharding ------------------------------------------------------------------------

INPUTS = [
    {"name": "user_id", "datatype": "INT64", "shape": [-1]},
    {"name": "features", "datatype": "FP32", "shape": [-1, 4]},
    {"name": "pair", "datatype": "INT64", "shape": [-1, 1]},
    {"name": "small", "datatype": "INT32", "shape": [-1]},
]


def model_with(tmp_path: Path, sharding_json: str) -> Path:
    model = tmp_path / "m"
    model.mkdir(exist_ok=True)
    outputs = [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}]
    (model / "config.json").write_text(
        f'{{"inputs": {json.dumps(INPUTS)}, "outputs": {json.dumps(outputs)}, "sharding": {sharding_json}}}'
    )
    return model


@pytest.mark.parametrize(
    "sharding",
    [
        '{"table": "t", "by": "nope", "rows": 10}',
        '{"table": "t", "by": "features", "rows": 10}',
        '{"table": "t", "by": "pair", "rows": 10}',
        '{"table": "t", "by": "small", "rows": 10}',
        '{"table": "t", "by": "user_id", "rows": 0}',
        '{"table": "t", "by": "user_id", "rows": -3}',
        '{"table": "t", "by": "user_id", "rows": 10, "replicas": 0}',
        '{"table": "t", "by": "user_id", "rows": 10, "replicas": -1}',
        '{"table": "t", "by": "user_id", "rows": "many"}',
        '{"table": "t", "by": "user_id", "rows": null}',
        '{"table": "t", "by": "user_id", "rows": NaN}',
        '{"table": "t", "by": "user_id", "rows": 10, "replicas": [1]}',
        '{"by": "user_id", "rows": 10}',
        '{"table": "t", "rows": 10}',
        '{"table": "t", "by": "user_id"}',
        "[]",
        '"user_id"',
        "7",
        '{"table": "t", "by": "user_id", "rows": 1e999}',
        '{"table": "t", "by": "user_id", "rows": 2.7}',
        '{"table": "t", "by": "user_id", "rows": "10"}',
        '{"table": "t", "by": "user_id", "rows": true}',
    ],
)
def test_bad_sharding_raises_model_config_error(tmp_path: Path, sharding: str) -> None:
    with pytest.raises(ModelConfigError):
        load_metadata(model_with(tmp_path, sharding))


def test_sharding_parses(tmp_path: Path) -> None:
    meta = load_metadata(model_with(tmp_path, '{"table": "t", "by": "user_id", "rows": 10}'))
    assert meta.sharding == Sharding("t", "user_id", 10, 1)
    meta = load_metadata(model_with(tmp_path, '{"table": "t", "by": "user_id", "rows": 10, "replicas": 3}'))
    assert meta.sharding == Sharding("t", "user_id", 10, 3)
    assert load_metadata(model_with(tmp_path, "null")).sharding is None


def test_shipped_ranker_is_sharded_by_user_id() -> None:
    meta = load_metadata(MODELS / "ranker")
    assert meta.sharding == Sharding("user_embedding", "user_id", 1_000_000, 1)
    assert "synthetic" in meta.config["description"].lower()


# --- the repository: a sharded model, whole -----------------------------------------------------

SMALL_ROWS = 3_000


@pytest.fixture
def ranker_root(tmp_path: Path) -> Path:
    """A repository holding the shipped ranker, its table cut to SMALL_ROWS rows (generated on first use)."""
    config = json.loads((MODELS / "ranker" / "config.json").read_text())
    config["sharding"]["rows"] = SMALL_ROWS
    model = tmp_path / "models" / "ranker"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(config))
    return tmp_path / "models"


def ranker_reference(root: Path, ids: np.ndarray, features: np.ndarray) -> np.ndarray:
    """The ranker's forward pass written out by hand in numpy."""
    config = json.loads((root / "ranker" / "config.json").read_text())
    w = synthetic_weights(7, config["synthetic"]["arrays"])
    table = np.load(root / "ranker" / "1" / "user_embedding.npy")
    x = np.concatenate([table[ids], features], axis=1)
    hidden = np.maximum(x @ w["w1"] + w["b1"], 0)
    return 1 / (1 + np.exp(-(hidden @ w["w2"] + w["b2"])))


def ranker_inputs(count: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    ids = np.concatenate([[0, SMALL_ROWS - 1], rng.integers(0, SMALL_ROWS, count - 2)]).astype(np.int64)
    return ids, rng.standard_normal((count, 16), dtype=np.float32)


def test_unsharded_ranker_equals_a_numpy_reference(ranker_root: Path) -> None:
    table_file = ranker_root / "ranker" / "1" / "user_embedding.npy"
    assert not table_file.exists()
    repository = Repository(ranker_root, sharding=False)
    model = repository.get("ranker")
    assert np.load(table_file).shape == (SMALL_ROWS, 64)  # generated on first use, at the config's size
    ids, features = ranker_inputs(64)
    score = model.forward({"user_id": ids, "features": features})["score"]
    assert score.shape == (64, 1) and score.dtype == np.float32
    np.testing.assert_allclose(score, ranker_reference(ranker_root, ids, features), rtol=0, atol=1e-6)
    [shard] = repository.shards()
    assert shard.name == "ranker/1" and shard.sharding.rows == SMALL_ROWS
    assert shard.table.held.size == SMALL_ROWS and shard.table.read_through == 0


def test_sharded_ranker_lists_its_table_and_reads_through(ranker_root: Path) -> None:
    repository = Repository(ranker_root)
    assert repository.shards() == []
    model = repository.get("ranker")
    [shard] = repository.shards()
    assert shard.name == "ranker/1" and shard.table.held.size == 0
    ids, features = ranker_inputs(20)
    score = model.forward({"user_id": ids, "features": features})["score"]
    np.testing.assert_allclose(score, ranker_reference(ranker_root, ids, features), rtol=0, atol=1e-6)


def test_a_table_of_another_shape_is_regenerated(ranker_root: Path) -> None:
    table_file = ranker_root / "ranker" / "1" / "user_embedding.npy"
    table_file.parent.mkdir()
    write_table(table_file, 10, 64, seed=0)
    Repository(ranker_root, sharding=False).get("ranker")
    expected = np.random.default_rng(11).standard_normal((SMALL_ROWS, 64), dtype=np.float32)
    assert np.array_equal(np.load(table_file), expected)


def test_a_table_of_the_right_shape_is_kept(ranker_root: Path) -> None:
    table_file = ranker_root / "ranker" / "1" / "user_embedding.npy"
    table_file.parent.mkdir()
    write_table(table_file, SMALL_ROWS, 64, seed=0)
    before = table_file.read_bytes()
    Repository(ranker_root, sharding=False).get("ranker")
    assert table_file.read_bytes() == before


# --- the gateway: split a request by holders, gather the answers -------------------------------

SPLIT = Sharding("t", "user_id", 100, 1)


def request(ids: list[int]) -> list[Tensor]:
    features = np.arange(len(ids) * 3, dtype="<f4").reshape(len(ids), 3)
    return [
        Tensor("features", "FP32", (len(ids), 3), features.tobytes()),
        Tensor("user_id", "INT64", (len(ids),), np.array(ids, dtype="<i8").tobytes()),
    ]


def by_id(ids: list[int], holders_of: Callable[[int], tuple[str, ...]], calls: list[list[int]]) -> Placement:
    """A placement that looks the id of each position up and asks ``holders_of(id)``."""
    of_position = {hash_id(i): i for i in ids}

    def placement(positions: list[int]) -> list[tuple[str, ...]]:
        calls.append(positions)
        return [holders_of(of_position[p]) for p in positions]

    return placement


def test_row_ids_and_take_rows() -> None:
    ids = [5, 0, 99, 2**40]
    tensors = request(ids)
    assert row_ids(tensors[1]) == ids
    taken = take_rows(tensors[0], [3, 0, 0])
    assert taken.shape == (3, 3) and taken.name == "features" and taken.datatype == "FP32"
    features = np.frombuffer(tensors[0].data, "<f4").reshape(4, 3)
    assert taken.data == features[[3, 0, 0]].tobytes()


def test_split_groups_rows_by_their_holders_in_order() -> None:
    ids = [7, 2, 4, 9, 11, 0, 2]
    tensors = request(ids)
    calls: list[list[int]] = []
    parts = split(tensors, SPLIT, by_id(ids, lambda i: ("even", "odd") if i % 2 == 0 else ("odd", "even"), calls))
    assert calls == [[hash_id(i) for i in ids]]
    assert [part.rows for part in parts] == [(0, 3, 4), (1, 2, 5, 6)]
    features = np.frombuffer(tensors[0].data, "<f4").reshape(len(ids), 3)
    for part in parts:
        assert part.position == hash_id(ids[part.rows[0]])
        got_features, got_ids = part.tensors
        assert (got_features.name, got_features.datatype, got_features.shape) == (
            "features",
            "FP32",
            (len(part.rows), 3),
        )
        assert got_features.data == features[list(part.rows)].tobytes()
        assert (got_ids.name, got_ids.shape) == ("user_id", (len(part.rows),))
        assert row_ids(got_ids) == [ids[r] for r in part.rows]


def test_split_by_the_first_two_holders() -> None:
    ids = [1, 2, 3, 4]
    second = {1: "b", 2: "c", 3: "b", 4: "c"}
    parts = split(request(ids), SPLIT, by_id(ids, lambda i: ("a", second[i]), []))
    assert [part.rows for part in parts] == [(0, 2), (1, 3)]


def test_a_single_group_is_the_request_itself() -> None:
    ids = [3, 1, 4, 1, 5]
    tensors = request(ids)
    [part] = split(tensors, SPLIT, by_id(ids, lambda i: ("a", "b"), []))
    assert part.rows == (0, 1, 2, 3, 4) and part.position == hash_id(3)
    assert part.tensors is tensors


@pytest.mark.parametrize("bad", [-1, 100, 2**40])
def test_split_refuses_ids_outside_the_table(bad: int) -> None:
    calls: list[list[int]] = []
    with pytest.raises(BadRequest, match=rf"user_id {bad} is outside the table"):
        split(request([1, bad, 2]), SPLIT, by_id([1, 2], lambda i: ("a",), calls))
    assert calls == []
    split(request([0, 99]), SPLIT, by_id([0, 99], lambda i: ("a",), []))  # both ends are in


def answer(part: Part, ids: list[int], node: str, batch_size: int, drop_one: bool = False) -> Result:
    """What a worker would answer for ``part``: score = id, pair = (id, -id)."""
    mine = [ids[r] for r in part.rows][: len(part.rows) - drop_one]
    score = np.array(mine, dtype="<f4").reshape(-1, 1)
    pair = np.array([[i, -i] for i in mine], dtype="<f8").reshape(-1, 2)
    outputs = (
        Tensor("score", "FP32", score.shape, score.tobytes()),
        Tensor("pair", "FP64", pair.shape, pair.tobytes()),
    )
    return Result("req-1", node, batch_size, "1", outputs)


def test_gather_puts_rows_back_in_request_order() -> None:
    ids = [7, 2, 4, 9, 11, 0, 2, 30]
    nodes = ("n0", "n1", "n2")
    parts = split(request(ids), SPLIT, by_id(ids, lambda i: (nodes[i % 3],), []))
    assert len(parts) == 3
    results = [answer(part, ids, nodes[ids[part.rows[0]] % 3], batch_size=4 + k) for k, part in enumerate(parts)]
    gathered = gather(parts, results, len(ids))
    score, pair = gathered.outputs
    assert (score.name, score.datatype, score.shape) == ("score", "FP32", (8, 1))
    assert np.array_equal(np.frombuffer(score.data, "<f4"), np.array(ids, dtype="<f4"))
    assert (pair.name, pair.datatype, pair.shape) == ("pair", "FP64", (8, 2))
    assert np.array_equal(np.frombuffer(pair.data, "<f8").reshape(8, 2), np.array([[i, -i] for i in ids]))
    assert gathered.node == "n0,n1,n2" and gathered.batch_size == 6
    assert (gathered.id, gathered.version) == ("req-1", "1")


def test_gather_of_one_part_is_its_result() -> None:
    ids = [1, 2]
    [part] = split(request(ids), SPLIT, by_id(ids, lambda i: ("a",), []))
    result = answer(part, ids, "a", 1)
    assert gather([part], [result], 2) is result


def test_gather_refuses_an_answer_with_the_wrong_number_of_rows() -> None:
    ids = [1, 2, 3, 4]
    parts = split(request(ids), SPLIT, by_id(ids, lambda i: (str(i % 2),), []))
    results = [answer(parts[0], ids, "w1", 1), answer(parts[1], ids, "w2", 1, drop_one=True)]
    with pytest.raises(BadGateway, match="w2"):
        gather(parts, results, len(ids))


# --- the router: a position goes to its ring owner ----------------------------------------------

WORKERS = ("w1", "w2", "w3", "w4")


def router(breaker: Breaker | None = None) -> Router:
    r = Router(150, 1.25, 10_000, breaker or Breaker(3, 5.0))
    r.set_members({n: Member(1.0, "r1") for n in WORKERS})
    return r


def test_a_position_goes_to_its_owner_even_when_bounded_loads_would_spill() -> None:
    r = router()
    ring = Ring.from_nodes(dict.fromkeys(WORKERS, 1.0), 150)
    position = hash_id(12_345)
    owner = ring.lookup_hash(position)
    for _ in range(50):
        lease = r.acquire("shard-key", rows=100, floor_rows=0, position=position)
        assert lease.node == owner and not lease.spilled
    key = next(f"user-{i}" for i in range(10_000) if ring.lookup(f"user-{i}") == owner)
    spilled = r.acquire(key, rows=100, floor_rows=0)
    assert spilled.node != owner and spilled.spilled  # the owner is loaded: a plain key would move on
    for row in range(200):  # whatever the key, a position picks the node
        assert r.acquire("shard-key", position=hash_id(row)).node == ring.lookup_hash(hash_id(row))


@fast
@given(st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=20))
def test_placements_are_the_first_two_holders(positions: list[int]) -> None:
    ring = Ring.from_nodes(dict.fromkeys(WORKERS, 1.0), 150)
    placed = router().placements(positions)
    assert placed == [tuple(ring.preference_hash(p, 2)) for p in positions]
    assert all(len(set(pair)) == 2 for pair in placed)


def test_placements_and_positions_route_around_an_open_breaker() -> None:
    breaker = Breaker(3, 5.0)
    r = router(breaker)
    for _ in range(3):
        breaker.record("w2", ok=False)
    without = Ring.from_nodes({"w1": 1.0, "w3": 1.0, "w4": 1.0}, 150)
    positions = [hash_id(i) for i in range(200)]
    assert r.placements(positions) == [tuple(without.preference_hash(p, 2)) for p in positions]
    assert [r.acquire("k", position=p).node for p in positions] == [without.lookup_hash(p) for p in positions]


def test_placements_with_one_worker() -> None:
    r = Router(150, 1.25, 10_000, Breaker(3, 5.0))
    r.set_members({"solo": Member(1.0, "r1")})
    assert r.placements([0, 2**63, 2**64 - 1]) == [("solo",)] * 3
