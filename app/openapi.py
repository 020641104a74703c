"""The OpenAPI 3.1 description of the gateway, served at ``GET /openapi.json``.

A plain dict built in code from the served models' metadata, so the document names the
models and tensors this gateway actually serves. Every operation lists every error status it
can answer; every error body is ``{"error": str}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.schemas import NAME_MAX_CHARS
from tasks.contract import DATATYPES
from tasks.metadata import ModelMetadata

ERRORS: dict[int, str] = {
    400: "malformed JSON, a field of the wrong type, wrong shape or datatype, too many rows",
    401: "missing or wrong API key (only when the server has API keys; health probes stay open)",
    404: "unknown model, version or route",
    405: "method not allowed on this path",
    413: "request body larger than RINGSERVE_MAX_BODY_BYTES",
    429: "the worker for this key has too many requests in flight; retry after Retry-After",
    503: "no worker alive or Redis unreachable; retry after Retry-After",
    504: "no result within the request timeout",
}
RETRY_AFTER = (429, 503)

INFER_ERRORS = (400, 401, 404, 405, 413, 429, 503, 504)
JSON_MAX_DEPTH = 1024  # orjson's parse limit


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def operation(
    summary: str, ok: str, ok_schema: dict[str, Any], errors: tuple[int, ...], **extra: Any
) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": ok, "content": json_content(ok_schema)}}
    responses.update({str(status): {"$ref": f"#/components/responses/E{status}"} for status in errors})
    return {"summary": summary, "responses": responses, **extra}


def path_parameter(name: str, description: str, examples: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
        "examples": {value: {"value": value} for value in examples},
    }


def schemas(models: Mapping[str, ModelMetadata]) -> dict[str, Any]:
    name = {"type": ["string", "integer"], "maxLength": NAME_MAX_CHARS}
    scalar = {"type": ["string", "number", "boolean"]}
    parameters = {"type": "object", "additionalProperties": scalar}
    tensor_meta: dict[str, Any] = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"enum": sorted(DATATYPES)},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    }
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Name": {**name, "description": f"a string (at most {NAME_MAX_CHARS} characters) or an integer"},
        "Parameters": {**parameters, "description": "Open Inference Protocol parameters: scalars only"},
        "SimpleInferRequest": {
            "type": "object",
            "required": ["input"],
            "properties": {
                "model": {**ref("Name"), "description": "default: RINGSERVE_DEFAULT_MODEL", "examples": sorted(models)},
                "version": {
                    **ref("Name"),
                    "description": "default: the model's traffic split picks one by routing key (sticky), else its"
                    " default version",
                },
                "key": {**ref("Name"), "description": "routing key; else X-Routing-Key, else a hash of the input"},
                "timeout_ms": {"type": "number", "exclusiveMinimum": 0},
                "input": {
                    "type": "array",
                    "minItems": 1,
                    "description": "one row (flat list) or a list of rows, nested as the model's first input",
                },
            },
        },
        "SimpleInferResponse": {
            "type": "object",
            "required": ["output", "model", "version", "node", "batch_size", "cached", "latency_ms"],
            "properties": {
                "output": {"type": "array", "description": "one row, or a list of rows when a list of rows was sent"},
                "model": {"type": "string"},
                "version": {"type": "string"},
                "node": {"type": "string"},
                "batch_size": {"type": "integer"},
                "cached": {"type": "boolean"},
                "latency_ms": {"type": "number"},
            },
        },
        "InputTensor": {
            **tensor_meta,
            "required": ["name", "datatype", "shape", "data"],
            "properties": {
                **tensor_meta["properties"],
                "parameters": ref("Parameters"),
                "data": {
                    "type": "array",
                    "description": "row-major, flat or nested exactly as shape (no deeper)",
                },
            },
        },
        "OutputTensor": {
            **tensor_meta,
            "required": ["name", "datatype", "shape", "data"],
            "properties": {**tensor_meta["properties"], "data": {"type": "array"}},
        },
        "V2InferRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string", "description": "echoed in the response"},
                "parameters": {
                    **ref("Parameters"),
                    "description": "routing_key (string or integer); timeout (µs, number > 0)",
                },
                "inputs": {"type": "array", "minItems": 1, "items": ref("InputTensor")},
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {"name": {"type": "string"}, "parameters": ref("Parameters")},
                    },
                },
            },
        },
        "V2InferResponse": {
            "type": "object",
            "required": ["model_name", "model_version", "outputs", "parameters"],
            "properties": {
                "id": {"type": "string"},
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "outputs": {"type": "array", "items": ref("OutputTensor")},
                "parameters": ref("Parameters"),
            },
        },
        "TensorMetadata": tensor_meta,
        "ModelMetadata": {
            "type": "object",
            "required": ["name", "versions", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string", "enum": sorted(models)},
                "versions": {"type": "array", "items": {"type": "string"}},
                "traffic_split": {
                    "type": "object",
                    "description": "weight per version for requests that name none (sticky per routing key);"
                    " present only for models that have a split",
                    "additionalProperties": {"type": "number", "minimum": 0},
                },
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": ref("TensorMetadata")},
                "outputs": {"type": "array", "items": ref("TensorMetadata")},
            },
        },
        "ServerMetadata": {
            "type": "object",
            "required": ["name", "version", "extensions"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string"}},
            },
        },
        "Live": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
        "Ready": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
        "ModelReady": {
            "type": "object",
            "description": "version: the one checked; versions: every version of the traffic split (a model with a"
            " split, asked without a version). Ready when some live worker serves each of them",
            "required": ["name", "ready"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "ready": {"type": "boolean"},
            },
        },
        "Stats": {"type": "object", "description": "ring members, requests per node, queue depths, errors"},
    }


def responses() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status, description in ERRORS.items():
        response: dict[str, Any] = {"description": description, "content": json_content(ref("Error"))}
        if status in RETRY_AFTER:
            response["headers"] = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}
        out[f"E{status}"] = response
    return out


def document(models: Mapping[str, ModelMetadata], server_version: str) -> dict[str, Any]:
    """The whole OpenAPI 3.1 document for a gateway serving ``models``."""
    names = sorted(models)
    versions = sorted({v for meta in models.values() for v in meta.versions})
    model = path_parameter("model", f"a served model: {', '.join(names)}", names)
    version = path_parameter("version", "a version of the model", versions)
    routing_header = {
        "name": "X-Routing-Key",
        "in": "header",
        "required": False,
        "description": f"routing key when the body names none (at most {NAME_MAX_CHARS} characters)",
        "schema": {"type": "string", "maxLength": NAME_MAX_CHARS},
    }
    binary_header = {
        "name": "Inference-Header-Content-Length",
        "in": "header",
        "required": False,
        "description": "binary tensor data extension: the body's first N bytes are the JSON request, the raw"
        " data of every input with parameters.binary_data_size follows in input order; 0: the whole body is"
        " the raw data of the model's one input. Outputs asked for with parameters.binary_data (or"
        " binary_data_output) follow the response's JSON, whose length this header gives in the response",
        "schema": {"type": "integer", "minimum": 0},
    }
    v2_infer = operation(
        "Open Inference Protocol inference",
        "the requested outputs",
        ref("V2InferResponse"),
        INFER_ERRORS,
        parameters=[routing_header, binary_header],
        requestBody={
            "required": True,
            "content": {
                **json_content(ref("V2InferRequest")),
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
    )
    model_meta = operation("model metadata", "inputs, outputs, versions", ref("ModelMetadata"), (401, 404, 405))
    model_ready = operation("model readiness", "the model can be served", ref("ModelReady"), (401, 404, 405, 503))
    no_auth: list[dict[str, list[str]]] = []
    description = (
        f"Inference over a consistent-hash ring of Celery workers. Served models: {', '.join(names)}."
        f" Nesting: a body nested deeper than {JSON_MAX_DEPTH} levels is malformed JSON (400); names, keys,"
        " id and parameters are scalars; tensor data is flat or nested exactly as its shape, no deeper (400)."
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ringserve",
            "version": server_version,
            "description": description,
        },
        "security": [{}, {"bearer": []}, {"apiKey": []}],
        "paths": {
            "/infer": {
                "post": operation(
                    "simple inference",
                    "the model's first output",
                    ref("SimpleInferResponse"),
                    INFER_ERRORS,
                    parameters=[routing_header],
                    requestBody={"required": True, "content": json_content(ref("SimpleInferRequest"))},
                )
            },
            "/v2": {"get": operation("server metadata", "name and version", ref("ServerMetadata"), (401, 405))},
            "/v2/health/live": {
                "get": operation("liveness", "the gateway answers", ref("Live"), (405,), security=no_auth)
            },
            "/v2/health/ready": {
                "get": operation(
                    "readiness", "Redis reachable, a worker alive", ref("Ready"), (405, 503), security=no_auth
                )
            },
            "/v2/models/{model}": {"parameters": [model], "get": model_meta},
            "/v2/models/{model}/versions/{version}": {"parameters": [model, version], "get": model_meta},
            "/v2/models/{model}/ready": {"parameters": [model], "get": model_ready},
            "/v2/models/{model}/versions/{version}/ready": {"parameters": [model, version], "get": model_ready},
            "/v2/models/{model}/infer": {"parameters": [model], "post": v2_infer},
            "/v2/models/{model}/versions/{version}/infer": {"parameters": [model, version], "post": v2_infer},
            "/stats": {"get": operation("statistics", "ring, queues, batches, errors", ref("Stats"), (401, 405, 503))},
            "/openapi.json": {"get": operation("this document", "OpenAPI 3.1", {"type": "object"}, (401, 405))},
            "/metrics": {
                "get": {
                    **operation("Prometheus metrics, Triton's names", "text format 0.0.4", {}, (401, 404, 405)),
                    "responses": {
                        "200": {
                            "description": "text format 0.0.4 (404 when RINGSERVE_METRICS is off)",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **{str(c): {"$ref": f"#/components/responses/E{c}"} for c in (401, 404, 405)},
                    },
                }
            },
        },
        "components": {
            "schemas": schemas(models),
            "responses": responses(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }
