"""HTTP routes: the simple API (``POST /infer``), the Open Inference Protocol v2, stats."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import orjson
from flask import Blueprint, Flask, Response, current_app, request
from redis.exceptions import RedisError

from app.errors import BadRequest, NotFound, Unauthorized, Unavailable
from app.gateway import Gateway
from app.schemas import Tensor, nest, parse_simple, parse_v2_inputs, unpack
from tasks.contract import STATS_BATCHES_KEY, STATS_ERRORS_KEY, STATS_EXPIRED_KEY, STATS_ROUTED_KEY, queue_name
from tasks.metadata import ModelMetadata

SERVER_VERSION = "0.1.0"
OPEN_PATHS = ("/v2/health/",)

api = Blueprint("api", __name__)


def gateway() -> Gateway:
    return current_app.extensions["ringserve"]  # type: ignore[no-any-return]


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


def json_body() -> dict[str, Any]:
    try:
        body = orjson.loads(request.get_data())
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def find_model(name: Any, version: Any = None) -> tuple[ModelMetadata, str]:
    meta = gateway().models.get(name) if isinstance(name, str) else None
    if meta is None:
        raise NotFound(f"unknown model {name!r}; served: {sorted(gateway().models)}")
    resolved = meta.resolve_version(None if version is None else str(version))
    if resolved is None:
        raise NotFound(f"model {meta.name!r} has no version {version!r}; it has {list(meta.versions)}")
    return meta, resolved


def routing_key(explicit: Any, tensors: list[Tensor]) -> str:
    """Parameter, else header, else a hash of the input bytes (equal inputs meet)."""
    if explicit is not None:
        return str(explicit)
    header = request.headers.get("X-Routing-Key")
    if header:
        return header
    digest = hashlib.blake2b(digest_size=16)
    for t in tensors:
        digest.update(t.data)
    return digest.hexdigest()


def client_timeout_ms(value: Any, unit_ms: float, name: str) -> float | None:
    """A client's own deadline, in ms; it may only shorten the server's."""
    if value is None:
        return None
    if type(value) not in (int, float) or value <= 0:
        raise BadRequest(f"{name!r} must be a positive number")
    return float(value) * unit_ms


@api.before_app_request
def _authenticate_and_start() -> None:
    gw = gateway()
    gw.ensure_started()
    keys = gw.settings.api_keys
    if keys and not request.path.startswith(OPEN_PATHS):
        auth = request.headers.get("Authorization", "")
        given = auth[7:] if auth.startswith("Bearer ") else request.headers.get("X-API-Key", "")
        if given not in keys:
            raise Unauthorized("missing or invalid API key (send 'Authorization: Bearer <key>')")


@api.after_app_request
def _count_errors(response: Response) -> Response:
    if response.status_code >= 400:
        try:
            gateway().redis.hincrby(STATS_ERRORS_KEY, str(response.status_code), 1)
        except (RedisError, AttributeError):
            pass
    return response


# -- simple API -----------------------------------------------------------------------------


@api.post("/infer")
def simple_infer() -> Response:
    started = time.perf_counter()
    gw = gateway()
    body = json_body()
    meta, version = find_model(body.get("model", gw.settings.default_model), body.get("version"))
    if "input" not in body:
        raise BadRequest("missing 'input'")
    parsed = parse_simple(meta, body["input"], gw.max_rows(meta))
    timeout_ms = client_timeout_ms(body.get("timeout_ms"), 1.0, "timeout_ms")
    reply = gw.infer(routing_key(body.get("key"), parsed.tensors), meta, version, parsed.tensors, timeout_ms)
    name, datatype, shape, data = reply["outputs"][0]
    values = unpack(datatype, data)
    output = values if parsed.single_row else nest(values, shape)
    return json_response(
        {
            "output": output,
            "model": meta.name,
            "version": reply["version"],
            "node": reply["node"],
            "batch_size": reply["batch_size"],
            "cached": False,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
    )


# -- Open Inference Protocol v2 ---------------------------------------------------------------


@api.get("/v2")
def server_metadata() -> Response:
    return json_response({"name": "ringserve", "version": SERVER_VERSION, "extensions": []})


@api.get("/v2/health/live")
def live() -> Response:
    return json_response({"live": True})


@api.get("/v2/health/ready")
def ready() -> Response:
    if not gateway().ready:
        raise Unavailable("not ready: no worker is alive or Redis is unreachable")
    return json_response({"ready": True})


@api.get("/v2/models/<model>")
@api.get("/v2/models/<model>/versions/<version>")
def model_metadata(model: str, version: str | None = None) -> Response:
    meta, resolved = find_model(model, version)
    return json_response(
        {
            "name": meta.name,
            "versions": list(meta.versions),
            "platform": "numpy",
            "inputs": [t.as_json() for t in meta.inputs],
            "outputs": [t.as_json() for t in meta.outputs],
        }
    )


@api.get("/v2/models/<model>/ready")
@api.get("/v2/models/<model>/versions/<version>/ready")
def model_ready(model: str, version: str | None = None) -> Response:
    meta, resolved = find_model(model, version)
    if not gateway().ready:
        raise Unavailable(f"model {meta.name!r} is not ready: no worker is alive")
    return json_response({"name": meta.name, "version": resolved, "ready": True})


@api.post("/v2/models/<model>/infer")
@api.post("/v2/models/<model>/versions/<version>/infer")
def v2_infer(model: str, version: str | None = None) -> Response:
    started = time.perf_counter()
    gw = gateway()
    meta, resolved = find_model(model, version)
    body = json_body()
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")
    tensors, _rows = parse_v2_inputs(meta, body.get("inputs"), gw.max_rows(meta))
    wanted = body.get("outputs")
    names = [str(o.get("name")) for o in wanted if isinstance(o, dict)] if isinstance(wanted, list) else None
    declared = {o.name for o in meta.outputs}
    if names is not None and not set(names) <= declared:
        raise BadRequest(f"unknown outputs {sorted(set(names) - declared)}; model has {sorted(declared)}")
    # Triton's convention: parameters.timeout is in microseconds.
    timeout_ms = client_timeout_ms(params.get("timeout"), 0.001, "parameters.timeout")
    reply = gw.infer(routing_key(params.get("routing_key"), tensors), meta, resolved, tensors, timeout_ms)
    outputs = [
        {"name": name, "datatype": datatype, "shape": shape, "data": unpack(datatype, data)}
        for name, datatype, shape, data in reply["outputs"]
        if names is None or name in names
    ]
    response: dict[str, Any] = {
        "model_name": meta.name,
        "model_version": reply["version"],
        "outputs": outputs,
        "parameters": {
            "node": reply["node"],
            "batch_size": reply["batch_size"],
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        },
    }
    if "id" in body:
        response["id"] = body["id"]
    return json_response(response)


# -- operations -------------------------------------------------------------------------------


@api.get("/stats")
def stats() -> Response:
    gw = gateway()
    router = gw.dispatcher.router
    members = router.members
    pipe = gw.redis.pipeline(transaction=False)
    pipe.hgetall(STATS_ROUTED_KEY)
    pipe.hgetall(STATS_BATCHES_KEY)
    pipe.hgetall(STATS_ERRORS_KEY)
    pipe.hgetall(STATS_EXPIRED_KEY)
    for node in members:
        pipe.llen(queue_name(node))
    try:
        routed, batches, errors, expired, *depths = pipe.execute()
    except RedisError as exc:
        raise Unavailable(f"statistics unavailable: {exc}") from None

    def ints(h: dict[bytes, bytes]) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in sorted(h.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0)}

    return json_response(
        {
            "members": {node: member.weight for node, member in members.items()},
            "requests_per_node": ints(routed),
            "queue_depths": dict(zip(members, depths, strict=True)),
            "batch_size_histogram": ints(batches),
            "errors_by_status": ints(errors),
            "expired_skipped_per_node": ints(expired),
            "in_flight_this_process": gw.dispatcher.in_flight(),
            "in_flight_per_node_this_process": router.in_flight(),
        }
    )


def register_routes(app: Flask) -> None:
    app.register_blueprint(api)
