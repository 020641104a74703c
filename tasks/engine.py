"""The numpy forward pass: a model's ``layers`` from config.json, run on one whole batch.

A model is a list of steps over named tensors. The model's inputs are named as declared;
each layer reads ``"input"`` (default: the previous layer's result; the first layer reads
the model's first input) and writes ``"output"`` (default: an anonymous name, except that
the last layer of a single-output model writes that output). Every declared output must be
written by some layer, so a multi-output model names its outputs on the layers that make them.

Layers::

    {"type": "dense", "weight": "w1", "bias": "b1"}        x @ W + b   (bias optional)
    {"type": "activation", "function": "relu"}             relu | tanh | sigmoid
    {"type": "softmax"}                                     over the last axis
    {"type": "embedding", "table": "items"}                rows of a table by integer ids;
                                                            ids [n, k] give [n, k * dim]
    {"type": "concat", "inputs": ["a", "b"]}               along the last axis

Arithmetic is done in float32 unless some output is FP64; outputs leave in their declared
datatype. Config mistakes raise :class:`ModelConfigError` when the model is built (worker
start-up), never per request.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from tasks.contract import DATATYPES
from tasks.metadata import ModelConfigError, ModelMetadata


class InputError(ValueError):
    """A batch the model cannot take (missing input, wrong row shape, id out of range)."""


class EngineError(RuntimeError):
    """The model broke its own contract, e.g. returned a different number of rows."""


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; shifting by the row maximum keeps exp() from overflowing.

    The shift itself may overflow to -inf for rows spanning most of the float range; exp()
    turns that into 0, which is the right answer, so those warnings are silenced.
    """
    with np.errstate(over="ignore", under="ignore"):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # = 1 / (1 + e^-x) without overflow, keeps the dtype


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": partial(np.maximum, 0),
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
}


