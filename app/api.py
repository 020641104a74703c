"""HTTP routes: the simple API (``POST /infer``), the Open Inference Protocol v2, stats."""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import orjson
from flask import Blueprint, Flask, Response, current_app, g, request
from redis.exceptions import RedisError

from app import binary
from app.errors import BadRequest, NotFound, Unauthorized, Unavailable
from app.exposition import queue_stats, stats_of
from app.gateway import Gateway
from app.openapi import document
from app.schemas import (
    NAME_MAX_CHARS,
    Tensor,
    check_rows,
    flag,
    json_object,
    name_field,
    parse_simple,
    parse_v2_inputs,
    parse_v2_outputs,
    scalar_map,
    shown,
    string_field,
    unpack,
)
from app.submit import reported_rows
from tasks.contract import (
    STATS_ERRORS_KEY,
    decode_counts,
)
from tasks.metadata import ModelMetadata

SERVER_VERSION = "0.1.0"
OPEN_PATHS = ("/v2/health/",)

api = Blueprint("api", __name__)


def gateway() -> Gateway:
    return current_app.extensions["ringserve"]  # type: ignore[no-any-return]


def json_response(body: Any, status: int = 200) -> Response:
    """orjson, which also writes the numpy arrays of outputs (:func:`app.schemas.unpack`)."""
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status=status, mimetype="application/json")


def json_body() -> dict[str, Any]:
    return json_object(request.get_data())


def find_model(name: str, version: str | None = None) -> tuple[ModelMetadata, str | None]:
    """The model, and the version asked for (None when the request names none: see :func:`pick_version`)."""
    models = gateway().models
    meta = models.get(name)
    if meta is None:
        raise NotFound(f"unknown model {shown(name)}; served: {sorted(models)}")
    if version is not None and version != "" and meta.resolve_version(version) is None:
        raise NotFound(f"model {meta.name!r} has no version {shown(version)}; it has {list(meta.versions)}")
    g.model, g.version = meta.name, version or ""  # what the request's metrics are labelled with
    return meta, version or None


def pick_version(meta: ModelMetadata, version: str | None, key: str) -> str:
    """The version asked for, else the traffic split's choice for the routing key (sticky), else the default."""
    chosen = version or meta.version_for(key)
    g.version = chosen
    return chosen


def routing_key(explicit: str | None, tensors: list[Tensor]) -> str:
    """Parameter (checked by ``name_field``), else header, else a hash of the input bytes (equal inputs meet)."""
    if explicit is not None:
        return explicit
    header = request.headers.get("X-Routing-Key")
    if header:
        if len(header) > NAME_MAX_CHARS:
            raise BadRequest(f"'X-Routing-Key' is longer than {NAME_MAX_CHARS} characters")
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


def key_matches(given: str, keys: tuple[str, ...]) -> bool:
    """Whether ``given`` is one of ``keys``, in time that does not depend on how much of a key matched:
    every key is compared, each in constant time (``in`` would stop at the first differing byte)."""
    given_bytes = given.encode()
    return any([hmac.compare_digest(given_bytes, key.encode()) for key in keys])  # noqa: C419 (compare all)


