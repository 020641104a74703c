"""Property-based fuzzing of the live gateway: every operation of ``/openapi.json``, no 5xx.

Real parts only: the Flask app of fixture ``client`` on a real redis-server and two real Celery
workers, plus a second gateway on the same workers with an API key (for 401s). Hypothesis
builds valid requests from the model metadata (``digits`` mostly, ``heavy`` rarely: it is slow)
and hostile ones: wrong types in every field, random JSON values, deep nesting past orjson's
limit, huge and negative shapes, unknown fields, odd headers, raw bytes, oversized bodies.

Every request states what it expects: ``ok`` (valid: 200 with the right output shape), ``4xx``
(refused), or ``any`` (a random value that may or may not be valid). Every answer is JSON with
a status the document lists for that operation (or 405 for a wrong method), never >= 500;
every 4xx carries a string ``error``. Each test counts what it sent and asserts at least
``EXAMPLES`` requests, and for infer operations at least ``VALID_SHARE`` of them valid and
answered 200. Requests are served under the interpreter's usual recursion limit (Hypothesis
raises it, which would hide a ``repr()`` of a 1,000-deep value overflowing). Nesting is probed
around orjson's serialising limit (254), Python's recursion limit and orjson's parsing limit
(1,024). ``derandomize=True`` keeps CI deterministic.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from random import Random
from typing import Any
from urllib.parse import quote, urlencode

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.api import SERVER_VERSION
from app.openapi import document
from app.schemas import NAME_MAX_CHARS
from tasks.metadata import load_repository
from tasks.settings import Settings
from tests.conftest import ROOT, Cluster

pytestmark = pytest.mark.integration

MODELS = load_repository(ROOT / "models")
DOC = document(MODELS, SERVER_VERSION)
DOC_JSON = orjson.loads(orjson.dumps(DOC))  # as served
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
OPERATIONS = [(m.upper(), path) for path, item in DOC["paths"].items() for m in item if m.upper() in METHODS]
INFER_PATHS = {path for method, path in OPERATIONS if path.endswith("infer")}
EXAMPLES = 1000  # requests per operation
VALID_SHARE = 0.30  # of infer requests, at least this share is valid and answered 200
API_KEY = "fuzz-key"
DEEP = "\x00deep\x00"  # placeholder for deeply nested JSON, spliced in after serialising
SERVER_RECURSION_LIMIT = sys.getrecursionlimit()  # Hypothesis raises it while a test runs; a server has this
MAX_ROWS = 32  # RINGSERVE_MAX_BATCH_SIZE's default; no shipped model sets its own

TEXT = st.text(st.characters(codec="utf-8"), max_size=20)
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)
SCALAR = st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT
JSON = st.recursive(
    st.none() | SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)
NOT_A_NAME: st.SearchStrategy[Any] = st.one_of(
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(JSON, max_size=3),
    st.dictionaries(TEXT, JSON, max_size=3),
    st.just(DEEP),
)
NON_POSITIVE = st.integers(max_value=0) | st.floats(max_value=0, allow_nan=False, allow_infinity=False)
NOT_SCALAR = st.none() | st.lists(JSON, max_size=3) | st.dictionaries(TEXT, JSON, max_size=3) | st.just(DEEP)
LONG_NAME = st.integers(NAME_MAX_CHARS + 1, NAME_MAX_CHARS + 100).map(lambda n: "k" * n)
BINARY_NAMES = ("binary_data_size", "binary_data", "binary_data_output")  # the binary extension's own parameters
PARAMETERS = st.dictionaries(TEXT.filter(lambda k: k not in BINARY_NAMES), SCALAR, max_size=3)
MUTATED = 0.4  # share of infer requests given a hostile mutation
ODD_CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""]


@dataclass
class Call:
    """One generated request and what it must get."""

    method: str
    path: str
    body: Any = None  # JSON value, or bytes sent as they are
    headers: dict[str, str] = field(default_factory=dict)
    expect: str = "ok"  # ok: 200 and the right shape; 4xx: refused; any: anything below 500
    model: str = "digits"
    rows: int = 0
    single: bool = False  # simple API: one flat row, answered with one row
    outputs: bool = True  # v2: the model's output is asked for
    id: str | None = None
    depth: int = 0  # nesting spliced in at DEEP
    keyed: bool = False  # sent to the gateway that wants an API key

    def payload(self) -> bytes | None:
        if self.body is None or isinstance(self.body, bytes):
            return self.body
        try:
            raw = orjson.dumps(self.body)
        except TypeError:  # an integer past 64 bits: the standard library writes it
            raw = json.dumps(self.body).encode()
        deep = b"[" * self.depth + b'"x"' + b"]" * self.depth
        return raw.replace(orjson.dumps(DEEP), deep)


@contextmanager
def recursion_limit(limit: int) -> Iterator[None]:
    """Serve with the interpreter's usual limit: under Hypothesis's raised one, ``str()`` of a
    1,000-deep list succeeds, where a server overflows (and answered 500)."""
    raised = sys.getrecursionlimit()
    sys.setrecursionlimit(limit)
    try:
        yield
    finally:
        sys.setrecursionlimit(raised)


SIMPLE_FIELDS = ("input", "model", "version", "key", "timeout_ms")
V2_FIELDS = ("inputs", "id", "parameters", "outputs")
MODEL_ODDS = st.sampled_from(["digits"] * 99 + ["heavy"])  # heavy (1 row, slow) in about 1 % of requests
ROWS = st.integers(1, 4)
ROW_VALUE = st.integers(0, 16) | st.floats(0, 16)
ROW_EDITS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1023), ROW_VALUE), max_size=3)
SIMPLE_OPTIONAL = st.fixed_dictionaries(
    {},
    optional={
        "version": st.sampled_from(["1", 1, None]),
        "key": st.none() | st.text(max_size=64) | st.integers(-(2**63), 2**64 - 1),
        "timeout_ms": st.integers(10_000, 10**9) | st.floats(10_000, 1e12),
    },
)
SIMPLE_UNKNOWN = st.dictionaries(TEXT.filter(lambda k: k not in SIMPLE_FIELDS), JSON, max_size=2)
V2_UNKNOWN = st.dictionaries(TEXT.filter(lambda k: k not in V2_FIELDS), JSON, max_size=2)
V2_PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "routing_key": st.text(max_size=64) | st.integers(-(2**63), 2**64 - 1),
        "timeout": st.integers(10**7, 10**12) | st.floats(1e7, 1e15),
    },
)
OTHER_PARAMS = st.dictionaries(
    TEXT.filter(lambda k: k not in ("routing_key", "timeout", *BINARY_NAMES)), SCALAR, max_size=2
)
MAYBE_PARAMETERS = st.fixed_dictionaries({}, optional={"parameters": PARAMETERS})
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "X-Routing-Key": HEADER_TEXT | LONG_NAME,
        "Content-Type": st.sampled_from(ODD_CONTENT_TYPES) | HEADER_TEXT,
        "Accept": HEADER_TEXT,
        "Inference-Header-Content-Length": HEADER_TEXT,
        "Authorization": HEADER_TEXT,
        "X-API-Key": HEADER_TEXT,
    },
)
QUERY = st.dictionaries(TEXT, TEXT, max_size=3)
# hostile values, built once (a strategy made per request costs Hypothesis more than the request)
BAD_ELEMENT = st.none() | st.booleans() | TEXT | st.lists(JSON, max_size=3) | st.dictionaries(TEXT, JSON)
NOT_ROWS: st.SearchStrategy[Any] = st.none() | SCALAR | st.dictionaries(TEXT, JSON) | st.just([])
NOT_AN_OBJECT = st.lists(JSON, max_size=3) | SCALAR | st.none()
NOT_JSON_OBJECT = st.binary(max_size=64).map(lambda b: b.replace(b"{", b""))
BAD_TIMEOUT = st.booleans() | NON_POSITIVE | TEXT | st.lists(JSON, max_size=3) | st.dictionaries(TEXT, JSON)
BAD_ID = st.integers() | NOT_A_NAME
BAD_PARAMETERS = st.lists(JSON, max_size=2) | SCALAR | st.just(DEEP)
BAD_KEY = NOT_A_NAME | LONG_NAME
BAD_INPUT_NAME = NOT_A_NAME | st.integers() | st.none() | st.sampled_from(["image", ""])
BAD_DATATYPE = st.sampled_from(["INT32", "FP64", "BOOL", "fp32", ""]) | NOT_A_NAME
BAD_SHAPE: st.SearchStrategy[Any] = st.one_of(
    st.lists(st.integers(2**31, 2**64 - 1) | st.integers(-(2**63), 0) | st.integers(0, 70), max_size=4),
    st.lists(st.one_of(st.floats(), TEXT), min_size=1),
)
BAD_TENSOR_PARAMETERS = st.just({"p": DEEP}) | st.lists(JSON, max_size=2) | SCALAR
BAD_OUTPUTS = st.lists(JSON, min_size=1, max_size=3) | SCALAR.filter(lambda o: o is not None)
BAD_OUTPUTS |= st.sampled_from([[{}], [{"name": "nope"}], [{"name": DEEP}], [{"name": ["x"]}], ["x"]])
ODD_NAME = (TEXT | st.integers().map(str) | LONG_NAME).filter(lambda s: s not in MODELS and s != "1")
WRONG_KEY = HEADER_TEXT.filter(lambda k: k != API_KEY)
ANYTHING = st.binary(max_size=32) | JSON


class Dice(Random):
    """The odds of each branch, seeded from values Hypothesis drew for this request (nearly all
    distinct). Not Hypothesis's own draws: bounded integers favour their low end, and its mutator
    copies choices (``st.randoms`` seeds too) between examples, so the same branches would repeat."""

    def __init__(self, *material: Any) -> None:
        super().__init__(repr(material))

    def chance(self, p: float) -> bool:
        return self.random() < p


def settle_headers(call: Call, rnd: Dice) -> None:
    """Odd headers leave a valid request valid: no over-long X-Routing-Key, the right API key."""
    if call.expect != "ok":
        return
    if len(call.headers.get("X-Routing-Key", "")) > NAME_MAX_CHARS:
        del call.headers["X-Routing-Key"]
    if call.keyed:
        call.headers.pop("Authorization", None)
        call.headers.update(rnd.choice([{"Authorization": f"Bearer {API_KEY}"}, {"X-API-Key": API_KEY}]))


@st.composite
def valid_rows(draw: st.DrawFn) -> tuple[str, list[list[Any]]]:
    """A served model and valid rows for it, cheap to draw: a seeded pattern with a few drawn values."""
    model = draw(MODEL_ODDS)
    rows = 1 if model == "heavy" else draw(ROWS)
    width = MODELS[model].inputs[0].row_size
    seed = draw(st.integers(0, 2**16))
    data: list[list[Any]] = [[float((seed + 31 * r + 7 * j) % 17) for j in range(width)] for r in range(rows)]
    for r, j, v in draw(ROW_EDITS):
        data[r % rows][j % width] = v
    return model, data


def deep_nesting(rnd: Dice) -> int:
    """Levels of nesting at DEEP: about orjson's serialising limit (254), Python's recursion limit
    (a str() or repr() of it overflows) or orjson's parsing limit (1,024: deeper is malformed)."""
    low, high = rnd.choice([(200, 300), (950, 1023), (1020, 1100)])
    return rnd.randint(low, high)


