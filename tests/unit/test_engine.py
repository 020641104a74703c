"""The numpy engine and the repository, on small models written into tmp_path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from tasks import repository
from tasks.engine import InputError, Model, softmax
from tasks.metadata import ModelConfigError
from tasks.repository import SYNTHETIC_FOLDER, Repository, UnknownModelError, load_weights, synthetic_weights

MLP_LAYERS = [
    {"type": "dense", "weight": "w1", "bias": "b1"},
    {"type": "activation", "function": "relu"},
    {"type": "dense", "weight": "w2", "bias": "b2"},
    {"type": "softmax"},
]


def write_model(root: Path, name: str, config: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
    """A model folder: config.json, and version 1's arrays in weights.npz."""
    folder = root / name
    (folder / "1").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"name": name, "versions": ["1"], **config}))
    if arrays is not None:
        np.savez(folder / "1" / "weights.npz", **arrays)


def tensor(name: str, datatype: str, width: int) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": [-1, width]}


@pytest.fixture
def mlp_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w1": rng.standard_normal((6, 8)).astype(np.float32),
        "b1": rng.standard_normal(8).astype(np.float32),
        "w2": rng.standard_normal((8, 4)).astype(np.float32),
        "b2": rng.standard_normal(4).astype(np.float32),
    }


@pytest.fixture
def mlp(tmp_path: Path, mlp_weights: dict[str, np.ndarray]) -> Model:
    config = {"inputs": [tensor("x", "FP32", 6)], "outputs": [tensor("p", "FP32", 4)], "layers": MLP_LAYERS}
    write_model(tmp_path, "mlp", config, mlp_weights)
    return Repository(tmp_path).get("mlp", "1")


def reference_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_dense_relu_softmax_matches_plain_numpy(mlp: Model, mlp_weights: dict[str, np.ndarray]) -> None:
    x = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    w = {k: v.astype(np.float64) for k, v in mlp_weights.items()}
    expected = reference_softmax(np.maximum(x @ w["w1"] + w["b1"], 0) @ w["w2"] + w["b2"])

    out = mlp.forward({"x": x})

    assert list(out) == ["p"]
    assert out["p"].dtype == np.float32 and out["p"].shape == (5, 4)
    np.testing.assert_allclose(out["p"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["p"].sum(axis=1), 1.0, rtol=1e-6)


def test_batch_of_one_equals_rows_of_a_batch_of_32(mlp: Model) -> None:
    x = np.random.default_rng(2).standard_normal((32, 6)).astype(np.float32)
    batch = mlp.forward({"x": x})["p"]
    one_by_one = np.concatenate([mlp.forward({"x": x[i : i + 1]})["p"] for i in range(32)])
    assert np.allclose(batch, one_by_one, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.float16])
def test_inputs_of_another_dtype_are_cast(mlp: Model, dtype: type) -> None:
    x = np.arange(12).reshape(2, 6).astype(dtype)
    out = mlp.forward({"x": x})["p"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, mlp.forward({"x": x.astype(np.float32)})["p"])


def test_bad_inputs_are_rejected(mlp: Model) -> None:
    with pytest.raises(InputError, match="needs input"):
        mlp.forward({})
    with pytest.raises(InputError, match="has no inputs"):
        mlp.forward({"x": np.zeros((1, 6)), "y": np.zeros((1, 6))})
    with pytest.raises(InputError, match="shape"):
        mlp.forward({"x": np.zeros((1, 5))})
    with pytest.raises(InputError, match="shape"):
        mlp.forward({"x": np.zeros(6)})


def test_embedding_and_concat_match_plain_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    table = rng.standard_normal((10, 3)).astype(np.float32)
    w = rng.standard_normal((2 * 3 + 4, 2)).astype(np.float32)
    config = {
        "inputs": [tensor("features", "FP32", 4), tensor("items", "INT64", 2)],
        "outputs": [tensor("score", "FP32", 2)],
        "layers": [
            {"type": "embedding", "table": "items_table", "input": "items", "output": "item_vectors"},
            {"type": "concat", "inputs": ["item_vectors", "features"]},
            {"type": "dense", "weight": "w"},
            {"type": "activation", "function": "sigmoid"},
        ],
    }
    write_model(tmp_path, "ranker", config, {"w": w})
    np.save(tmp_path / "ranker" / "1" / "items_table.npy", table)
    assert isinstance(load_weights(Repository(tmp_path).metadata("ranker"), "1")["items_table"], np.memmap)
    model = Repository(tmp_path).get("ranker")
    features = rng.standard_normal((3, 4)).astype(np.float32)
    items = np.array([[0, 9], [4, 4], [7, 1]])

    out = model.forward({"features": features, "items": items.astype(np.int32)})["score"]

    joined = np.concatenate([table[items[:, 0]], table[items[:, 1]], features], axis=1).astype(np.float64)
    expected = 1 / (1 + np.exp(-(joined @ w)))
    assert out.dtype == np.float32 and out.shape == (3, 2)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    empty = model.forward({"features": features[:0], "items": items[:0]})["score"]
    assert empty.shape == (0, 2) and empty.dtype == np.float32
    with pytest.raises(InputError, match="out of range"):
        model.forward({"features": features[:1], "items": np.array([[0, 10]])})
    with pytest.raises(InputError, match="batch size"):
        model.forward({"features": features, "items": items[:2]})


