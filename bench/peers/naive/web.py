"""The naive peer's web side: each request sends one Celery task and blocks on its result.

Served by ``granian --interface wsgi bench.peers.naive.web:app``; configured from the
environment the launcher sets.
"""

from __future__ import annotations

import os

import numpy as np
from celery.exceptions import TimeoutError as CeleryTimeoutError
from flask import Flask, Response, jsonify, request

from bench.peers.model import MODEL_ENV, REPOSITORY_ENV, BadRequest, Signature
from bench.peers.naive.tasks import infer
from tasks.repository import Repository

RESULT_TIMEOUT_S = 30.0


def create_app(signature: Signature) -> Flask:
    """POST /infer with ringserve's simple body."""
    app = Flask(__name__)

    @app.post("/infer")
    def post_infer() -> tuple[Response, int]:
        try:
            rows = signature.parse(request.get_json(force=True, silent=True))
        except BadRequest as exc:
            return jsonify(error=str(exc)), 400
        try:
            output = infer.delay(rows.rows.tolist()).get(timeout=RESULT_TIMEOUT_S)
        except CeleryTimeoutError:
            return jsonify(error=f"no result within {RESULT_TIMEOUT_S} s"), 504
        return jsonify(signature.reply(rows, np.asarray(output), batch_size=len(rows.rows))), 200

    return app


app = create_app(Signature.of(Repository(os.environ[REPOSITORY_ENV]), os.environ[MODEL_ENV]))
