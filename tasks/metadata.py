"""Model metadata from ``models/<name>/config.json``: what a model takes and gives, in which versions.

The gateway validates requests with this alone (it never loads weights); the worker's
repository adds the weights. Pure standard library (and :mod:`hashing.split`).

Versions, as Triton spells them (version names are non-negative integers, ``"1"``):

* ``"versions"``: the candidates, default the model's numeric folders (``["1"]`` if none);
* ``"version_policy"``: which candidates are served, ``{"all": {}}`` (default),
  ``{"latest": {"num_versions": N}}`` or ``{"specific": {"versions": [1, 3]}}``;
* ``"traffic_split"``: ``{"1": 90, "2": 10}``, weights of served versions for requests that
  name none, sticky per routing key (:func:`hashing.split.choose_version`); or else
  ``"default_version"`` (default: the highest served version) takes them all.

A :class:`Catalog` holds a repository's models and rescans it when it changes on disk.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hashing.split import choose_version
from tasks.contract import DATATYPES

log = logging.getLogger(__name__)

VERSION_NAME = re.compile(r"0|[1-9][0-9]{0,17}")  # a non-negative integer, spelled once (Triton's folder names)
# What a reload may change in a served model's config.json; anything else changes what its
# loaded versions compute, so it needs a restart.
RELOADABLE_KEYS = frozenset({"versions", "version_policy", "default_version", "traffic_split", "description"})


class ModelConfigError(ValueError):
    """A config.json that cannot be served; raised at start-up (or a reload is refused), never per request."""


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
    traffic_split: Mapping[str, float] | None = None  # served version -> weight, for requests naming none
    response_cache: bool = False  # the gateways may cache its answers (app/cache.py)

    def resolve_version(self, version: str | None) -> str | None:
        """The version to serve, or None when it does not exist."""
        if version is None or version == "":
            return self.default_version
        return version if version in self.versions else None

    def version_for(self, key: str) -> str:
        """The version a request that names none gets: the split's choice for its routing key, or the default."""
        if self.traffic_split is None:
            return self.default_version
        return choose_version(key, self.traffic_split)

    def unnamed_versions(self) -> tuple[str, ...]:
        """Every version that requests naming none may be sent to."""
        if self.traffic_split is None:
            return (self.default_version,)
        return tuple(v for v in self.versions if self.traffic_split.get(v, 0) > 0)


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
    if not isinstance(config, dict):
        raise ModelConfigError(f"{path}: must hold a JSON object")
    name = config.get("name", model_dir.name)
    if name != model_dir.name:
        raise ModelConfigError(f"{path}: name {name!r} differs from its folder {model_dir.name!r}")
    versions = _served_versions(config, model_dir, str(path))
    traffic_split = _traffic_split(config.get("traffic_split"), versions, f"{path} traffic_split")
    if traffic_split is not None and "default_version" in config:
        raise ModelConfigError(f"{path}: give traffic_split or default_version, not both")
    default_version = _version_name(config.get("default_version", versions[-1]), f"{path} default_version")
    if default_version not in versions:
        raise ModelConfigError(f"{path}: default_version {default_version} is not served; served: {list(versions)}")
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
        traffic_split=traffic_split,
        response_cache=_response_cache(config, str(path)),
    )


def _version_name(raw: Any, where: str) -> str:
    """A version as the API spells it: ``"3"`` (config files may also write the number 3)."""
    name = str(raw) if type(raw) is int else raw
    if not isinstance(name, str) or not VERSION_NAME.fullmatch(name):
        raise ModelConfigError(f'{where}: a version is a non-negative integer such as "1", got {raw!r}')
    return name


