"""Model sharding against real workers: every worker holds only its rows of the ranker's table,
requests are split by owner and gathered in order, and the tables follow joins, leaves and crashes
without failing a request."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient

from hashing.ring import Ring
from hashing.shards import held_rows, holders
from tasks.engine import Model
from tasks.repository import Repository
from tasks.settings import Settings
from tests.conftest import ROOT, ClosedLoop, Cluster, wait_until

ROWS = 30_000


def ranker_repository(root: Path, rows: int, replicas: int = 1) -> Path:
    """A model repository holding only the ranker, with a table of ``rows`` rows."""
    config = json.loads((ROOT / "models" / "ranker" / "config.json").read_text())
    config["sharding"].update(rows=rows, replicas=replicas)
    (root / "ranker").mkdir(parents=True)
    (root / "ranker" / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    return ranker_repository(tmp_path / "models", ROWS)


def body(ids: list[int], features: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "user_id", "datatype": "INT64", "shape": [len(ids)], "data": ids},
            {"name": "features", "datatype": "FP32", "shape": [len(ids), 16], "data": features.ravel().tolist()},
        ]
    }


def infer(client: FlaskClient, ids: list[int], features: np.ndarray) -> tuple[int, dict[str, Any]]:
    response = client.post("/v2/models/ranker/infer", json=body(ids, features))
    return response.status_code, response.json or {}


def scores(answer: dict[str, Any]) -> np.ndarray:
    return np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(-1, 1)


def reference(model: Model, ids: list[int], features: np.ndarray) -> np.ndarray:
    return model.forward({"user_id": np.array(ids, dtype=np.int64), "features": features})["score"]


def wait_ready(client: FlaskClient, nodes: set[str]) -> None:
    def ready() -> bool:
        return set(client.get("/stats").json["members"]) == nodes and (
            client.get("/v2/models/ranker/ready").status_code == 200
        )

    wait_until(ready, 60, f"the ranker to be loaded by {sorted(nodes)}")


def shards(client: FlaskClient) -> dict[str, dict[str, Any]]:
    return {node: tables["ranker/1"] for node, tables in client.get("/stats").json["shards"].items()}


def start(cluster: Cluster, app_factory: Callable[[Settings], Flask], *nodes: str) -> tuple[Flask, FlaskClient]:
    cluster.start(*nodes)
    app = app_factory(cluster.settings)
    client = app.test_client()
    wait_ready(client, set(nodes))
    return app, client


class RankerLoad(ClosedLoop):
    """Clients sending ranker requests of 1-32 random ids until stopped; every answer is checked
    against the unsharded model in this process."""

    def __init__(self, app: Flask, model: Model, rows: int, clients: int = 3) -> None:
        super().__init__(app, clients)
        self.model, self.rows = model, rows
        self.wrong = 0

    def send(self, client: FlaskClient, n: int, i: int) -> tuple[int, str | None]:
        rng = np.random.default_rng((n, i))
        count = int(rng.integers(1, 33))
        ids = rng.integers(0, self.rows, count).tolist()
        features = rng.standard_normal((count, 16), dtype=np.float32)
        status, answer = infer(client, ids, features)
        if status != 200:
            return status, None
        if not np.allclose(scores(answer), reference(self.model, ids, features), rtol=0, atol=1e-6):
            self.wrong += 1
        return status, answer["parameters"]["node"]


@pytest.fixture
def model(repository: Path) -> Iterator[Model]:
    yield Repository(repository, sharding=False).get("ranker")


def test_split_and_gather_equal_the_unsharded_model(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask], repository: Path, model: Model
) -> None:
    cluster = cluster_factory(model_repository=str(repository))
    nodes = ["s1", "s2", "s3"]
    _, client = start(cluster, app_factory, *nodes)
    ring = Ring.from_nodes(dict.fromkeys(nodes, 1.0), cluster.settings.vnodes)

    # Each worker holds exactly the rows the ring gives it, and nothing else.
    held = shards(client)
    for node in nodes:
        assert held[node]["held"] == len(held_rows(ring, node, 1, ROWS))
        assert held[node]["loaded"] == held[node]["held"]
    assert sum(h["held"] for h in held.values()) == ROWS

    # One request whose rows belong to every owner, interleaved: answered in the request's order.
    by_owner = {n: [i for i in range(ROWS) if holders(ring, i, 1) == [n]][:5] for n in nodes}
    ids = [by_owner[n][k] for k in range(5) for n in nodes]
    features = np.random.default_rng(0).standard_normal((len(ids), 16), dtype=np.float32)
    status, answer = infer(client, ids, features)
    assert status == 200, answer
    assert answer["parameters"]["node"] == ",".join(nodes)
    np.testing.assert_allclose(scores(answer), reference(model, ids, features), rtol=0, atol=1e-6)

    # Many mixed requests, and ids at both ends of the table.
    rng = np.random.default_rng(1)
    for n in [1, 2, 7, 32, 32]:
        ids = rng.integers(0, ROWS, n).tolist()
        ids[0] = 0 if n % 2 else ROWS - 1
        features = rng.standard_normal((n, 16), dtype=np.float32)
        status, answer = infer(client, ids, features)
        assert status == 200, answer
        np.testing.assert_allclose(scores(answer), reference(model, ids, features), rtol=0, atol=1e-6)

    # Owners answered from memory: no row was read from the file.
    assert all(h["read_through"] == 0 for h in shards(client).values())

    # Ids outside the table are the client's mistake, and say which id.
    for bad in (ROWS, -1, 2**62):
        status, answer = infer(client, [5, bad], np.zeros((2, 16), np.float32))
        assert status == 400 and str(bad) in answer["error"], answer


def test_tables_follow_a_join_and_a_leave_under_load(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask], repository: Path, model: Model
) -> None:
    cluster = cluster_factory(model_repository=str(repository), shard_grace_ms=3000)
    app, client = start(cluster, app_factory, "s1", "s2")
    # A gateway that never looks at membership again: it keeps routing by the ring without s3.
    stale = app_factory(dataclasses.replace(cluster.settings, ring_refresh_ms=600_000)).test_client()
    wait_ready(stale, {"s1", "s2"})
    before = shards(client)
    with RankerLoad(app, model, ROWS) as load:
        load.wait_for(50)
        cluster.start("s3")
        wait_ready(client, {"s1", "s2", "s3"})
        ring = Ring.from_nodes(dict.fromkeys(["s1", "s2", "s3"], 1.0), cluster.settings.vnodes)

        # Within the grace period the old owners still hold the rows s3 took: the stale gateway's
        # requests are answered from memory.
        rng = np.random.default_rng(2)
        for _ in range(10):
            ids = rng.integers(0, ROWS, 32).tolist()
            features = rng.standard_normal((32, 16), dtype=np.float32)
            status, answer = infer(stale, ids, features)
            assert status == 200 and "s3" not in answer["parameters"]["node"], answer
            np.testing.assert_allclose(scores(answer), reference(model, ids, features), rtol=0, atol=1e-6)
        assert all(shards(client)[n]["read_through"] == before[n]["read_through"] for n in ("s1", "s2"))

        def dropped() -> bool:
            now = shards(client)
            return all(now[n]["held"] == len(held_rows(ring, n, 1, ROWS)) for n in ("s1", "s2"))

        wait_until(dropped, 30, "s1 and s2 to drop the rows s3 took")
        joined = shards(client)
        # Only the new worker loaded rows: exactly its share; the others dropped exactly that many.
        assert joined["s3"]["loaded"] == joined["s3"]["held"] == len(held_rows(ring, "s3", 1, ROWS))
        assert sum(joined[n]["loaded"] - before[n]["loaded"] for n in ("s1", "s2")) == 0
        assert sum(joined[n]["dropped"] for n in ("s1", "s2")) == joined["s3"]["held"]
        load.wait_for(50)

        cluster.stop("s3")  # a graceful leave: s1 and s2 load its rows back
        wait_ready(client, {"s1", "s2"})
        load.wait_for(50)
    left = shards(client)
    assert left["s1"]["held"] + left["s2"]["held"] == ROWS
    assert load.failed() == [] and load.wrong == 0, (load.failed()[:5], load.wrong)
    assert len(load.results) >= 150


def test_a_killed_workers_rows_are_served_by_their_replica(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask], tmp_path: Path
) -> None:
    repository = ranker_repository(tmp_path / "replicated", ROWS, replicas=2)
    model = Repository(repository, sharding=False).get("ranker")
    cluster = cluster_factory(model_repository=str(repository))
    app, client = start(cluster, app_factory, "s1", "s2", "s3")
    ring = Ring.from_nodes(dict.fromkeys(["s1", "s2", "s3"], 1.0), cluster.settings.vnodes)
    held = shards(client)
    for node in ("s1", "s2", "s3"):
        assert held[node]["held"] == len(held_rows(ring, node, 2, ROWS))
    assert sum(h["held"] for h in held.values()) == 2 * ROWS

    with RankerLoad(app, model, ROWS) as load:
        load.wait_for(50)
        cluster.stop("s2", sig=9)
        wait_until(lambda: set(client.get("/stats").json["members"]) == {"s1", "s3"}, 30, "s2 to expire")
        count = len(load.results)
        load.wait_for(50)
        assert not any("s2" in (node or "") for _, node in load.results[count + 10 :])
        wait_ready(client, {"s1", "s3"})
    assert load.failed() == [] and load.wrong == 0, (load.failed()[:5], load.wrong)
    # Every row s2 held had a replica in memory: nothing was read from the file meanwhile.
    assert all(h["read_through"] == 0 for h in shards(client).values())


def anonymous_kb(pid: int) -> int:
    """A process's anonymous resident memory (kB), from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon")


def test_each_worker_keeps_only_its_share_in_memory(
    cluster_factory: Callable[..., Cluster], app_factory: Callable[[Settings], Flask], tmp_path: Path
) -> None:
    rows = 400_000  # 100 MB of float32 x 64
    repository = ranker_repository(tmp_path / "big", rows)
    table_kb = rows * 64 * 4 // 1024
    sharded = cluster_factory(model_repository=str(repository))
    _, client = start(sharded, app_factory, "s1", "s2", "s3")
    whole = cluster_factory(model_repository=str(repository), sharding=False)
    _, whole_client = start(whole, app_factory, "u1")
    assert shards(whole_client)["u1"]["held"] == rows

    unsharded_kb = anonymous_kb(whole.workers["u1"].proc.pid)  # type: ignore[union-attr]
    for node, worker in sharded.workers.items():
        pid = worker.proc.pid  # type: ignore[union-attr]
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "user_embedding.npy" not in maps, f"{node} maps the table file"
        share = shards(client)[node]["held"] / rows
        # The unsharded worker holds the whole table; a sharded one only its share of it.
        saved_kb = unsharded_kb - anonymous_kb(pid)
        assert saved_kb >= 0.8 * (1 - share) * table_kb, (node, share, saved_kb, table_kb)
