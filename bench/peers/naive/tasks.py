"""The naive peer's worker side: one plain Celery task per request, no batching.

Loaded by ``celery -A bench.peers.naive.tasks worker``, so it is configured from the
environment the launcher sets (Redis URL, model, repository).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
from celery import Celery
from celery.signals import worker_process_init

from bench.peers.model import MODEL_ENV, REPOSITORY_ENV, Runner
from bench.peers.naive import REDIS_URL_ENV


def make_celery(redis_url: str) -> Celery:
    """Redis as broker and result backend, JSON only: the defaults a tutorial would use."""
    app = Celery("naive", broker=redis_url, backend=redis_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_expires=600,
    )
    return app


app = make_celery(os.environ[REDIS_URL_ENV])


@functools.cache
def runner() -> Runner:
    """This process's model, loaded once; the web process imports this module but never calls it."""
    return Runner(os.environ[REPOSITORY_ENV], os.environ[MODEL_ENV])


@worker_process_init.connect
def _load_model(**_: Any) -> None:
    """Load the weights before the first task, in every prefork child."""
    runner()


@app.task(name="naive.infer")
def infer(rows: list[list[float]]) -> list[list[float]]:
    """Outputs for the rows of one request."""
    output: list[list[float]] = runner().forward(np.asarray(rows, np.float32)).tolist()
    return output
