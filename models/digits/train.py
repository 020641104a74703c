"""Train the ``digits`` model: a 64 -> 64 relu -> 10 softmax MLP on scikit-learn's 8x8 digits.

Run from the repository root: ``python models/digits/train.py``. scikit-learn is needed here
only (for the bundled data set and the stratified split); serving needs numpy alone.

Training is plain numpy: mini-batch Adam on the cross-entropy, features scaled by 1/16.
After training, the 1/16 is folded into the first weight matrix, so the served model takes
raw pixel values 0..16 as sklearn ships them. Writes, next to this file, ``1/weights.npz``
(w1, b1, w2, b2 as float32), ``1/heldout.npz`` (the 20 % held out: X float32 raw pixels,
y int64) and ``1/metrics.json``; prints the held-out accuracy. Deterministic for a given
numpy/scikit-learn version.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sklearn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0
HELDOUT_FRACTION = 0.2
HIDDEN_UNITS = 64
EPOCHS = 60
BATCH_ROWS = 32
LEARNING_RATE = 1e-3
PIXEL_MAX = 16.0  # sklearn's digits are 0..16 intensities
OUT_DIR = Path(__file__).resolve().parent / "1"


def forward(params: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hidden activations and class probabilities for scaled inputs ``x``."""
    hidden = np.maximum(x @ params["w1"] + params["b1"], 0)
    logits = hidden @ params["w2"] + params["b2"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return hidden, e / e.sum(axis=1, keepdims=True)


def train(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n_in, n_out = x.shape[1], int(y.max()) + 1
    params = {
        "w1": rng.standard_normal((n_in, HIDDEN_UNITS)) * np.sqrt(2.0 / n_in),
        "b1": np.zeros(HIDDEN_UNITS),
        "w2": rng.standard_normal((HIDDEN_UNITS, n_out)) * np.sqrt(2.0 / HIDDEN_UNITS),
        "b2": np.zeros(n_out),
    }
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    beta1, beta2, eps, step = 0.9, 0.999, 1e-8, 0
    onehot = np.eye(n_out)[y]
    for _ in range(EPOCHS):
        order = rng.permutation(len(x))
        for start in range(0, len(x), BATCH_ROWS):
            idx = order[start : start + BATCH_ROWS]
            xb, tb = x[idx], onehot[idx]
            hidden, probs = forward(params, xb)
            dlogits = (probs - tb) / len(idx)  # gradient of mean cross-entropy w.r.t. logits
            dhidden = (dlogits @ params["w2"].T) * (hidden > 0)
            grads = {
                "w2": hidden.T @ dlogits,
                "b2": dlogits.sum(0),
                "w1": xb.T @ dhidden,
                "b1": dhidden.sum(0),
            }
            step += 1
            for k, g in grads.items():
                m[k] = beta1 * m[k] + (1 - beta1) * g
                v[k] = beta2 * v[k] + (1 - beta2) * g * g
                m_hat, v_hat = m[k] / (1 - beta1**step), v[k] / (1 - beta2**step)
                params[k] -= LEARNING_RATE * m_hat / (np.sqrt(v_hat) + eps)
    return params


def main() -> None:
    digits = load_digits()
    x_train, x_held, y_train, y_held = train_test_split(
        digits.data, digits.target, test_size=HELDOUT_FRACTION, stratify=digits.target, random_state=SEED
    )
    params = train(x_train / PIXEL_MAX, y_train, np.random.default_rng(SEED))
    served = {k: p.astype(np.float32) for k, p in params.items()}
    served["w1"] = (params["w1"] / PIXEL_MAX).astype(np.float32)  # clients send raw 0..16 pixels

    x_held32 = x_held.astype(np.float32)
    _, probs = forward(served, x_held32)
    accuracy = float((probs.argmax(axis=1) == y_held).mean())
    train_accuracy = float((forward(served, x_train.astype(np.float32))[1].argmax(axis=1) == y_train).mean())

    OUT_DIR.mkdir(exist_ok=True)
    np.savez_compressed(OUT_DIR / "weights.npz", **served)
    np.savez_compressed(OUT_DIR / "heldout.npz", X=x_held32, y=y_held.astype(np.int64))
    metrics = {
        "heldout_accuracy": round(accuracy, 4),
        "train_accuracy": round(train_accuracy, 4),
        "heldout_rows": len(y_held),
        "train_rows": len(y_train),
        "seed": SEED,
        "epochs": EPOCHS,
        "hidden_units": HIDDEN_UNITS,
        "numpy": np.__version__,
        "scikit_learn": sklearn.__version__,
    }
    (OUT_DIR / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"held-out accuracy {accuracy:.4f} on {len(y_held)} rows (train {train_accuracy:.4f})")


if __name__ == "__main__":
    main()
