"""``python -m tasks.worker --node-id worker_1``: the celery worker command, spelled for you.

It runs exactly ``celery -A tasks worker -n worker_1@%h -Q ringserve.worker_1 --pool solo
--without-mingle --without-gossip`` (extra arguments pass through to Celery), with numpy
single-threaded so that several workers share a machine's cores fairly.
"""

from __future__ import annotations

import argparse
import os
import sys

from tasks.contract import queue_name


def celery_argv(node_id: str, extra: list[str]) -> list[str]:
    return [
        "celery", "-A", "tasks", "worker", "-n", f"{node_id}@%h", "-Q", queue_name(node_id),
        "--pool", "solo", "--without-mingle", "--without-gossip", *extra,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node-id", required=True, help="this worker's name on the ring, e.g. worker_1")
    args, extra = parser.parse_known_args(argv)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from celery.__main__ import main as celery_main

    sys.argv = celery_argv(args.node_id, extra)
    celery_main()


if __name__ == "__main__":
    main()