def bad_rows(draw: st.DrawFn, rnd: Dice, rows: list[list[Any]]) -> Any:
    """Rows made wrong: shape, element types, range, depth, count."""
    choice = rnd.randrange(9)
    if choice == 0:
        return [row[: rnd.randrange(len(row))] for row in rows]  # short rows
    if choice == 1:
        return [row + [1.0] * rnd.randint(1, 3) for row in rows]  # long rows
    if choice == 2:
        return [*rows, rows[0][:-1]]  # ragged
    if choice == 3:  # an element of the wrong type, or nested deeper than the shape
        return [[draw(BAD_ELEMENT), *rows[0][1:]], *rows[1:]]
    if choice == 4:
        return [[rnd.choice([1e39, -1e39, 1e300]), *rows[0][1:]], *rows[1:]]  # out of FP32 range
    if choice == 5:
        return [rows[0]] * rnd.randint(MAX_ROWS + 1, MAX_ROWS + 8)  # too many rows
    if choice == 6:
        return [[DEEP, *rows[0][1:]]]
    if choice == 7:
        return [[row] for row in rows]  # one level too deep
    return draw(NOT_ROWS)  # not a list of rows


def body_mutation(draw: st.DrawFn, rnd: Dice, call: Call) -> None:
    """Whole-body mutations, all refused: not an object, malformed, NaN, too large, raw bytes."""
    choice = rnd.randrange(6)
    raw = call.payload() or b"{}"
    if choice == 0:
        call.body = draw(NOT_AN_OBJECT)
    elif choice == 1:
        call.body = raw[: rnd.randrange(len(raw))]  # truncated
    elif choice == 2:
        call.body = raw.replace(b"]", b", NaN]", 1) if b"]" in raw else b"NaN"
    elif choice == 3:
        call.body = b" " * (8 * 1024 * 1024) + raw  # past RINGSERVE_MAX_BODY_BYTES: 413
    elif choice == 4:
        call.body = draw(NOT_JSON_OBJECT)
    else:
        call.body = b"\xff\xfe" + raw  # not UTF-8
    call.expect = "4xx"


