"""Model versions: Triton's version policy, the traffic split in config.json, and reloading a repository."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.gateway import Gateway
from tasks.metadata import Catalog, ModelConfigError, load_metadata, load_repository
from tasks.repository import Repository, UnknownModelError
from tasks.settings import Settings

X = {"x": np.ones((1, 2), dtype=np.float32)}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write_model(root: Path, folders: tuple[str, ...] = ("1",), name: str = "m", **config: Any) -> Path:
    """A 2 -> 2 linear model whose version V multiplies its input by V (so answers tell versions apart)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
        "layers": [{"type": "dense", "weight": "w"}],
        **config,
    }
    (folder / "config.json").write_text(json.dumps({k: v for k, v in body.items() if v is not None}))
    for version in folders:
        add_version(folder, version)
    return folder


def add_version(folder: Path, version: str) -> None:
    (folder / version).mkdir(exist_ok=True)
    np.savez(folder / version / "weights.npz", w=np.eye(2, dtype=np.float32) * int(version))


def set_config(folder: Path, **changes: Any) -> None:
    """Change config.json's top-level keys (None removes one)."""
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


# -- version policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        (None, ("1", "2", "10")),
        ({"all": {}}, ("1", "2", "10")),
        ({"latest": {"num_versions": 2}}, ("2", "10")),
        ({"latest": {"num_versions": 9}}, ("1", "2", "10")),
        ({"specific": {"versions": [1, "10"]}}, ("1", "10")),
    ],
)
def test_the_version_policy_picks_among_the_numeric_folders(
    tmp_path: Path, policy: dict[str, Any] | None, served: tuple[str, ...]
) -> None:
    folder = write_model(tmp_path, ("1", "2", "10"), version_policy=policy)
    (folder / "notes").mkdir()  # not a version
    meta = load_metadata(folder)
    assert meta.versions == served and meta.default_version == served[-1]


def test_a_versions_list_gives_the_candidates_and_the_policy_picks(tmp_path: Path) -> None:
    folder = write_model(tmp_path, ("1", "2", "3"), versions=["3", 1, "2"])
    assert load_metadata(folder).versions == ("1", "2", "3")
    set_config(folder, versions=["1", "2"], version_policy={"latest": {"num_versions": 1}})
    assert load_metadata(folder).versions == ("2",)
    set_config(folder, default_version="1")
    with pytest.raises(ModelConfigError, match="default_version 1 is not served"):
        load_metadata(folder)


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"version_policy": {"latest": {"num_versions": 0}}}, "version_policy: must be"),
        ({"version_policy": {"latest": {"num_versions": True}}}, "version_policy: must be"),
        ({"version_policy": {"latest": {}}}, "version_policy: must be"),
        ({"version_policy": {"specific": {"versions": []}}}, "version_policy: must be"),
        ({"version_policy": {"specific": {"versions": [7]}}}, r"versions \['7'\] are not among"),
        ({"version_policy": {"newest": {}}}, "version_policy: must be"),
        ({"version_policy": "all"}, "version_policy: must be"),
        ({"version_policy": {"all": {}, "latest": {"num_versions": 1}}}, "version_policy: must be"),
        ({"versions": ["v1"]}, "non-negative integer"),
        ({"versions": ["01"]}, "non-negative integer"),
        ({"versions": [-1]}, "non-negative integer"),
        ({"versions": [True]}, "non-negative integer"),
        ({"versions": []}, "non-empty list"),
        ({"versions": "1"}, "non-empty list"),
        ({"default_version": "2"}, "default_version 2 is not served"),
    ],
)
def test_bad_versions_and_policies_are_config_errors(tmp_path: Path, config: dict[str, Any], error: str) -> None:
    with pytest.raises(ModelConfigError, match=error):
        load_metadata(write_model(tmp_path, **config))


def test_a_served_version_without_its_folder_is_refused_unless_synthetic(tmp_path: Path) -> None:
    folder = write_model(tmp_path, ("1",), versions=["1", "2"])
    with pytest.raises(ModelConfigError, match=r"versions \['2'\] have no folder"):
        load_repository(tmp_path)
    set_config(
        folder,
        description="synthetic weights from seed 1",
        synthetic={"seed": 1, "arrays": {"w": [2, 2]}},
    )
    assert load_repository(tmp_path)["m"].versions == ("1", "2")


# -- traffic split ----------------------------------------------------------------------------


def test_the_split_sends_unnamed_requests_by_key(tmp_path: Path) -> None:
    meta = load_metadata(write_model(tmp_path, ("1", "2", "3"), traffic_split={"1": 90, "2": 10, "3": 0}))
    chosen = {meta.version_for(f"k{i}") for i in range(2000)}
    assert chosen == {"1", "2"} and meta.unnamed_versions() == ("1", "2")
    assert meta.version_for("k7") == meta.version_for("k7")
    assert meta.resolve_version("3") == "3"  # a version named explicitly is served whatever its share


def test_without_a_split_unnamed_requests_get_the_default(tmp_path: Path) -> None:
    meta = load_metadata(write_model(tmp_path, ("1", "2"), default_version="1"))
    assert {meta.version_for(f"k{i}") for i in range(100)} == {"1"} and meta.unnamed_versions() == ("1",)


@pytest.mark.parametrize(
    ("split", "error"),
    [
        ({"3": 10}, "version 3 is not served"),
        ({"1": -1}, "must be a number >= 0"),
        ({"1": "90"}, "must be a number >= 0"),
        ({"1": True}, "must be a number >= 0"),
        ({"1": float("inf")}, "must be a number >= 0"),
        ({"1": 10**400}, "must be a number >= 0"),
        ({"1": 0, "2": 0}, "some version needs a weight > 0"),
        ({"one": 1}, "non-negative integer"),
        ({}, "must be an object"),
        ([90, 10], "must be an object"),
    ],
)
def test_a_malformed_split_is_a_config_error(tmp_path: Path, split: Any, error: str) -> None:
    with pytest.raises(ModelConfigError, match=error):
        load_metadata(write_model(tmp_path, ("1", "2"), traffic_split=split))


def test_a_gateway_does_not_start_on_a_malformed_split(tmp_path: Path) -> None:
    write_model(tmp_path, ("1", "2"), traffic_split={"1": "ninety"})
    with pytest.raises(ModelConfigError, match="traffic_split: the weight of version 1 must be a number"):
        Gateway(Settings(model_repository=str(tmp_path)))


def test_a_split_and_a_default_version_are_not_given_together(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="traffic_split or default_version"):
        load_metadata(write_model(tmp_path, ("1", "2"), traffic_split={"1": 1}, default_version="1"))


# -- reloading: the catalog -------------------------------------------------------------------


def test_the_catalog_sees_a_new_version_folder_and_a_new_split(tmp_path: Path) -> None:
    folder = write_model(tmp_path, ("1",))
    catalog = Catalog(tmp_path)
    assert catalog.refresh() is False  # nothing changed
    add_version(folder, "2")
    assert catalog.refresh() is True and catalog.models["m"].versions == ("1", "2")
    set_config(folder, traffic_split={"1": 50, "2": 50})
    assert catalog.refresh() is True and catalog.models["m"].traffic_split == {"1": 50.0, "2": 50.0}


def test_the_catalog_rescans_when_read_after_its_poll_interval(tmp_path: Path) -> None:
    folder = write_model(tmp_path, ("1",))
    clock = FakeClock()
    catalog = Catalog(tmp_path, poll_ms=1000, clock=clock)
    add_version(folder, "2")
    clock.now += 0.999
    assert catalog.models["m"].versions == ("1",)
    clock.now += 0.001
    assert catalog.models["m"].versions == ("1", "2")


def test_a_reload_that_does_not_load_keeps_what_was_served_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = write_model(tmp_path, ("1", "2"))
    catalog = Catalog(tmp_path)
    before = catalog.models
    set_config(folder, traffic_split={"1": 90, "3": 10})
    with caplog.at_level(logging.ERROR, logger="tasks.metadata"):
        assert catalog.refresh() is False and catalog.refresh() is False
    assert catalog.models is before
    assert [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()] == [
        f"model repository {tmp_path}: reload refused, serving what was loaded before:"
        f" {folder / 'config.json'} traffic_split: version 3 is not served; served: ['1', '2']"
    ]
    set_config(folder, traffic_split={"1": 90, "2": 10})  # fixed: taken at the next rescan
    assert catalog.refresh() is True and catalog.models["m"].traffic_split == {"1": 90.0, "2": 10.0}