def test_multi_output_model_names_its_outputs_on_layers(tmp_path: Path, mlp_weights: dict[str, np.ndarray]) -> None:
    config = {
        "inputs": [tensor("x", "FP32", 6)],
        "outputs": [tensor("hidden", "FP32", 8), tensor("p", "FP64", 4)],
        "layers": [
            {"type": "dense", "weight": "w1", "bias": "b1"},
            {"type": "activation", "function": "relu", "output": "hidden"},
            {"type": "dense", "weight": "w2", "bias": "b2", "input": "hidden"},
            {"type": "softmax", "output": "p"},
        ],
    }
    write_model(tmp_path, "two", config, mlp_weights)
    x = np.random.default_rng(4).standard_normal((2, 6))

    out = Repository(tmp_path).get("two").forward({"x": x})

    assert out["hidden"].shape == (2, 8) and out["hidden"].dtype == np.float32
    assert out["p"].shape == (2, 4) and out["p"].dtype == np.float64
    np.testing.assert_allclose(
        out["hidden"], np.maximum(x.astype(np.float32) @ mlp_weights["w1"] + mlp_weights["b1"], 0), rtol=1e-5
    )


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([{"type": "convolution"}], "unknown layer type"),
        ([{"type": "activation", "function": "gelu"}], "activation"),
        ([{"type": "dense", "weight": "nope"}], "not among the weights"),
        ([{"type": "softmax", "input": "ghost"}], "no input or earlier layer"),
        ([{"type": "dense", "weight": "w1", "bias": "b2"}], "bias"),
        ([{"type": "softmax", "output": "other"}], "no layer writes"),
        ([{"type": "dense", "weight": "w2"}], "matmul"),  # w2 takes 8 columns, the input has 6
        ([{"type": "dense", "weight": "w1"}], "expected"),  # 8 columns out, 6 declared
        ([{"type": "embedding", "table": "w1"}], "integers"),  # FP32 ids
    ],
)
def test_config_mistakes_fail_at_load(
    tmp_path: Path, mlp_weights: dict[str, np.ndarray], layers: list[dict[str, Any]], message: str
) -> None:
    config = {"inputs": [tensor("x", "FP32", 6)], "outputs": [tensor("p", "FP32", 6)], "layers": layers}
    write_model(tmp_path, "bad", config, mlp_weights)
    with pytest.raises(ModelConfigError, match=message):
        Repository(tmp_path).load_all()


def test_synthetic_weights_are_deterministic() -> None:
    shapes = {"w": [16, 8], "b": [8]}
    first, again, other = (
        synthetic_weights(7, shapes),
        synthetic_weights(7, shapes),
        synthetic_weights(8, shapes),
    )
    assert first["w"].dtype == np.float32 and first["w"].shape == (16, 8)
    np.testing.assert_array_equal(first["w"], again["w"])
    assert not np.array_equal(first["w"], other["w"])
    np.testing.assert_array_equal(first["b"], np.zeros(8, dtype=np.float32))
    big = synthetic_weights(0, {"w": [512, 512]})["w"]
    assert abs(big.std() - np.sqrt(2 / 512)) < 0.01 * np.sqrt(2 / 512)  # He scaling


def test_synthetic_model_must_say_so(tmp_path: Path) -> None:
    config = {
        "description": "a real model",
        "inputs": [tensor("x", "FP32", 4)],
        "outputs": [tensor("p", "FP32", 2)],
        "synthetic": {"seed": 1, "arrays": {"w": [4, 2]}},
        "layers": [{"type": "dense", "weight": "w"}, {"type": "softmax"}],
    }
    write_model(tmp_path, "fake", config)
    with pytest.raises(ModelConfigError, match="description"):
        Repository(tmp_path).get("fake")
    config["description"] = "Synthetic weights from seed 1"
    (tmp_path / "fake" / "config.json").write_text(json.dumps({"name": "fake", **config}))
    out = Repository(tmp_path).get("fake").forward({"x": np.ones((3, 4))})["p"]
    assert out.shape == (3, 2)


SYNTHETIC_CONFIG = {
    "description": "synthetic weights from seed 3",
    "inputs": [tensor("x", "FP32", 4)],
    "outputs": [tensor("p", "FP32", 2)],
    "synthetic": {"seed": 3, "arrays": {"w": [4, 2], "b": [2]}},
    "layers": [{"type": "dense", "weight": "w", "bias": "b"}, {"type": "softmax"}],
}


def no_drawing(*_: object) -> None:
    raise AssertionError("drawn again although kept")


