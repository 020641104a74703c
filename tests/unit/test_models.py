"""The shipped model repository: it loads, digits is accurate, heavy has the promised shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tasks.repository import Repository

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module")
def repository() -> Repository:
    repository = Repository(MODELS)
    repository.load_all()
    return repository


def test_shipped_repository_loads(repository: Repository) -> None:
    assert {"digits", "heavy"} <= set(repository.names())


def test_digits_heldout_accuracy(repository: Repository) -> None:
    heldout = np.load(MODELS / "digits" / "1" / "heldout.npz")
    x, y = heldout["X"], heldout["y"]
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (len(y), 64)

    probabilities = repository.get("digits", "1").forward({"pixels": x})["probabilities"]

    assert probabilities.dtype == np.float32 and probabilities.shape == (len(y), 10)
    accuracy = float((probabilities.argmax(axis=1) == y).mean())
    assert accuracy >= 0.95
    reported = json.loads((MODELS / "digits" / "1" / "metrics.json").read_text())["heldout_accuracy"]
    assert accuracy == pytest.approx(reported, abs=1e-3)


def test_heavy_forward_shape(repository: Repository) -> None:
    features = np.random.default_rng(0).standard_normal((2, 1024)).astype(np.float32)
    probabilities = repository.get("heavy", "1").forward({"features": features})["probabilities"]
    assert probabilities.shape == (2, 1000) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    assert "synthetic" in repository.metadata("heavy").config["description"]


def test_batching_policy_comes_from_the_model_config(tmp_path: Path) -> None:
    from tasks.metadata import load_metadata

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],'
        ' "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],'
        ' "batching": {"max_batch_size": 8, "max_delay_ms": 5, "idle_ms": 1.5}}'
    )
    meta = load_metadata(model)
    assert (meta.max_batch_size, meta.max_delay_ms, meta.batch_idle_ms) == (8, 5, 1.5)
    assert load_metadata(MODELS / "heavy").batch_idle_ms == 10
