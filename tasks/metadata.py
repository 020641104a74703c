"""Model metadata from ``models/<name>/config.json``: what a model takes and gives.

The gateway validates requests with this alone (it never loads weights); the worker's
repository adds the weights. Pure standard library.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.contract import DATATYPES


class ModelConfigError(ValueError):
    """A config.json that cannot be served; raised at start-up, never per request."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: ``shape[0] == -1`` is the batch dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def row_size(self) -> int:
        size = 1
        for dim in self.row_shape:
            size *= dim
        return size

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Sharding:
    """A table split over the workers by the ring: row ``i`` lives with the holders of id ``i``.

    ``by`` names the INT64 input (one id per row) whose values pick the table's rows;
    ``replicas`` workers hold each row (its owner and the next ones clockwise).
    """

    table: str
    by: str
    rows: int
    replicas: int = 1


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    default_version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int | None  # None: the server-wide default
    max_delay_ms: int | None
    batch_idle_ms: float | None
    config: dict[str, Any]  # the whole file, for the engine
    path: Path
    sharding: Sharding | None = None

    def resolve_version(self, version: str | None) -> str | None:
        """The version to serve, or None when it does not exist."""
        if version is None or version == "":
            return self.default_version
        return version if version in self.versions else None


def _tensor(raw: Any, where: str) -> TensorSpec:
    try:
        spec = TensorSpec(str(raw["name"]), str(raw["datatype"]), tuple(int(d) for d in raw["shape"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelConfigError(f"{where}: needs name, datatype and shape ({exc})") from None
    if spec.datatype not in DATATYPES:
        raise ModelConfigError(f"{where}: datatype {spec.datatype} is not supported")
    if not spec.shape or spec.shape[0] != -1 or any(d <= 0 for d in spec.shape[1:]):
        raise ModelConfigError(f"{where}: shape must be [-1, positive dims...], got {list(spec.shape)}")
    return spec


def load_metadata(model_dir: Path) -> ModelMetadata:
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"{path}: {exc}") from None
    name = config.get("name", model_dir.name)
    if name != model_dir.name:
        raise ModelConfigError(f"{path}: name {name!r} differs from its folder {model_dir.name!r}")
    versions = tuple(str(v) for v in config.get("versions", ["1"]))
    if not versions:
        raise ModelConfigError(f"{path}: versions is empty")
    default_version = str(config.get("default_version", versions[-1]))
    if default_version not in versions:
        raise ModelConfigError(f"{path}: default_version {default_version} is not in {versions}")
    batching = config.get("batching", {})
    inputs = tuple(_tensor(t, f"{path} input") for t in config.get("inputs", []))
    return ModelMetadata(
        name=name,
        versions=versions,
        default_version=default_version,
        inputs=inputs,
        outputs=tuple(_tensor(t, f"{path} output") for t in config.get("outputs", [])),
        max_batch_size=batching.get("max_batch_size"),
        max_delay_ms=batching.get("max_delay_ms"),
        batch_idle_ms=batching.get("idle_ms"),
        config=config,
        path=model_dir,
        sharding=_sharding(config.get("sharding"), inputs, f"{path} sharding"),
    )


def _sharding(raw: Any, inputs: tuple[TensorSpec, ...], where: str) -> Sharding | None:
    if raw is None:
        return None
    try:
        sharding = Sharding(str(raw["table"]), str(raw["by"]), raw["rows"], raw.get("replicas", 1))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ModelConfigError(f"{where}: needs table, by, rows and optionally replicas ({exc})") from None
    if type(sharding.rows) is not int or type(sharding.replicas) is not int:
        raise ModelConfigError(f"{where}: rows and replicas must be integers")
    by = [spec for spec in inputs if spec.name == sharding.by]
    if not by or by[0].datatype != "INT64" or by[0].shape != (-1,):
        raise ModelConfigError(f"{where}: 'by' must name an INT64 input of shape [-1], got {sharding.by!r}")
    if sharding.rows < 1 or sharding.replicas < 1:
        raise ModelConfigError(f"{where}: rows and replicas must be >= 1")
    return sharding


def load_repository(root: str | Path) -> dict[str, ModelMetadata]:
    """All models under ``root`` (each folder holding a config.json), by name."""
    root = Path(root)
    if not root.is_dir():
        raise ModelConfigError(f"model repository {root} is not a directory")
    models = {d.name: load_metadata(d) for d in sorted(root.iterdir()) if (d / "config.json").is_file()}
    if not models:
        raise ModelConfigError(f"model repository {root} holds no model")
    return models