def test_synthetic_weights_are_drawn_once_and_mapped_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_model(tmp_path, "fake", SYNTHETIC_CONFIG)
    drawn = synthetic_weights(3, {"w": [4, 2], "b": [2]})
    first = Repository(tmp_path).get("fake").forward({"x": np.ones((3, 4))})["p"]
    [kept] = (tmp_path / "fake" / SYNTHETIC_FOLDER).iterdir()
    assert sorted(p.name for p in kept.iterdir()) == ["b.npy", "w.npy"]

    monkeypatch.setattr(repository, "synthetic_weights", no_drawing)
    weights = load_weights(Repository(tmp_path).metadata("fake"), "1")
    np.testing.assert_array_equal(weights["w"], drawn["w"])
    assert not weights["w"].flags.writeable  # mapped from the file, not a copy
    again = Repository(tmp_path).get("fake").forward({"x": np.ones((3, 4))})["p"]
    np.testing.assert_array_equal(first, again)


def test_synthetic_arrays_in_another_order_are_kept_apart(tmp_path: Path) -> None:
    """The arrays are drawn in the config's order: reordered, they are other weights."""
    write_model(tmp_path, "fake", SYNTHETIC_CONFIG)
    load_weights(Repository(tmp_path).metadata("fake"), "1")
    reordered = {**SYNTHETIC_CONFIG, "synthetic": {"seed": 3, "arrays": {"b": [2], "w": [4, 2]}}}
    (tmp_path / "fake" / "config.json").write_text(json.dumps({"name": "fake", "versions": ["1"], **reordered}))
    weights = load_weights(Repository(tmp_path).metadata("fake"), "1")
    np.testing.assert_array_equal(weights["w"], synthetic_weights(3, {"b": [2], "w": [4, 2]})["w"])
    assert len(list((tmp_path / "fake" / SYNTHETIC_FOLDER).iterdir())) == 2


def test_synthetic_weights_kept_as_garbage_are_drawn_and_kept_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_model(tmp_path, "fake", SYNTHETIC_CONFIG)
    drawn = synthetic_weights(3, {"w": [4, 2], "b": [2]})
    metadata = Repository(tmp_path).metadata("fake")
    load_weights(metadata, "1")
    [kept] = (tmp_path / "fake" / SYNTHETIC_FOLDER).iterdir()
    for garbage in (b"not an array", np.zeros((2, 4), dtype=np.float32), np.zeros((4, 2), dtype=np.float64)):
        if isinstance(garbage, bytes):
            (kept / "w.npy").write_bytes(garbage)
        else:
            np.save(kept / "w.npy", garbage)  # an array of another shape or type
        np.testing.assert_array_equal(load_weights(metadata, "1")["w"], drawn["w"])
        with monkeypatch.context() as patch:
            patch.setattr(repository, "synthetic_weights", no_drawing)
            weights = load_weights(metadata, "1")  # kept again: mapped, not drawn
        np.testing.assert_array_equal(weights["w"], drawn["w"])


def test_synthetic_weights_that_cannot_be_kept_are_drawn(tmp_path: Path) -> None:
    write_model(tmp_path, "fake", SYNTHETIC_CONFIG)
    (tmp_path / "fake" / SYNTHETIC_FOLDER).write_text("a file where the folder would go: nothing can be kept")
    weights = load_weights(Repository(tmp_path).metadata("fake"), "1")
    np.testing.assert_array_equal(weights["w"], synthetic_weights(3, {"w": [4, 2], "b": [2]})["w"])


def test_synthetic_array_names_must_be_identifiers(tmp_path: Path) -> None:
    config = {**SYNTHETIC_CONFIG, "synthetic": {"seed": 3, "arrays": {"../w": [4, 2], "b": [2]}}}
    write_model(tmp_path, "fake", config)
    with pytest.raises(ModelConfigError, match="identifiers"):
        Repository(tmp_path).get("fake")
    assert not (tmp_path / SYNTHETIC_FOLDER).exists() and not (tmp_path / "fake" / SYNTHETIC_FOLDER).exists()


def test_repository_caches_and_names_unknown_models(mlp: Model, tmp_path: Path) -> None:
    repository = Repository(tmp_path)
    model = repository.get("mlp", "1")
    assert repository.get("mlp") is model and repository.get("mlp", "") is model
    with pytest.raises(UnknownModelError, match="unknown model 'nope'"):
        repository.get("nope", "1")
    with pytest.raises(UnknownModelError, match="no version '2'"):
        repository.get("mlp", "2")
    with pytest.raises(KeyError):  # what callers that know only the standard library catch
        repository.metadata("nope")
    assert repository.names() == ["mlp"]


@given(
    arrays(
        np.float32,
        array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=16),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    )
)
def test_softmax_is_finite_and_sums_to_one(x: np.ndarray) -> None:
    p = softmax(x)
    assert p.dtype == np.float32 and p.shape == x.shape
    assert np.isfinite(p).all() and (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-5)
