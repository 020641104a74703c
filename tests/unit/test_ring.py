"""Unit and property tests for hashing.ring: determinism, balance, movement, bounded loads."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hashing.ring import EmptyRingError, Ring, hash64

REPO_ROOT = Path(__file__).resolve().parents[2]
KEYS = [f"key-{i}" for i in range(100_000)]
WORKERS = [f"worker_{i}" for i in range(1, 11)]
MAX_OVER_MEAN = 1.25  # goal: no node above 1.25x the mean share of keys
MOVED_SLACK = 1.1  # goal: a join moves at most 1.1 x 1/(N+1) of the keys

node_ids = st.text(alphabet="abcdefghij_0123456789", min_size=1, max_size=6)
node_sets = st.lists(node_ids, min_size=1, max_size=8, unique=True)
keys = st.one_of(st.text(max_size=20), st.binary(max_size=20))
fast = settings(max_examples=60, deadline=None)


def ring_of(nodes: list[str], vnodes: int = 150) -> Ring:
    ring = Ring(vnodes=vnodes)
    for node_id in nodes:
        ring.add(node_id)
    return ring


@pytest.fixture(scope="module")
def owners_by_size() -> dict[int, list[str]]:
    """Owner of every key in KEYS for rings worker_1..worker_N, N = 3..10, grown by add()."""
    ring = ring_of(WORKERS[:2])
    owners: dict[int, list[str]] = {}
    for size in range(3, 11):
        ring.add(WORKERS[size - 1])
        owners[size] = [ring.lookup(key) for key in KEYS]
    return owners


# --- hash64 -----------------------------------------------------------------------------------


def test_hash64_known_values() -> None:
    # Regression anchors: changing these re-routes every key in every deployment.
    assert hash64(b"") == 16476032584258269876
    assert hash64("key-0") == 9679884382612836663
    assert hash64("worker_1#0") == 3870094202261206359


def test_hash64_str_is_utf8_bytes_and_64_bit() -> None:
    assert hash64("clé") == hash64("clé".encode())
    assert all(0 <= hash64(key) < 2**64 for key in KEYS[:1000])


@pytest.mark.parametrize("seed", ["1", "2"])
def test_owners_identical_across_processes(seed: str) -> None:
    nodes = WORKERS[:5]
    ring = ring_of(nodes)
    expected = [ring.lookup(f"key-{i}") for i in range(200)]
    code = (
        "import json, sys\n"
        "from hashing.ring import Ring\n"
        "ring = Ring()\n"
        "for node_id in sys.argv[1:]:\n"
        "    ring.add(node_id)\n"
        "print(json.dumps([ring.lookup(f'key-{i}') for i in range(200)]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code, *nodes],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(done.stdout) == expected


# --- balance and movement on fixed keys --------------------------------------------------------


@pytest.mark.parametrize("size", range(3, 11))
def test_balance_max_over_mean(owners_by_size: dict[int, list[str]], size: int) -> None:
    counts = Counter(owners_by_size[size])
    assert set(counts) == set(WORKERS[:size])
    assert max(counts.values()) / (len(KEYS) / size) <= MAX_OVER_MEAN


@pytest.mark.parametrize("size", range(3, 10))
def test_join_moves_only_keys_of_new_node(owners_by_size: dict[int, list[str]], size: int) -> None:
    before, after = owners_by_size[size], owners_by_size[size + 1]
    newcomer = WORKERS[size]
    moved = [new for old, new in zip(before, after, strict=True) if old != new]
    assert set(moved) == {newcomer}
    assert len(moved) / len(KEYS) <= MOVED_SLACK / (size + 1)


def test_leave_moves_only_keys_of_leaving_node(owners_by_size: dict[int, list[str]]) -> None:
    ring = ring_of(WORKERS[:6])
    ring.remove("worker_3")
    for key, old in zip(KEYS[:20_000], owners_by_size[6], strict=False):
        new = ring.lookup(key)
        assert new == old or old == "worker_3"
        assert new != "worker_3"


def test_remove_undoes_add(owners_by_size: dict[int, list[str]]) -> None:
    ring = ring_of(WORKERS[:4])
    ring.add("worker_9")
    ring.remove("worker_9")
    assert [ring.lookup(key) for key in KEYS[:20_000]] == owners_by_size[4][:20_000]


def test_weight_two_gets_twice_the_keys() -> None:
    ring = ring_of(WORKERS[:4])
    ring.add("heavy", weight=2.0)
    counts = Counter(ring.lookup(key) for key in KEYS[:50_000])
    light_mean = sum(counts[node_id] for node_id in WORKERS[:4]) / 4
    assert abs(counts["heavy"] / light_mean - 2.0) <= 0.15 * 2.0


def test_points_per_node_follow_weight() -> None:
    hashed: list[bytes | str] = []

    def recording_hash(data: bytes | str) -> int:
        hashed.append(data)
        return hash64(data)

    ring = Ring(vnodes=10, hash_fn=recording_hash)
    ring.add("a", weight=2.5)
    ring.add("b", weight=0.001)
    assert sorted(hashed) == sorted([f"a#{i}" for i in range(25)] + ["b#0"])


def test_readd_replaces_weight() -> None:
    ring = ring_of(["a", "b", "c"])
    ring.add("b", weight=3.0)
    fresh = Ring()
    for node_id, weight in [("a", 1.0), ("b", 3.0), ("c", 1.0)]:
        fresh.add(node_id, weight)
    assert ring.nodes == {"a": 1.0, "b": 3.0, "c": 1.0}
    assert [ring.lookup(key) for key in KEYS[:5000]] == [fresh.lookup(key) for key in KEYS[:5000]]


def test_collisions_break_ties_by_node_id() -> None:
    def constant_hash(data: bytes | str) -> int:
        return 42

    for order in (["b", "a", "c"], ["c", "b", "a"], ["a", "c", "b"]):
        ring = Ring(vnodes=3, hash_fn=constant_hash)
        for node_id in order:
            ring.add(node_id)
        assert ring.lookup("anything") == "a"
        assert ring.preference_list("anything", 3) == ["a", "b", "c"]


def test_membership_views() -> None:
    ring = ring_of(["a", "b"])
    assert len(ring) == 2 and "a" in ring and "z" not in ring
    view = ring.nodes
    view["z"] = 1.0
    assert "z" not in ring  # nodes is a copy


# --- errors ------------------------------------------------------------------------------------


def test_empty_ring_raises() -> None:
    ring = Ring()
    with pytest.raises(EmptyRingError):
        ring.lookup("k")
    with pytest.raises(EmptyRingError):
        ring.preference_list("k", 2)
    with pytest.raises(EmptyRingError):
        ring.lookup_bounded("k", {})
    ring.add("a")
    ring.remove("a")
    with pytest.raises(LookupError):
        ring.lookup("k")


def test_remove_unknown_node_raises_key_error() -> None:
    with pytest.raises(KeyError):
        ring_of(["a"]).remove("b")


@pytest.mark.parametrize("weight", [0.0, -1.0, math.nan, math.inf])
def test_bad_weight_raises_value_error(weight: float) -> None:
    ring = Ring()
    with pytest.raises(ValueError):
        ring.add("a", weight)
    assert "a" not in ring


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError):
        Ring(vnodes=0)
    ring = ring_of(["a", "b"])
    with pytest.raises(ValueError):
        ring.lookup_bounded("k", {}, c=0.9)
    with pytest.raises(ValueError):
        ring.lookup_bounded("k", {"a": -1})


# --- properties --------------------------------------------------------------------------------


def brute_force_order(ring: Ring, nodes: list[str], key: bytes | str) -> list[str]:
    """Distinct nodes clockwise from hash(key), computed from scratch from the definition."""
    return brute_force_order_at(ring, nodes, hash64(key))


def brute_force_order_at(ring: Ring, nodes: list[str], h: int) -> list[str]:
    """Distinct nodes clockwise from ring position ``h``, computed from scratch from the definition."""
    vnodes = ring.vnodes
    points = sorted((hash64(f"{node_id}#{i}"), node_id) for node_id in nodes for i in range(vnodes))
    start = next((i for i, (point, _) in enumerate(points) if point >= h), 0)
    order: list[str] = []
    for _, node_id in points[start:] + points[:start]:
        if node_id not in order:
            order.append(node_id)
    return order


@fast
@given(nodes=node_sets, key=keys, n=st.integers(min_value=0, max_value=10))
def test_preference_list_property(nodes: list[str], key: bytes | str, n: int) -> None:
    ring = ring_of(nodes, vnodes=20)
    prefs = ring.preference_list(key, n)
    assert len(prefs) == min(n, len(nodes))
    assert len(set(prefs)) == len(prefs)
    assert set(prefs) <= set(nodes)
    if n >= 1:
        assert prefs[0] == ring.lookup(key)
    assert prefs == brute_force_order(ring, nodes, key)[: len(prefs)]


@fast
@given(nodes=node_sets, key=keys, data=st.data())
def test_ring_independent_of_insertion_order(nodes: list[str], key: bytes | str, data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(nodes))
    first, second = ring_of(nodes, vnodes=20), ring_of(shuffled, vnodes=20)
    assert first.preference_list(key, len(nodes)) == second.preference_list(key, len(nodes))


def snapshot(ring: Ring) -> tuple[dict[str, float], list[list[str]]]:
    """What a ring answers: its membership and the full preference lists of 300 fixed keys."""
    return ring.nodes, [ring.preference_list(f"key-{i}", len(ring)) for i in range(300)]


def test_from_nodes_equals_adding_one_by_one() -> None:
    weights = {"worker_1": 1.0, "worker_2": 2.5, "worker_3": 0.001, "worker_4": 1.0}
    built = Ring.from_nodes(weights)
    added = Ring()
    for node_id, weight in weights.items():
        added.add(node_id, weight)
    assert snapshot(built) == snapshot(added)
    assert built.vnodes == 150
    assert [built.lookup(key) for key in KEYS[:5000]] == [added.lookup(key) for key in KEYS[:5000]]


def test_from_nodes_orders_collisions_by_node_id() -> None:
    def constant_hash(data: bytes | str) -> int:
        return 42

    ring = Ring.from_nodes({"c": 1.0, "a": 1.0, "b": 1.0}, vnodes=3, hash_fn=constant_hash)
    assert ring.lookup("anything") == "a"
    assert ring.preference_list("anything", 3) == ["a", "b", "c"]


def test_from_nodes_empty_and_bad_weights() -> None:
    with pytest.raises(EmptyRingError):
        Ring.from_nodes({}).lookup("k")
    for weight in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            Ring.from_nodes({"a": 1.0, "b": weight})
    with pytest.raises(ValueError):
        Ring.from_nodes({"a": 1.0}, vnodes=0)


def test_add_hashes_each_point_once() -> None:
    calls: Counter[bytes | str] = Counter()

    def counting_hash(data: bytes | str) -> int:
        calls[data] += 1
        return hash64(data)

    ring = Ring.from_nodes({"a": 1.0, "b": 1.0}, vnodes=10, hash_fn=counting_hash)
    ring.add("c")
    ring.add("c", 2.0)  # re-add: old points dropped, new points merged
    assert max(calls.values()) <= 2  # a join hashes the newcomer's points only
    assert ring.nodes == {"a": 1.0, "b": 1.0, "c": 2.0}
    assert snapshot(ring) == snapshot(Ring.from_nodes({"a": 1.0, "b": 1.0, "c": 2.0}, vnodes=10))


weights = st.sampled_from([0.001, 0.1, 0.5, 1.0, 1.5, 2.0, 3.3])
memberships = st.dictionaries(node_ids, weights, min_size=0, max_size=8)


def crowded_hash(data: bytes | str) -> int:
    """hash64 folded onto 97 points: most points collide, so their tie order shows in lookups."""
    return hash64(data) % 97


@fast
@given(nodes=memberships, extra=memberships, data=st.data())
def test_from_nodes_equals_incremental_adds_property(
    nodes: dict[str, float], extra: dict[str, float], data: st.DataObject
) -> None:
    """Random memberships, random add order, re-adds and removals: one sort gives the same ring."""
    order = data.draw(st.permutations(list(nodes)))
    removed = data.draw(st.sets(st.sampled_from(order))) if order else set()
    incremental = Ring(vnodes=20, hash_fn=crowded_hash)
    for node_id in order:
        incremental.add(node_id, nodes[node_id])
    for node_id, weight in extra.items():
        incremental.add(node_id, weight)  # a re-add replaces the weight
    for node_id in removed - set(extra):
        incremental.remove(node_id)
    final = {**nodes, **extra}
    final = {node_id: weight for node_id, weight in final.items() if node_id not in removed - set(extra)}
    built = Ring.from_nodes(final, vnodes=20, hash_fn=crowded_hash)
    assert built.nodes == incremental.nodes == final
    if final:
        assert snapshot(built) == snapshot(incremental)


# --- bounded loads -----------------------------------------------------------------------------


@fast
@given(nodes=node_sets, key=keys)
def test_bounded_with_zero_loads_equals_lookup(nodes: list[str], key: bytes | str) -> None:
    ring = ring_of(nodes, vnodes=20)
    assert ring.lookup_bounded(key, {}) == ring.lookup(key)
    assert ring.lookup_bounded(key, dict.fromkeys(nodes, 0)) == ring.lookup(key)


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=8),
    assignments=st.lists(st.text(max_size=8), min_size=1, max_size=300),
    c=st.floats(min_value=1.1, max_value=2.0),
)
def test_bounded_never_exceeds_capacity(size: int, assignments: list[str], c: float) -> None:
    ring = ring_of(WORKERS[:size], vnodes=20)
    loads: Counter[str] = Counter()
    for key in assignments:
        loads[ring.lookup_bounded(key, loads, c)] += 1
    assert max(loads.values()) <= math.ceil(c * len(assignments) / size)


def test_hot_key_spills_over_several_nodes() -> None:
    ring = ring_of(WORKERS[:5])
    loads: Counter[str] = Counter()
    for _ in range(300):
        loads[ring.lookup_bounded("hot", loads, 1.25)] += 1
    assert max(loads.values()) <= math.ceil(1.25 * 300 / 5)
    assert len(loads) >= 4
    assert loads.most_common(1)[0][0] == ring.lookup("hot")
    assert list(loads) == ring.preference_list("hot", len(loads))


def test_bounded_ignores_loads_of_nodes_outside_ring() -> None:
    ring = ring_of(["a", "b"])
    owner = ring.lookup("k")
    assert ring.lookup_bounded("k", {"gone": 10_000}) == owner


# --- bounded loads with a floor, sizes and weights ----------------------------------------------------


def test_below_the_floor_every_key_meets_its_owner() -> None:
    ring = Ring.from_nodes({"a": 1.0, "b": 1.0, "c": 1.0})
    loads = {"a": 0, "b": 0, "c": 0}
    for i in range(90):  # 30 rows each on average: under a floor of one 32-row batch
        key = f"user-{i}"
        node = ring.lookup_bounded(key, loads, 1.25, floor=32)
        assert node == ring.lookup(key)
        loads[node] += 1


def test_without_a_floor_a_light_load_already_spills() -> None:
    """Why the floor exists: ceil(1.25 * 3 / 3) = 2, so a node holding 2 rows is 'full'."""
    ring = Ring.from_nodes({"a": 1.0, "b": 1.0, "c": 1.0})
    key = next(k for k in (f"user-{i}" for i in range(100)) if ring.lookup(k) == "a")
    assert ring.lookup_bounded(key, {"a": 2, "b": 0, "c": 0}, 1.25) != "a"
    assert ring.lookup_bounded(key, {"a": 2, "b": 0, "c": 0}, 1.25, floor=32) == "a"


def test_above_the_floor_the_bound_holds_per_weight() -> None:
    ring = Ring.from_nodes({"big": 2.0, "small": 1.0, "other": 1.0})
    loads = {"big": 0, "small": 0, "other": 0}
    for _ in range(4000):  # one hot key
        node = ring.lookup_bounded("hot", loads, 1.25, floor=32, size=1)
        share = 1.25 * (sum(loads.values()) + 1) * ring.nodes[node] / 4.0
        assert loads[node] + 1 <= max(32, math.ceil(share))
        loads[node] += 1
    assert loads["big"] == pytest.approx(2 * loads["small"], rel=0.05)


def test_rows_count_as_load() -> None:
    ring = Ring.from_nodes({"a": 1.0, "b": 1.0})
    key = next(k for k in (f"user-{i}" for i in range(100)) if ring.lookup(k) == "a")
    assert ring.lookup_bounded(key, {"a": 20, "b": 0}, 1.25, floor=32, size=12) == "a"  # 32 rows fit
    assert ring.lookup_bounded(key, {"a": 21, "b": 0}, 1.25, floor=32, size=12) == "b"  # 33 do not


def test_an_item_too_big_for_every_node_goes_to_its_owner() -> None:
    ring = Ring.from_nodes({"a": 1.0, "b": 1.0})
    assert ring.lookup_bounded("k", {"a": 100, "b": 100}, 1.0, floor=1, size=50) == ring.lookup("k")
    with pytest.raises(ValueError):
        ring.lookup_bounded("k", {}, 1.25, size=0)


# --- positions: keys hashed elsewhere (table row ids) -------------------------------------------

positions = st.integers(min_value=0, max_value=2**64 - 1)


@fast
@given(nodes=node_sets, key=keys, n=st.integers(min_value=0, max_value=10))
def test_hash_lookups_agree_with_key_lookups(nodes: list[str], key: bytes | str, n: int) -> None:
    ring = ring_of(nodes, vnodes=20)
    assert ring.lookup_hash(hash64(key)) == ring.lookup(key)
    assert ring.preference_hash(hash64(key), n) == ring.preference_list(key, n)


@fast
@given(nodes=node_sets, position=positions, n=st.integers(min_value=0, max_value=10))
def test_preference_hash_property(nodes: list[str], position: int, n: int) -> None:
    ring = ring_of(nodes, vnodes=20)
    expected = brute_force_order_at(ring, nodes, position)
    assert ring.lookup_hash(position) == expected[0]
    assert ring.preference_hash(position, n) == expected[: max(0, n)]


def test_a_position_belongs_to_the_first_point_at_or_after_it() -> None:
    ring = Ring.from_nodes({"a": 1.0, "b": 1.0, "c": 1.0}, vnodes=10)
    points, owners = ring.arcs()
    assert len(set(points)) == len(points) and 0 < points[0] and points[-1] < 2**64 - 1
    for i, (point, owner) in enumerate(zip(points, owners, strict=True)):
        assert ring.lookup_hash(point) == owner
        assert ring.lookup_hash(points[i - 1] + 1 if i else 0) == owner
    assert ring.lookup_hash(points[-1] + 1) == owners[0]  # past the last point: wraps to the first
    assert ring.lookup_hash(2**64 - 1) == owners[0]


def test_arcs_are_every_point_sorted() -> None:
    weights = {"a": 1.0, "b": 2.5, "c": 0.001}
    ring = Ring.from_nodes(weights, vnodes=40)
    points, owners = ring.arcs()
    assert len(points) == len(owners) == 40 + 100 + 1
    assert points == sorted(points)
    expected = sorted((hash64(f"{n}#{i}"), n) for n, w in weights.items() for i in range(max(1, round(40 * w))))
    assert list(zip(points, owners, strict=True)) == expected
    points.clear()  # a copy: the ring is not changed through it
    assert ring.arcs()[0] == [point for point, _ in expected]


def test_arcs_follow_add_and_remove() -> None:
    ring = ring_of(["a", "b"], vnodes=30)
    ring.add("c")
    assert len(ring.arcs()[0]) == 90 and set(ring.arcs()[1]) == {"a", "b", "c"}
    ring.remove("a")
    points, owners = ring.arcs()
    assert len(points) == 60 and points == sorted(points) and set(owners) == {"b", "c"}


def test_hash_lookups_on_an_empty_ring_raise() -> None:
    ring = Ring()
    assert ring.arcs() == ([], [])
    with pytest.raises(EmptyRingError):
        ring.lookup_hash(0)
    with pytest.raises(EmptyRingError):
        ring.preference_hash(0, 2)


def first_that_fits(ring: Ring, key: str, loads: dict[str, int], c: float, floor: float, size: int) -> str:
    """Bounded loads as the paper states them, walked in full: the first node clockwise whose capacity
    ``max(floor, ceil(c * (total + size) * weight / total weight))`` takes ``size`` more; else the owner."""
    total = sum(loads.get(n, 0) for n in ring.nodes)
    for node in ring.preference_list(key, len(ring)):
        capacity = max(floor, math.ceil(c * (total + size) * ring.nodes[node] / sum(ring.nodes.values())))
        if loads.get(node, 0) + size <= capacity:
            return node
    return ring.lookup(key)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from("abcde"), st.sampled_from([0.5, 1.0, 2.0]), min_size=1),
    st.dictionaries(st.sampled_from("abcde"), st.integers(0, 60)),
    st.text(min_size=1, max_size=8),
    st.floats(1.0, 3.0),
    st.sampled_from([0, 8, 16, 32]),
    st.integers(1, 12),
)
def test_bounded_lookup_equals_the_full_walk(
    weights: dict[str, float], loads: dict[str, int], key: str, c: float, floor: int, size: int
) -> None:
    """The owner-first shortcut and the key hashed once change no answer."""
    ring = Ring.from_nodes(weights, vnodes=20)
    expected = first_that_fits(ring, key, loads, c, floor, size)
    assert ring.lookup_bounded(key, loads, c, floor, size) == expected
    assert ring.lookup_bounded_hash(ring.position(key), loads, c, floor, size) == expected