@st.composite
def simple_call(draw: st.DrawFn, method: str, path: str) -> Call:
    model, data = draw(valid_rows())
    single = len(data) == 1 and draw(st.booleans())
    body: dict[str, Any] = {"input": data[0] if single else data}
    if model != "digits" or draw(st.booleans()):
        body["model"] = model
    body.update(draw(SIMPLE_OPTIONAL))
    body.update(draw(SIMPLE_UNKNOWN))
    hdrs = draw(HEADERS)
    rnd = Dice(body, hdrs)
    call = Call(method, path, body, hdrs, model=model, rows=len(data), single=single, keyed=rnd.chance(0.2))
    call.depth = deep_nesting(rnd)
    if rnd.chance(MUTATED):
        call.expect = "4xx"
        choice = rnd.randrange(10)
        f = rnd.choice(["model", "version", "key"])
        if choice == 0:
            body[f] = draw(NOT_A_NAME)
        elif choice == 1:
            body[f] = draw(LONG_NAME)
        elif choice == 2:
            body[rnd.choice([f, "timeout_ms"])] = DEEP
        elif choice == 3:
            body[rnd.choice(["model", "version"])] = rnd.choice(["nope", "2", "digits "])  # 404
        elif choice == 4:
            body["timeout_ms"] = draw(BAD_TIMEOUT)
        elif choice == 5:
            body["input"] = bad_rows(draw, rnd, data)
        elif choice == 6:
            del body["input"]
        elif choice == 7:
            body_mutation(draw, rnd, call)
        elif choice == 8:  # the routing key comes from the header
            body.pop("key", None)
            call.headers["X-Routing-Key"] = draw(LONG_NAME)
        else:  # a random value in a random field: maybe valid, maybe not
            body[rnd.choice([*SIMPLE_FIELDS, "extra"])] = draw(JSON)
            call.expect = "any"
    settle_headers(call, rnd)
    return call