def _served_versions(config: dict[str, Any], model_dir: Path, where: str) -> tuple[str, ...]:
    """The candidates (``versions``, else the numeric folders, else ``["1"]``) that the policy keeps, ascending."""
    raw = config.get("versions")
    if raw is None:
        folders = [d.name for d in model_dir.iterdir() if d.is_dir() and VERSION_NAME.fullmatch(d.name)]
        raw = folders or ["1"]
    if not isinstance(raw, list) or not raw:
        raise ModelConfigError(f"{where}: versions must be a non-empty list, got {raw!r}")
    candidates = sorted({_version_name(v, f"{where} versions") for v in raw}, key=int)
    return _apply_policy(config.get("version_policy", {"all": {}}), candidates, f"{where} version_policy")


def _apply_policy(policy: Any, candidates: list[str], where: str) -> tuple[str, ...]:
    """Triton's version policy over ``candidates`` (ascending)."""
    kind, spec = next(iter(policy.items())) if isinstance(policy, dict) and len(policy) == 1 else ("", None)
    if kind == "all" and spec == {}:
        return tuple(candidates)
    if kind == "latest" and isinstance(spec, dict) and set(spec) == {"num_versions"}:
        n = spec["num_versions"]
        if type(n) is int and n >= 1:
            return tuple(candidates[-n:])
    if kind == "specific" and isinstance(spec, dict) and set(spec) == {"versions"}:
        listed = spec["versions"]
        wanted = {_version_name(v, where) for v in listed} if isinstance(listed, list) else set()
        if wanted:
            missing = sorted(wanted - set(candidates), key=int)
            if missing:
                raise ModelConfigError(f"{where}: versions {missing} are not among the versions {candidates}")
            return tuple(v for v in candidates if v in wanted)
    raise ModelConfigError(
        f'{where}: must be {{"all": {{}}}}, {{"latest": {{"num_versions": N >= 1}}}} or'
        f' {{"specific": {{"versions": [1, ...]}}}}, got {json.dumps(policy)}'
    )