@pytest.mark.parametrize(
    "change",
    [
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]},
        {"layers": [{"type": "dense", "weight": "w"}, {"type": "softmax"}]},
        {"batching": {"max_batch_size": 4}},
    ],
)
def test_a_reload_may_not_change_what_loaded_versions_compute(tmp_path: Path, change: dict[str, Any]) -> None:
    folder = write_model(tmp_path, ("1",))
    catalog = Catalog(tmp_path)
    set_config(folder, **change)
    assert catalog.refresh() is False and catalog.models["m"].config.keys() == {"inputs", "outputs", "layers"}
    assert catalog.models["m"].config["inputs"][0]["shape"] == [-1, 2]


def test_the_versions_of_a_sharded_model_change_only_with_a_restart(tmp_path: Path) -> None:
    folder = write_model(
        tmp_path,
        (),
        versions=["1"],
        inputs=[{"name": "id", "datatype": "INT64", "shape": [-1]}],
        description="synthetic",
        synthetic={"seed": 1, "arrays": {}, "tables": {"t": {"dim": 2, "seed": 2}}},
        sharding={"table": "t", "by": "id", "rows": 10},
    )
    catalog = Catalog(tmp_path)
    set_config(folder, versions=["1", "2"])
    assert catalog.refresh() is False and catalog.models["m"].versions == ("1",)


def test_models_appear_and_disappear_with_their_folders(tmp_path: Path) -> None:
    write_model(tmp_path, ("1",))
    catalog = Catalog(tmp_path)
    write_model(tmp_path, ("1",), name="n")
    assert catalog.refresh() is True and sorted(catalog.models) == ["m", "n"]
    shutil.rmtree(tmp_path / "n")
    assert catalog.refresh() is True and sorted(catalog.models) == ["m"]


# -- reloading: the worker's repository -------------------------------------------------------


def answer(repository: Repository, version: str | None = None) -> float:
    """What version ``version`` computes: V for version V."""
    return float(repository.get("m", version).forward(X)["y"][0, 0])


def test_a_new_version_is_loaded_at_the_rescan_and_reported(tmp_path: Path) -> None:
    folder = write_model(tmp_path, ("1",))
    repository = Repository(tmp_path)
    repository.load_all()
    assert repository.served() == {"m": ["1"]}
    add_version(folder, "2")
    assert repository.refresh() is True
    assert repository.served() == {"m": ["1", "2"]} and answer(repository, "2") == 2.0


def test_a_version_a_gateway_saw_first_is_found_by_rescanning_on_the_miss(tmp_path: Path) -> None:
    folder = write_model(tmp_path, ("1",))
    repository = Repository(tmp_path)
    repository.load_all()
    add_version(folder, "2")
    assert answer(repository, "2") == 2.0
    with pytest.raises(UnknownModelError, match="no version '3'"):
        repository.get("m", "3")


def test_a_removed_version_is_answered_for_the_grace_period_then_dropped(tmp_path: Path) -> None:
    folder = write_model(tmp_path, ("1", "2"))
    clock = FakeClock()
    repository = Repository(tmp_path, grace_s=15.0, clock=clock)
    repository.load_all()
    shutil.rmtree(folder / "2")
    assert repository.refresh() is True and repository.served() == {"m": ["1"]}
    clock.now += 14.9
    assert repository.refresh() is False and answer(repository, "2") == 2.0  # a late gateway is still answered
    assert answer(repository) == 1.0  # the default moved on at once
    clock.now += 0.1
    repository.refresh()
    with pytest.raises(UnknownModelError, match=r"no version '2'; known: \['1'\]"):
        repository.get("m", "2")


def test_a_version_back_within_its_grace_is_served_again_without_a_load(tmp_path: Path) -> None:
    folder = write_model(tmp_path, ("1",), versions=["1", "2"])
    add_version(folder, "2")
    clock = FakeClock()
    repository = Repository(tmp_path, grace_s=15.0, clock=clock)
    model = repository.get("m", "2")
    set_config(folder, versions=["1"])
    assert repository.refresh() is True
    set_config(folder, versions=["1", "2"])
    assert repository.refresh() is True
    clock.now += 60
    repository.refresh()
    assert repository.get("m", "2") is model and repository.served() == {"m": ["1", "2"]}


def test_a_version_whose_weights_do_not_load_changes_nothing(tmp_path: Path) -> None:
    folder = write_model(tmp_path, ("1",))
    repository = Repository(tmp_path)
    repository.load_all()
    (folder / "2").mkdir()
    (folder / "2" / "weights.npz").write_bytes(b"half a file")
    assert repository.refresh() is False
    assert repository.metadata("m").versions == ("1",) and repository.served() == {"m": ["1"]}
    with pytest.raises(UnknownModelError, match="no version '2'"):
        repository.get("m", "2")
