"""The mosec peer's server: ``python -m bench.peers.mosec.server --workers N --port P ...``.

mosec reads its own flags (--address, --port, --timeout, --path) from the same command
line; ours are --workers, --route and --max-wait-ms. The model comes from the environment.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from mosec import Server, ValidationError, Worker

from bench.peers.model import MODEL_ENV, REPOSITORY_ENV, BadRequest, Rows, Runner, total_rows

MAX_BATCH_SIZE = 32
MAX_WAIT_MS = 20  # ringserve's default; bench.peers.mosec passes the setting being measured


class Inference(Worker):
    """Decodes and checks each request alone, runs a batch of them in one forward pass.

    A ValidationError in ``deserialize`` answers 422 for that request; mosec fails a whole
    batch only when ``forward`` raises, which checked rows do not make it do.
    """

    def __init__(self) -> None:
        super().__init__()
        self.runner = Runner(os.environ[REPOSITORY_ENV], os.environ[MODEL_ENV])

    def deserialize(self, data: bytes) -> Rows:
        try:
            return self.runner.signature.parse(json.loads(data))
        except (BadRequest, ValueError) as exc:
            raise ValidationError(str(exc)) from None

    def forward(self, data: list[Rows]) -> list[dict[str, Any]]:
        outputs = self.runner.forward_batch(data)
        rows = total_rows(data)
        return [self.runner.signature.reply(r, out, rows) for r, out in zip(data, outputs, strict=True)]

    def serialize(self, data: dict[str, Any]) -> bytes:
        return json.dumps(data).encode()  # compact: mosec's default indents, in pure Python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--route", default="/inference")
    parser.add_argument("--max-wait-ms", type=int, default=MAX_WAIT_MS, help="longest wait for a batch to fill")
    args, _ = parser.parse_known_args()  # the rest is mosec's
    server = Server()
    server.append_worker(
        Inference, num=args.workers, max_batch_size=MAX_BATCH_SIZE, max_wait_time=args.max_wait_ms, route=args.route
    )
    server.run()


if __name__ == "__main__":
    main()