@st.composite
def v2_call(draw: st.DrawFn, method: str, template: str) -> Call:
    model, data = draw(valid_rows())
    spec = MODELS[model].inputs[0]
    tensor: dict[str, Any] = {
        "name": spec.name,
        "datatype": spec.datatype,
        "shape": [len(data), *spec.row_shape],
        "data": data if draw(st.booleans()) else [v for row in data for v in row],
    }
    tensor.update(draw(MAYBE_PARAMETERS))
    params = draw(V2_PARAMS)
    params.update(draw(OTHER_PARAMS))
    output: dict[str, Any] = {"name": MODELS[model].outputs[0].name}
    output.update(draw(MAYBE_PARAMETERS))
    body: dict[str, Any] = {"inputs": [tensor]}
    if draw(st.booleans()):
        body["id"] = draw(TEXT)
    if draw(st.booleans()):
        body["parameters"] = params
    if draw(st.booleans()):
        body["outputs"] = [output] if draw(st.booleans()) else []
    body.update(draw(V2_UNKNOWN))
    hdrs = draw(HEADERS)
    hdrs.pop("Inference-Header-Content-Length", None)  # a JSON body; binary bodies: test_binary.py
    rnd = Dice(body, params, output, hdrs)
    path = template.replace("{model}", model).replace("{version}", "1")
    call = Call(method, path, body, hdrs, model=model, rows=len(data), keyed=rnd.chance(0.2))
    call.outputs, call.id = body.get("outputs") != [], body.get("id")
    call.depth = deep_nesting(rnd)
    if rnd.chance(MUTATED):
        call.expect = "4xx"
        choice = rnd.randrange(15)
        if choice == 0:
            body["id"] = draw(BAD_ID)
        elif choice == 1:
            body["parameters"] = draw(BAD_PARAMETERS)
        elif choice == 2:
            body["parameters"] = {**params, draw(TEXT): draw(NOT_SCALAR)}
        elif choice == 3:
            body["parameters"] = {**params, "routing_key": draw(BAD_KEY)}
        elif choice == 4:
            body["parameters"] = {**params, "timeout": draw(BAD_TIMEOUT)}
        elif choice == 5:
            tensor["name"] = draw(BAD_INPUT_NAME)
        elif choice == 6:
            tensor["datatype"] = draw(BAD_DATATYPE)
        elif choice == 7:
            shape = draw(BAD_SHAPE)
            tensor["shape"] = shape if shape != tensor["shape"] else [*shape, 1]
        elif choice == 8:
            tensor["data"] = bad_rows(draw, rnd, data)
        elif choice == 9:
            tensor["parameters"] = draw(BAD_TENSOR_PARAMETERS)
        elif choice == 10:
            bad_parameters = [{**output, "parameters": {"binary_data": [True]}}]
            body["outputs"] = bad_parameters if rnd.chance(0.2) else draw(BAD_OUTPUTS)
        elif choice == 11:
            body["inputs"] = rnd.choice([[], [tensor, tensor], [tensor, "x"], {"x": 1}, None])
        elif choice == 12:
            body_mutation(draw, rnd, call)
        elif choice == 13:  # a deep value where a scalar belongs
            where, f = rnd.choice([(body, "id"), (body, "parameters"), (params, "routing_key"), (tensor, "name")])
            where[f] = DEEP
            body.setdefault("parameters", params)
        else:  # the routing key comes from the header
            params.pop("routing_key", None)
            call.headers["X-Routing-Key"] = draw(LONG_NAME)
    elif rnd.chance(0.1):  # a random value in a random field: maybe valid, maybe not
        where = rnd.choice([body, tensor])
        where[rnd.choice(sorted(where))] = draw(JSON)
        call.expect = "any"
    if rnd.chance(0.05):  # an unknown model or version in the path
        bad = rnd.choice(["nope", "7", "digits.", "%20"])
        call.path = template.replace("{model}", bad if "{version}" not in template else model)
        call.path = call.path.replace("{version}", bad)
        call.expect = "4xx"
    settle_headers(call, rnd)
    return call