def _traffic_split(raw: Any, versions: tuple[str, ...], where: str) -> dict[str, float] | None:
    """Version -> weight: weights are finite numbers >= 0 of served versions, and some weight is > 0."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise ModelConfigError(f'{where}: must be an object of version -> weight, e.g. {{"1": 90, "2": 10}}')
    split: dict[str, float] = {}
    for version, weight in raw.items():
        name = _version_name(version, where)
        if name not in versions:
            raise ModelConfigError(f"{where}: version {name} is not served; served: {list(versions)}")
        try:
            value = float(weight) if type(weight) in (int, float) else math.nan
        except OverflowError:  # an integer beyond any float
            value = math.nan
        if not (math.isfinite(value) and value >= 0):
            raise ModelConfigError(f"{where}: the weight of version {name} must be a number >= 0, got {weight!r}")
        split[name] = value
    if not any(split.values()):
        raise ModelConfigError(f"{where}: some version needs a weight > 0")
    return split


def _response_cache(config: dict[str, Any], where: str) -> bool:
    """``"response_cache"``, by default ``"deterministic"`` (false): only a model whose answer is a function
    of its inputs alone may have it cached."""
    deterministic = config.get("deterministic", False)
    cached = config.get("response_cache", deterministic)
    if type(deterministic) is not bool or type(cached) is not bool:
        raise ModelConfigError(f"{where}: deterministic and response_cache must be true or false")
    return cached


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
    """All models under ``root`` (each folder holding a config.json), by name.

    A served version of a model whose weights are files must have its folder: a config that
    names a version before its folder is in place is refused rather than half served.
    """
    root = Path(root)
    if not root.is_dir():
        raise ModelConfigError(f"model repository {root} is not a directory")
    models = {d.name: load_metadata(d) for d in sorted(root.iterdir()) if (d / "config.json").is_file()}
    if not models:
        raise ModelConfigError(f"model repository {root} holds no model")
    for meta in models.values():
        missing = [v for v in meta.versions if "synthetic" not in meta.config and not (meta.path / v).is_dir()]
        if missing:
            raise ModelConfigError(f"model {meta.name}: versions {missing} have no folder in {meta.path}")
    return models


def check_reload(old: Mapping[str, ModelMetadata], new: Mapping[str, ModelMetadata]) -> None:
    """Raise ModelConfigError if ``new`` changes what a served version computes (that needs a restart).

    A reload may add and remove models and versions and change the split; it may not change a
    model's inputs, outputs, layers, weights source or batching, since its loaded versions
    keep them. Sharded tables are followed by a keeper that a restart builds, so their
    (model, version)s stay as they are.
    """
    for name in sorted(old.keys() & new.keys()):
        before, after = (
            {k: v for k, v in meta.config.items() if k not in RELOADABLE_KEYS} for meta in (old[name], new[name])
        )
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        if changed:
            raise ModelConfigError(f"model {name}: a reload may not change {changed}; restart to apply it")

    def sharded(models: Mapping[str, ModelMetadata]) -> set[tuple[str, str]]:
        return {(m.name, v) for m in models.values() if m.sharding is not None for v in m.versions}

    if sharded(old) != sharded(new):
        raise ModelConfigError("the versions of sharded models change only with a restart")


def _fingerprint(root: Path) -> tuple[tuple[str, bytes, tuple[str, ...]], ...]:
    """Each model folder's config.json bytes and subfolder names: what a reload reads, cheaply compared.

    An unreadable repository is empty here (its reload then fails with the reason, once).
    """
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return ()
    seen = []
    for entry in entries:
        try:
            config = Path(entry.path, "config.json").read_bytes()
            folders = tuple(sorted(e.name for e in os.scandir(entry.path) if e.is_dir()))
        except OSError:  # not a model folder, or one being removed
            continue
        seen.append((entry.name, config, folders))
    return tuple(seen)


class Catalog:
    """A repository's models as last read; :meth:`refresh` reads them again if the repository changed.

    Gateways and workers each hold one and rescan on their own (``poll_ms``: reading
    :attr:`models` rescans when that long has passed; 0: only :meth:`refresh` does). A
    repository that no longer loads, or a reload :func:`check_reload` refuses, keeps the
    models as they were, logged once per state of the files; nothing is retried until the
    files change again. Safe to use from several threads.
    """

    def __init__(self, root: str | Path, poll_ms: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.root = Path(root)
        self._poll_s = poll_ms / 1000
        self._clock = clock
        self._lock = threading.Lock()
        self._seen = _fingerprint(self.root)
        self._models = load_repository(self.root)
        self._scanned_at = clock()

    @property
    def models(self) -> dict[str, ModelMetadata]:
        """Model name -> metadata; replaced as a whole on a reload, never changed in place."""
        if self._poll_s > 0 and self._clock() - self._scanned_at >= self._poll_s:
            self.refresh()
        return self._models

    def refresh(self, accept: Callable[[dict[str, ModelMetadata]], None] | None = None) -> bool:
        """Read the repository again if its files changed; True if the models changed.

        ``accept(models)`` runs before new models replace the old ones (a worker loads their
        weights there); if it raises, the old models stay. A caller that finds another thread
        rescanning returns at once: that thread's answer will do.
        """
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._scanned_at = self._clock()
            seen = _fingerprint(self.root)
            if seen == self._seen:
                return False
            self._seen = seen
            try:
                models = load_repository(self.root)
                check_reload(self._models, models)
                if models == self._models:
                    return False
                if accept is not None:
                    accept(models)
            except Exception as exc:  # whatever went wrong, what is served stays as it was
                log.error("model repository %s: reload refused, serving what was loaded before: %s", self.root, exc)
                return False
            log.info("model repository %s: reloaded; %s", self.root, _describe(models))
            self._models = models
            return True
        finally:
            self._lock.release()


def _describe(models: Mapping[str, ModelMetadata]) -> str:
    """One log line's worth: each model's served versions and split."""
    parts = []
    for meta in models.values():
        split = "" if meta.traffic_split is None else f" split {dict(meta.traffic_split)}"
        parts.append(f"{meta.name} {list(meta.versions)}{split}")
    return ", ".join(parts)
