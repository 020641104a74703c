"""The ray peer's server: ``python -m bench.peers.ray.server --workers N --port P ...``.

Runs until SIGTERM, then shuts Serve and its private Ray cluster down. The model comes
from the environment.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

import numpy as np
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from bench.peers.model import MODEL_ENV, REPOSITORY_ENV, BadRequest, Rows, Runner, total_rows

MAX_BATCH_SIZE = 32
BATCH_WAIT_S = 0.02
MAX_ONGOING_REQUESTS = 64  # per replica; Serve's default (5) would cap every batch at 5


class Inference:
    """Checks each request alone, runs a batch of them in one forward pass."""

    def __init__(self, repository_root: str, model: str) -> None:
        self.runner = Runner(repository_root, model)

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            rows = self.runner.signature.parse(await request.json())
        except (BadRequest, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        output, batch_size = await self.infer(rows)
        return JSONResponse(self.runner.signature.reply(rows, output, batch_size))

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def infer(self, requests: list[Rows]) -> list[tuple[np.ndarray, int]]:
        """Every request's output and the rows of the pass it shared."""
        outputs = self.runner.forward_batch(requests)
        rows = total_rows(requests)
        return [(out, rows) for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--route", default="/")
    parser.add_argument("--temp-dir", required=True)
    args = parser.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # Enough CPU slots for every replica even when workers > cores (the scaling scenario).
    ray.init(
        num_cpus=max(args.workers, os.cpu_count() or 1),
        include_dashboard=False,
        _temp_dir=args.temp_dir,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        deployment = serve.deployment(
            num_replicas=args.workers, max_ongoing_requests=MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 1}
        )(Inference)
        serve.run(deployment.bind(os.environ[REPOSITORY_ENV], os.environ[MODEL_ENV]), route_prefix=args.route)
        print(f"serving on 127.0.0.1:{args.port}{args.route}", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