def _dense(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    y = x.astype(weight.dtype, copy=False) @ weight
    return y if bias is None else y + bias


def _embedding(ids: np.ndarray, table: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if not np.issubdtype(ids.dtype, np.integer):
        raise EngineError(f"embedding ids must be integers, got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise InputError(f"embedding id out of range [0, {table.shape[0]})")
    rows = np.asarray(table[ids], dtype=dtype)  # fancy indexing copies only these rows of a memmap
    return rows.reshape(ids.shape[0], math.prod(ids.shape[1:]) * table.shape[1])


def _concat(*parts: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.concatenate([p.astype(dtype, copy=False) for p in parts], axis=-1)


@dataclass(frozen=True)
class _Step:
    sources: tuple[str, ...]  # named tensors read, in argument order
    target: str  # named tensor written
    apply: Callable[..., np.ndarray]


def _array(weights: Mapping[str, np.ndarray], layer: Mapping[str, Any], key: str, where: str) -> np.ndarray:
    name = str(layer.get(key))
    if name not in weights:
        raise ModelConfigError(f"{where}: {key} {name!r} is not among the weights {sorted(weights)}")
    return weights[name]


def _build_step(
    layer: Mapping[str, Any],
    previous: str,
    target: str,
    weights: Mapping[str, np.ndarray],
    dtype: np.dtype,
    where: str,
) -> _Step:
    kind = layer.get("type")
    source = str(layer.get("input", previous))
    if kind == "dense":
        weight = np.ascontiguousarray(_array(weights, layer, "weight", where), dtype=dtype)
        bias = np.asarray(_array(weights, layer, "bias", where), dtype=dtype) if "bias" in layer else None
        if weight.ndim != 2 or (bias is not None and bias.shape != weight.shape[1:]):
            shapes = f"{weight.shape} and {None if bias is None else bias.shape}"
            raise ModelConfigError(f"{where}: weight must be 2-D [in, out] and bias [out], got {shapes}")
        return _Step((source,), target, partial(_dense, weight=weight, bias=bias))
    if kind == "activation":
        function = layer.get("function")
        if function not in ACTIVATIONS:
            raise ModelConfigError(f"{where}: activation {function!r} is not one of {sorted(ACTIVATIONS)}")
        return _Step((source,), target, ACTIVATIONS[function])
    if kind == "softmax":
        return _Step((source,), target, softmax)
    if kind == "embedding":
        table = _array(weights, layer, "table", where)  # left as loaded: possibly a read-only memmap
        if table.ndim != 2:
            raise ModelConfigError(f"{where}: embedding table must be 2-D [rows, dim], got {table.shape}")
        return _Step((source,), target, partial(_embedding, table=table, dtype=dtype))
    if kind == "concat":
        sources = layer.get("inputs")
        if not isinstance(sources, list) or len(sources) < 2:
            raise ModelConfigError(f"{where}: concat needs a list of at least two 'inputs'")
        return _Step(tuple(str(s) for s in sources), target, partial(_concat, dtype=dtype))
    raise ModelConfigError(f"{where}: unknown layer type {kind!r}")


class Model:
    """One version of one model with its weights, ready to run batches.

    ``weights`` maps the array names the layers reference to arrays (the repository loads
    them); dense weights are cast to the compute dtype, embedding tables are kept as given.
    """

    def __init__(self, metadata: ModelMetadata, version: str, weights: Mapping[str, np.ndarray]) -> None:
        self.metadata = metadata
        self.version = version
        outputs = metadata.outputs
        if not metadata.inputs or not outputs:
            raise ModelConfigError(f"model {metadata.name}: needs at least one input and one output")
        fp64 = any(spec.datatype == "FP64" for spec in outputs)
        self.compute_dtype: np.dtype = np.dtype(np.float64 if fp64 else np.float32)
        layers = metadata.config.get("layers") or []
        if not layers:
            raise ModelConfigError(f"model {metadata.name}: config.json declares no layers")
        known = {spec.name for spec in metadata.inputs}
        previous = metadata.inputs[0].name
        self._steps: list[_Step] = []
        for i, layer in enumerate(layers):
            where = f"model {metadata.name} layer {i}"
            last_of_single = i == len(layers) - 1 and len(outputs) == 1
            target = str(layer.get("output", outputs[0].name if last_of_single else f"_layer{i}"))
            step = _build_step(layer, previous, target, weights, self.compute_dtype, where)
            missing = [s for s in step.sources if s not in known]
            if missing:
                raise ModelConfigError(f"{where}: reads {missing}, which no input or earlier layer makes")
            self._steps.append(step)
            known.add(target)
            previous = target
        unmade = [spec.name for spec in outputs if spec.name not in known]
        if unmade:
            raise ModelConfigError(f"model {metadata.name}: no layer writes the outputs {unmade}")
        self._dry_run()

    def _dry_run(self) -> None:
        """One all-zeros row through every layer, so that mismatched shapes fail at start-up."""
        zeros = {
            spec.name: np.zeros((1, *spec.row_shape), dtype=DATATYPES[spec.datatype].numpy)
            for spec in self.metadata.inputs
        }
        try:
            self.forward(zeros)
        except (ValueError, EngineError) as exc:
            raise ModelConfigError(f"model {self.metadata.name}: {exc}") from None

    def __repr__(self) -> str:
        return f"Model({self.metadata.name!r}, version={self.version!r})"

    def forward(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch (every input holds the same number of rows) in one numpy pass.

        Inputs are cast to their declared datatype; outputs come back in theirs, one row
        per input row (checked).
        """
        values = self._cast_inputs(inputs)
        rows = next(iter(values.values())).shape[0]
        for step in self._steps:
            values[step.target] = step.apply(*(values[s] for s in step.sources))
        result = {}
        for spec in self.metadata.outputs:
            out = np.asarray(values[spec.name], dtype=DATATYPES[spec.datatype].numpy)
            if out.shape[0] != rows or out.shape[1:] != spec.row_shape:
                raise EngineError(
                    f"model {self.metadata.name} output {spec.name}: shape {out.shape}, "
                    f"expected {(rows, *spec.row_shape)}"
                )
            result[spec.name] = out
        return result

    def _cast_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        declared = {spec.name: spec for spec in self.metadata.inputs}
        unexpected = sorted(set(inputs) - set(declared))
        if unexpected:
            raise InputError(f"model {self.metadata.name} has no inputs {unexpected}")
        values: dict[str, np.ndarray] = {}
        for name, spec in declared.items():
            if name not in inputs:
                raise InputError(f"model {self.metadata.name} needs input {name!r}")
            x = np.asarray(inputs[name], dtype=DATATYPES[spec.datatype].numpy)
            if x.ndim != len(spec.shape) or x.shape[1:] != spec.row_shape:
                raise InputError(f"input {name!r}: shape {x.shape} does not match {list(spec.shape)}")
            values[name] = x
        if len({x.shape[0] for x in values.values()}) > 1:
            raise InputError(f"inputs differ in batch size: { {n: x.shape[0] for n, x in values.items()} }")
        return values