@st.composite
def get_call(draw: st.DrawFn, method: str, template: str) -> Call:
    """Metadata, health, stats, this document: path parameters valid or not, any headers."""
    hdrs = draw(HEADERS)
    query = draw(QUERY)
    rnd = Dice(hdrs, query)
    model = rnd.choice(sorted(MODELS))
    version = "1"
    call = Call(method, template, headers=hdrs, keyed=rnd.chance(0.2))
    if rnd.chance(0.2) and "{" in template:
        odd = draw(ODD_NAME)
        if "{version}" in template and rnd.chance(0.5):
            version = odd
        else:
            model = odd
        # a decoded "/" or a dot segment may reach another route; anything else must be refused
        call.expect = "any" if "/" in odd or odd.strip(".") == "" else "4xx"
    call.path = template.replace("{model}", quote(model, safe="")).replace("{version}", quote(version, safe=""))
    call.model = model
    if rnd.chance(0.5):
        call.path += "?" + urlencode(query)
    if rnd.chance(0.25):
        call.body = draw(ANYTHING)
    if rnd.chance(0.1):
        call.method = rnd.choice([m for m in METHODS if m != method])
        call.expect = "4xx"
    if call.keyed and not template.startswith("/v2/health/") and rnd.chance(0.25):
        call.headers.pop("X-API-Key", None)
        call.headers["Authorization"] = "Bearer " + draw(WRONG_KEY)
        call.expect = "4xx"
    settle_headers(call, rnd)
    return call


def heavy_call(method: str, template: str) -> Call:
    """A valid one-row request for ``heavy``."""
    spec = MODELS["heavy"].inputs[0]
    row = [float(j % 17) for j in range(spec.row_size)]
    if template == "/infer":
        return Call(method, template, {"model": "heavy", "input": row}, model="heavy", rows=1, single=True)
    tensor = {"name": spec.name, "datatype": spec.datatype, "shape": [1, *spec.row_shape], "data": row}
    path = template.replace("{model}", "heavy").replace("{version}", "1")
    return Call(method, path, {"inputs": [tensor]}, model="heavy", rows=1)


