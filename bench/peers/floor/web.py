"""The floor's web side: ``POST /infer`` parses the body as ringserve's gateway does, answers a constant.

Served by ``granian --interface wsgi bench.peers.floor.web:app``. The reply has an ``output`` so that
readiness probes and load generators count it as an answer.
"""

from __future__ import annotations

import orjson
from flask import Flask, Response, request

REPLY = {"model": "floor", "output": [0.0], "batch_size": 1}


def json_response(body: object, status: int = 200) -> Response:
    """orjson-encoded, as the gateway's ``app.api.json_response``."""
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/infer")
    def post_infer() -> Response:
        try:
            body = orjson.loads(request.get_data())
        except orjson.JSONDecodeError as exc:
            return json_response({"error": f"malformed JSON: {exc}"}, 400)
        if not isinstance(body, dict) or "input" not in body:
            return json_response({"error": 'the body must be a JSON object with an "input"'}, 400)
        return json_response(REPLY)

    return app


app = create_app()