@api.before_app_request
def _authenticate_and_start() -> None:
    gw = gateway()
    gw.ensure_started()
    keys = gw.settings.api_keys
    if keys and not request.path.startswith(OPEN_PATHS):
        auth = request.headers.get("Authorization", "")
        given = auth[7:] if auth.startswith("Bearer ") else request.headers.get("X-API-Key", "")
        if not key_matches(given, keys):
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
    model = name_field(body.get("model"), "model")
    meta, version = find_model(
        gw.settings.default_model if model is None else model, name_field(body.get("version"), "version")
    )
    key = name_field(body.get("key"), "key")
    timeout_ms = client_timeout_ms(body.get("timeout_ms"), 1.0, "timeout_ms")
    if "input" not in body:
        raise BadRequest("missing 'input'")
    parsed = parse_simple(meta, body["input"], gw.max_rows(meta))
    key = routing_key(key, parsed.tensors)
    answer = gw.infer(key, meta, pick_version(meta, version, key), parsed.tensors, timeout_ms)
    reply = answer.result
    first = reply.outputs[0]
    values = unpack(first.datatype, first.data)
    output = values if parsed.single_row else values.reshape(first.shape)
    return json_response(
        {
            "output": output,
            "model": meta.name,
            "version": reply.version,
            "node": reply.node,
            "batch_size": reply.batch_size,
            "cached": answer.cached,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
    )


# -- Open Inference Protocol v2 ---------------------------------------------------------------


@api.get("/v2")
def server_metadata() -> Response:
    return json_response({"name": "ringserve", "version": SERVER_VERSION, "extensions": [binary.EXTENSION]})


@api.get("/v2/health/live")
def live() -> Response:
    return json_response({"live": True})


@api.get("/v2/health/ready")
def ready() -> Response:
    gw = gateway()
    if not gw.ready:
        dead = sorted(name for name, alive in gw.threads().items() if not alive)
        why = f"its {', '.join(dead)} thread died" if dead else "no worker is alive or Redis is unreachable"
        raise Unavailable(f"not ready: {why}")
    return json_response({"ready": True})


@api.get("/v2/models/<model>")
@api.get("/v2/models/<model>/versions/<version>")
def model_metadata(model: str, version: str | None = None) -> Response:
    meta, _ = find_model(model, version)
    body: dict[str, Any] = {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": "numpy",
        "inputs": [t.as_json() for t in meta.inputs],
        "outputs": [t.as_json() for t in meta.outputs],
    }
    if meta.traffic_split is not None:
        body["traffic_split"] = dict(meta.traffic_split)
    return json_response(body)


@api.get("/v2/models/<model>/ready")
@api.get("/v2/models/<model>/versions/<version>/ready")
def model_ready(model: str, version: str | None = None) -> Response:
    """Ready: some live worker serves the version asked for, or every version of the split (or the default)."""
    meta, asked = find_model(model, version)
    versions = (asked,) if asked is not None else meta.unnamed_versions()
    gw = gateway()
    if not gw.ready:
        raise Unavailable(f"model {meta.name!r} is not ready: no worker is alive")
    try:
        unserved = gw.unserved_versions(meta, versions)
        unready = [] if meta.sharding is None else [why for v in versions if (why := gw.unready_shards(meta, v))]
    except RedisError as exc:
        raise Unavailable(f"model {meta.name!r}: readiness unknown ({exc})") from None
    if unserved:
        raise Unavailable(f"model {meta.name!r} is not ready: no live worker serves version {', '.join(unserved)} yet")
    if unready:
        raise Unavailable(f"model {meta.name!r} is not ready: {'; '.join(unready)}")
    if asked is None and meta.traffic_split is not None:
        return json_response({"name": meta.name, "versions": list(versions), "ready": True})
    return json_response({"name": meta.name, "version": versions[0], "ready": True})


@api.post("/v2/models/<model>/infer")
@api.post("/v2/models/<model>/versions/<version>/infer")
def v2_infer(model: str, version: str | None = None) -> Response:
    started = time.perf_counter()
    gw = gateway()
    meta, asked = find_model(model, version)
    head, blobs = binary.split(request.get_data(), request.headers.get(binary.HEADER))
    raw = head is None  # the raw form: the whole body is the one input; every output comes back binary
    body = {"parameters": {"binary_data_output": True}} if head is None else head
    if raw:
        tensors = [binary.raw_input(meta, blobs)]
        check_rows(meta, tensors, gw.max_rows(meta))
    request_id = string_field(body.get("id"), "id")
    params = scalar_map(body.get("parameters"), "parameters")
    key = name_field(params.get("routing_key"), "parameters.routing_key")
    # Triton's convention: parameters.timeout is in microseconds.
    timeout_ms = client_timeout_ms(params.get("timeout"), 0.001, "parameters.timeout")
    if not raw:
        tensors, _rows = parse_v2_inputs(meta, body.get("inputs"), gw.max_rows(meta), blobs)
    wanted = parse_v2_outputs(
        meta, body.get("outputs"), flag(params.get("binary_data_output"), "parameters.binary_data_output")
    )
    key = routing_key(key, tensors)
    answer = gw.infer(key, meta, pick_version(meta, asked, key), tensors, timeout_ms)
    reply = answer.result
    outputs: list[dict[str, Any]] = []
    data: list[bytes] = []
    for t in reply.outputs:
        if t.name not in wanted:
            continue
        out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if wanted[t.name]:
            out["parameters"] = {"binary_data_size": len(t.data)}
            data.append(t.data)
        else:
            out["data"] = unpack(t.datatype, t.data)
        outputs.append(out)
    response: dict[str, Any] = {
        "model_name": meta.name,
        "model_version": reply.version,
        "outputs": outputs,
        "parameters": {
            "node": reply.node,
            "batch_size": reply.batch_size,
            "cached": answer.cached,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        },
    }
    if request_id is not None:
        response["id"] = request_id
    if not data:
        return json_response(response)
    payload, headers = binary.response(response, data)
    return Response(payload, headers=headers, mimetype=binary.MEDIA_TYPE)


@api.get("/openapi.json")
def openapi() -> Response:
    return json_response(document(gateway().models, SERVER_VERSION))


# -- operations -------------------------------------------------------------------------------


def ints(h: dict[bytes, bytes]) -> dict[str, int]:
    """A counter hash, sorted by number where its fields are numbers."""
    counts = decode_counts(h)
    return dict(sorted(counts.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0)))


@api.get("/stats")
def stats() -> Response:
    gw = gateway()
    router = gw.dispatcher.router
    members = router.members
    nodes = list(members)
    pipe = gw.redis.pipeline(transaction=False)
    queue_stats(pipe, nodes)
    try:
        hashes, depths = stats_of(pipe.execute(), nodes)
        all_rows = reported_rows(gw.redis)
        shards = gw.shard_reports()
    except RedisError as exc:
        raise Unavailable(f"statistics unavailable: {exc}") from None

    return json_response(
        {
            "members": {node: member.weight for node, member in members.items()},
            "rows_in_flight_per_node": dict(sorted(all_rows.items())),
            "requests_per_node": ints(hashes["routed"]),
            "spilled_per_node": ints(hashes["spilled"]),
            "queue_depths": depths,
            "batch_size_histogram": ints(hashes["batches"]),
            "errors_by_status": ints(hashes["errors"]),
            "expired_skipped_per_node": ints(hashes["expired"]),
            "dropped_messages": ints(hashes["dropped"]),
            "shards": {node: {t: s.wire() for t, s in tables.items()} for node, tables in shards.items()},
            "cache": gw.cache_stats(),  # its Redis may be another: its failure is a field, not a 503
            "open_breakers_this_process": router.open_breakers(),
            "threads_this_process": gw.threads(),
            "refused_for_memory_this_process": gw.dispatcher.refused_for_memory,
            "gateway_id_this_process": gw.dispatcher.gateway_id,
            "in_flight_this_process": gw.dispatcher.in_flight(),
            "in_flight_per_node_this_process": router.in_flight(),
            "rows_in_flight_per_node_this_process": router.rows_in_flight(),
        }
    )


def register_routes(app: Flask) -> None:
    app.url_map.merge_slashes = False  # "/v2/models//ready" is a JSON 404, not an HTML 308 redirect
    app.register_blueprint(api)