def check_ok(template: str, call: Call, body: Any) -> None:
    """A 200's body has the shape its operation promises."""
    if template == "/infer":
        width = MODELS[call.model].outputs[0].row_size
        out = body["output"]
        assert body["model"] == call.model and body["version"] == "1" and isinstance(body["node"], str)
        assert len(out) == width if call.single else [len(r) for r in out] == [width] * call.rows
    elif template in INFER_PATHS:
        spec = MODELS[call.model].outputs[0]
        assert body["model_name"] == call.model and body["model_version"] == "1" and body.get("id") == call.id
        expected = [(spec.name, spec.datatype, [call.rows, *spec.row_shape], call.rows * spec.row_size)]
        assert [(o["name"], o["datatype"], o["shape"], len(o["data"])) for o in body["outputs"]] == (
            expected if call.outputs else []
        )
    elif template.endswith("/ready") and "{model}" in template:
        assert body == {"name": call.model, "version": "1", "ready": True}
    elif "{model}" in template:
        assert body["name"] == call.model and body["inputs"] == [t.as_json() for t in MODELS[call.model].inputs]
    else:
        expected_body: dict[str, Any] = {
            "/v2": {"name": "ringserve", "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]},
            "/v2/health/live": {"live": True},
            "/v2/health/ready": {"ready": True},
            "/openapi.json": DOC_JSON,
        }
        if template == "/stats":
            assert set(body) >= {"members", "requests_per_node", "errors_by_status"}
        else:
            assert body == expected_body[template]


@pytest.fixture
def clients(
    client: FlaskClient, shared_cluster: Cluster, app_factory: Callable[[Settings], Flask]
) -> dict[bool, FlaskClient]:
    """The plain gateway, and one on the same workers that wants an API key."""
    keyed = Settings(**{**shared_cluster.settings.__dict__, "api_keys": (API_KEY,)})
    return {False: client, True: app_factory(keyed).test_client()}


def test_openapi_lists_every_route(client: FlaskClient) -> None:
    routes = {
        (m, r.rule.replace("<", "{").replace(">", "}"))
        for r in client.application.url_map.iter_rules()
        for m in r.methods or ()
        if m in METHODS and r.endpoint != "static"
    }
    assert routes == set(OPERATIONS)
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.json == DOC_JSON
    assert DOC["openapi"].startswith("3.1") and all(name in DOC["info"]["description"] for name in MODELS)
    for method, path in OPERATIONS:
        responses = DOC["paths"][path][method.lower()]["responses"]
        assert "405" in responses and ("401" in responses) != path.startswith("/v2/health/")


@pytest.mark.parametrize(("method", "template"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz(clients: dict[bool, FlaskClient], method: str, template: str) -> None:
    if template == "/infer":
        calls = simple_call(method, template)
    elif template in INFER_PATHS:
        calls = v2_call(method, template)
    else:
        calls = get_call(method, template)
    documented = {int(s) for s in DOC["paths"][template][method.lower()]["responses"]}
    counts: Counter[str] = Counter()
    statuses: Counter[int] = Counter()

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(calls)
    def send(call: Call) -> None:
        client = clients[call.keyed]
        with recursion_limit(SERVER_RECURSION_LIMIT):
            response = client.open(call.path, method=call.method, data=call.payload(), headers=call.headers)
        status = response.status_code
        counts["sent"] += 1
        statuses[status] += 1
        assert status < 500, (call, response.get_data()[:300])
        if template == "/metrics" and status == 200:  # the one answer that is not JSON: Prometheus text
            assert "nv_inference_request_success" in response.get_data(as_text=True)
            counts["valid 200"] += 1
            return
        assert response.is_json, (call, status)
        body: Any = response.json
        assert status in documented or (status == 405 and call.method != method), (call, status, body)
        if status >= 400:
            assert isinstance(body["error"], str) and body["error"], (call, body)
        if call.expect == "ok":
            assert status == 200, (call, body)
            check_ok(template, call, body)
            counts["valid 200"] += 1
            counts["heavy"] += call.model == "heavy"
        elif call.expect == "4xx":
            assert 400 <= status < 500, (call, status, body)

    if template in INFER_PATHS:  # heavy is slow and drawn rarely: make sure it is served
        send = example(heavy_call(method, template))(send)
    send()
    print(f"{method} {template}: sent {counts['sent']}, valid 200 {counts['valid 200']}, {sorted(statuses.items())}")
    assert counts["sent"] >= EXAMPLES
    assert not [s for s in statuses if s >= 500]
    if template in INFER_PATHS:
        print(f"  valid 200 share {counts['valid 200'] / counts['sent']:.0%}; heavy 200s {counts['heavy']}")
        assert counts["valid 200"] >= VALID_SHARE * counts["sent"] and counts["heavy"] > 0
