"""The compute limit: a model's forward pass in-process (no HTTP, no queue) at a fixed batch size.

Measured in fresh processes with single-threaded BLAS, exactly as the workers run (the variables
must be set before numpy loads, hence the subprocess). ``processes`` copies run at once, each on
its own batches, to give the machine's ceiling with every core busy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.payload import input_rows
from tasks.settings import MODEL_REPOSITORY

ROOT = Path(__file__).resolve().parent.parent
SINGLE_THREADED = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
WARMUP_FORWARDS = 3
READY = "ready"


def probe(model: str, batch: int, duration_s: float, repository: str = MODEL_REPOSITORY) -> float:
    """Rows/s of ``model`` at ``batch`` in this process over ``duration_s``.

    Says "ready" on stdout once the model is loaded and warm, and starts the clock when a line
    arrives on stdin, so that parallel probes measure the same interval.
    """
    from tasks.repository import Repository  # loads the engine only where it is measured

    engine = Repository(repository).get(model)
    meta = engine.metadata
    inputs = {meta.inputs[0].name: np.asarray(input_rows(meta, batch, seed=0), dtype=np.float32)}
    for _ in range(WARMUP_FORWARDS):
        engine.forward(inputs)
    print(READY, flush=True)
    sys.stdin.readline()
    rows, began = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - began) < duration_s:
        engine.forward(inputs)
        rows += batch
    return rows / elapsed


def measure(model: str, batch: int, duration_s: float, processes: int = 1) -> float:
    """Rows/s of ``processes`` single-threaded probes running at once (their sum)."""
    env = {**os.environ, **SINGLE_THREADED}
    cmd = [sys.executable, "-m", "bench.ceiling", model, str(batch), str(duration_s)]
    procs = [
        subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        for _ in range(processes)
    ]
    total = 0.0
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != READY:
                raise RuntimeError(f"ceiling probe {' '.join(cmd)} did not start")
        for p in procs:  # start every clock before waiting for any
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.close()
        for p in procs:
            assert p.stdout is not None
            out = p.stdout.read()
            if p.wait(timeout=duration_s + 120) != 0:
                raise RuntimeError(f"ceiling probe {' '.join(cmd)} failed with {p.returncode}")
            total += json.loads(out)["rows_per_s"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return total


def point(model: str, batch: int, duration_s: float, processes: int = 1) -> dict[str, object]:
    """One measured point, as scenarios record it."""
    rows_per_s = measure(model, batch, duration_s, processes)
    print(f"ceiling {model} batch {batch} x{processes}: {rows_per_s:,.0f} rows/s", file=sys.stderr)
    return {"model": model, "batch": batch, "processes": processes, "rows_per_s": rows_per_s, "duration_s": duration_s}


if __name__ == "__main__":
    name, size, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    print(json.dumps({"rows_per_s": probe(name, size, seconds)}))
