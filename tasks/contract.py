"""The wire contract: everything that crosses Redis between gateways and workers, as types.

Both sides import this module and nothing else of each other's, so a name or a field is
spelled once. Every ``decode_*`` validates what it reads and raises :class:`ContractError`
(nothing else) for anything that is not a well-formed message of :data:`CONTRACT_VERSION`:
bytes read from Redis are untrusted, whoever wrote them.

A Celery message of task :data:`TASK_NAME` carries one *envelope* (its only argument)::

    envelope = {"v": 2, "reply_to": "<reply list key>", "items": [item, ...]}
    item     = {"id": str, "model": str, "version": str, "budget_ms": float, "inputs": [tensor, ...]}
    tensor   = [name, datatype, shape, raw little-endian row-major bytes]

``budget_ms`` is the time the request has left when it is sent: the receiver turns it into a
deadline on its own monotonic clock, so no two hosts' clocks are ever compared.

A worker answers on ``reply_to`` with one msgpack blob per batch and gateway::

    blob   = {"v": 2, "replies": [reply, ...]}
    reply  = {"id": str, "node": str, "batch_size": int, "version": str, "outputs": [tensor, ...]}
           | {"id": str, "node": str, "error": kind, "message": str}

Membership announcements (``ringserve:member:<node id>``) are JSON, see :class:`Announcements`;
so are the workers' reports of the table rows they hold (``ringserve:shards:<node id>``), see
:class:`ShardStatus`, and of the model versions they serve (``ringserve:versions:<node id>``).
"""

from __future__ import annotations

import base64
import bisect
import dataclasses
import enum
import functools
import json
import logging
import math
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import orjson

from hashing.membership import Member

log = logging.getLogger(__name__)

CONTRACT_VERSION = 2

TASK_NAME = "ringserve.infer"
QUEUE_PREFIX = "ringserve."
KEY_PREFIX = "ringserve:"

MEMBERS_KEY = KEY_PREFIX + "members"  # set of node ids that ever announced themselves
GATEWAYS_KEY = KEY_PREFIX + "gateways"  # set of gateway process ids that reported a load
STATS_ROUTED_KEY = KEY_PREFIX + "stats:routed"  # hash node -> requests routed to it
STATS_SPILLED_KEY = KEY_PREFIX + "stats:spilled"  # hash node -> requests bounded loads sent past their owner
STATS_BATCHES_KEY = KEY_PREFIX + "stats:batch_sizes"  # hash rows-per-forward -> count
STATS_ERRORS_KEY = KEY_PREFIX + "stats:errors"  # hash HTTP status -> count
STATS_EXPIRED_KEY = KEY_PREFIX + "stats:expired"  # hash node -> requests skipped, deadline passed
STATS_DROPPED_KEY = KEY_PREFIX + "stats:dropped"  # hash node id or "gateways" -> messages dropped

MAX_NAME_CHARS = 256  # ids, model names, versions, tensor names, reply list keys
MAX_TENSORS = 64
MAX_VERSIONS = 1024  # per model, in a worker's versions report
MAX_RANK = 8


def queue_name(node_id: str) -> str:
    """The Celery queue (a Redis list) that only worker ``node_id`` consumes."""
    return QUEUE_PREFIX + node_id


def member_key(node_id: str) -> str:
    """Announcement of a live worker; it expires unless the worker refreshes it."""
    return KEY_PREFIX + "member:" + node_id


GATEWAY_LOAD_PREFIX = KEY_PREFIX + "load:"  # + gateway process id: see gateway_load_key


def gateway_load_key(gateway_id: str) -> str:
    """Hash node -> rows one gateway process has in flight there (expires unless refreshed)."""
    return GATEWAY_LOAD_PREFIX + gateway_id


def shard_status_key(node_id: str) -> str:
    """Where a worker reports the sharded table rows it holds (JSON, expires with its announcement)."""
    return f"{KEY_PREFIX}shards:{node_id}"


def versions_key(node_id: str) -> str:
    """Where a worker reports the model versions it serves (JSON, expires with its announcement)."""
    return f"{KEY_PREFIX}versions:{node_id}"


def reply_key(gateway_id: str) -> str:
    """The list on which workers push results for one gateway process."""
    return KEY_PREFIX + "reply:" + gateway_id


# The response cache (app/cache.py); only gateways read and write it.
CACHE_PREFIX = KEY_PREFIX + "cache:"
CACHE_ENTRY_PREFIX = CACHE_PREFIX + "entry:"  # + digest: a cached answer, or the lock of the request computing it
CACHE_LOCK_PREFIX = b"lock:"  # an entry holding this + a token is being computed (never a msgpack map)
CACHE_INDEX_KEY = CACHE_PREFIX + "index"  # sorted set digest -> when it was stored (ms, Redis's clock)
CACHE_SIZES_KEY = CACHE_PREFIX + "sizes"  # hash digest -> the bytes its entry counts against the budget
CACHE_BYTES_KEY = CACHE_PREFIX + "bytes"  # the sum of CACHE_SIZES_KEY
STATS_CACHE_KEY = KEY_PREFIX + "stats:cache"  # hash hits / coalesced / misses -> requests


def lacks_command(exc: Exception) -> bool:
    """Whether a Redis error says the server does not know the command (it predates it): the one
    refusal after which gateways and workers fall back to older commands (``BLMPOP`` came in 7.0)."""
    return "unknown command" in str(exc).lower()


def cache_entry_key(digest: str) -> str:
    return CACHE_ENTRY_PREFIX + digest


def cache_waiting_key(token: str) -> str:
    """Set by requests waiting for the computation that holds lock ``token``: its end is then announced."""
    return CACHE_PREFIX + "waiting:" + token


def cache_done_key(token: str) -> str:
    """A stream that gets one entry when the computation holding lock ``token`` ends (stored or failed)."""
    return CACHE_PREFIX + "done:" + token


def node_id_from_hostname(hostname: str) -> str:
    """Celery names a worker ``worker_1@host``; the ring knows it as ``worker_1``."""
    return hostname.split("@", 1)[0]


class Datatype(NamedTuple):
    """How one Open Inference Protocol datatype travels: array typecode and numpy dtype."""

    typecode: str  # for the standard library's ``array`` (gateway side)
    numpy: str  # for ``numpy.frombuffer`` (worker side)
    itemsize: int


DATATYPES: dict[str, Datatype] = {
    "BOOL": Datatype("b", "?", 1),
    "UINT8": Datatype("B", "u1", 1),
    "INT8": Datatype("b", "i1", 1),
    "INT16": Datatype("h", "i2", 2),
    "INT32": Datatype("i", "i4", 4),
    "INT64": Datatype("q", "i8", 8),
    "FP32": Datatype("f", "f4", 4),
    "FP64": Datatype("d", "f8", 8),
}


class ContractError(ValueError):
    """Something read from Redis is not a valid message of this contract."""


class ErrorKind(enum.Enum):
    """Why a worker could not answer a request: the HTTP status it maps to, and what it says
    about the worker's health (``verdict`` for its circuit breaker: False is the worker's own
    fault, True shows it working, None says nothing).
    """

    BAD_INPUT = ("bad_input", 400, True)
    UNKNOWN_MODEL = ("unknown_model", 404, True)
    EXPIRED = ("expired", 504, None)  # the deadline passed before the worker got to it
    INFERENCE_FAILED = ("inference_failed", 500, False)

    def __init__(self, wire: str, status: int, verdict: bool | None) -> None:
        self.wire = wire
        self.status = status
        self.verdict = verdict


_KINDS = {k.wire: k for k in ErrorKind}


@dataclass(frozen=True, slots=True)
class Tensor:
    """A tensor as it travels: ``shape[0]`` rows, ``data`` raw little-endian, row-major."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes

    def wire(self) -> list[Any]:
        return [self.name, self.datatype, list(self.shape), self.data]


@dataclass(frozen=True, slots=True)
class Item:
    """One request: the rows of one model version, and the time it has left."""

    id: str
    model: str
    version: str
    budget_ms: float
    inputs: tuple[Tensor, ...]

    @property
    def rows(self) -> int:
        return self.inputs[0].shape[0]

    def wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "budget_ms": self.budget_ms,
            "inputs": [t.wire() for t in self.inputs],
        }


@dataclass(frozen=True, slots=True)
class BadItem:
    """An item that did not decode; ``id`` is set when it could still be read (to answer 400)."""

    id: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class Envelope:
    reply_to: str
    items: tuple[Item | BadItem, ...]


@dataclass(frozen=True, slots=True)
class Result:
    id: str
    node: str
    batch_size: int
    version: str
    outputs: tuple[Tensor, ...]


@dataclass(frozen=True, slots=True)
class Failure:
    id: str
    node: str
    kind: ErrorKind
    message: str


Reply = Result | Failure


# -- validation helpers ---------------------------------------------------------------------


def _name(value: Any, what: str) -> str:
    if type(value) is not str or not value or len(value) > MAX_NAME_CHARS:
        raise ContractError(f"{what} must be a string of 1 to {MAX_NAME_CHARS} characters")
    return value


def _int(value: Any, what: str) -> int:
    if type(value) is not int:
        raise ContractError(f"{what} must be an integer")
    return value


def _map(value: Any, what: str) -> dict[Any, Any]:
    if type(value) is not dict:
        raise ContractError(f"{what} must be a map, got {type(value).__name__}")
    return value


def _list(value: Any, what: str, most: int) -> list[Any]:
    if type(value) is not list or not value or len(value) > most:
        raise ContractError(f"{what} must be a list of 1 to {most} entries")
    return value


def _version(body: dict[Any, Any], what: str) -> None:
    v = body.get("v")
    if v != CONTRACT_VERSION:
        raise ContractError(f"{what} of contract version {v!r}; this process speaks {CONTRACT_VERSION}")


def _json_message(raw: bytes | str, what: str) -> dict[Any, Any]:
    """A JSON object of this contract version."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        raise ContractError(f"{what} is not JSON: {type(exc).__name__}") from None
    body = _map(body, what)
    _version(body, what)
    return body


def _tensor(value: Any) -> Tensor:
    if type(value) is not list or len(value) != 4:
        raise ContractError("a tensor must be [name, datatype, shape, data]")
    name, datatype, shape, data = value
    _name(name, "tensor name")
    if datatype not in DATATYPES:
        raise ContractError(f"tensor {name!r}: unknown datatype {datatype!r}")
    dims = tuple(_int(d, f"tensor {name!r} shape") for d in _list(shape, f"tensor {name!r} shape", MAX_RANK))
    if dims[0] < 1 or any(d < 0 for d in dims):
        raise ContractError(f"tensor {name!r}: shape {list(dims)} has no rows or a negative dimension")
    if type(data) is not bytes or len(data) != math.prod(dims) * DATATYPES[datatype].itemsize:
        raise ContractError(f"tensor {name!r}: data is not {list(dims)} {datatype} values")
    return Tensor(name, datatype, dims, data)


def _tensors(value: Any, what: str) -> tuple[Tensor, ...]:
    tensors = tuple(_tensor(t) for t in _list(value, what, MAX_TENSORS))
    if len({t.shape[0] for t in tensors}) != 1:
        raise ContractError(f"{what} differ in their number of rows")
    return tensors


# -- envelopes (gateway -> worker) ----------------------------------------------------------


def encode_envelope(reply_to: str, items: list[Item]) -> dict[str, Any]:
    """The argument of one task message (Celery serialises it with msgpack)."""
    return {"v": CONTRACT_VERSION, "reply_to": reply_to, "items": [i.wire() for i in items]}


_NO_CALLBACKS = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_TASK_HEADERS: dict[str, Any] = {
    "lang": "py",
    "task": TASK_NAME,
    "shadow": None,
    "eta": None,
    "expires": None,
    "group": None,
    "group_index": None,
    "retries": 0,
    "timelimit": [None, None],
    "parent_id": None,
    "argsrepr": "",
    "kwargsrepr": "",
    "ignore_result": False,
    "replaced_task_nesting": 0,
    "stamped_headers": None,
    "stamps": {},
}


def encode_task_message(queue: str, envelope: dict[str, Any], origin: str) -> bytes:
    """One task message of :data:`TASK_NAME` carrying ``envelope``, as kombu's Redis transport
    stores it in the list ``queue`` (``LPUSH``): Celery's task protocol 2, body in msgpack.

    Byte for byte what ``Celery.send_task`` writes (a test compares them), but built from a
    template: Celery's own path (routing, a producer, kombu's serializer registry and
    ``Message`` objects) costs several times more CPU per message. Any ordinary
    ``celery worker``, Flower and ``celery inspect`` read it as their own.
    """
    task_id = str(uuid.uuid4())
    body = msgpack.packb([[envelope], {}, _NO_CALLBACKS])
    return orjson.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "binary",
            "content-type": "application/x-msgpack",
            "headers": {**_TASK_HEADERS, "id": task_id, "root_id": task_id, "origin": origin},
            "properties": {
                "correlation_id": task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def decode_item(value: Any) -> Item:
    body = _map(value, "an item")
    budget: Any = body.get("budget_ms")
    if type(budget) not in (int, float) or not math.isfinite(budget):
        raise ContractError("budget_ms must be a finite number")
    return Item(
        _name(body.get("id"), "id"),
        _name(body.get("model"), "model"),
        _name(body.get("version"), "version"),
        float(budget),
        _tensors(body.get("inputs"), "inputs"),
    )


def decode_envelope(value: Any) -> Envelope:
    """An envelope whose header is valid; each of its items decoded on its own.

    A bad header (no reply list, wrong version) raises: nobody could be answered. A bad item
    becomes a :class:`BadItem`, so its batch-mates are still served.
    """
    body = _map(value, "an envelope")
    _version(body, "an envelope")
    reply_to = _name(body.get("reply_to"), "reply_to")
    if not reply_to.startswith(KEY_PREFIX + "reply:"):
        raise ContractError(f"reply_to {reply_to[:80]!r} is not a reply list")
    raw_items = body.get("items")
    if type(raw_items) is not list:
        raise ContractError("items must be a list")
    items: list[Item | BadItem] = []
    for raw in raw_items:
        try:
            items.append(decode_item(raw))
        except ContractError as exc:
            item_id = raw.get("id") if type(raw) is dict else None
            ok_id = type(item_id) is str and 0 < len(item_id) <= MAX_NAME_CHARS
            items.append(BadItem(item_id if ok_id else None, str(exc)))
    return Envelope(reply_to, tuple(items))


# -- replies (worker -> gateway) ------------------------------------------------------------


def _reply_wire(reply: Reply) -> dict[str, Any]:
    if isinstance(reply, Result):
        return {
            "id": reply.id,
            "node": reply.node,
            "batch_size": reply.batch_size,
            "version": reply.version,
            "outputs": [t.wire() for t in reply.outputs],
        }
    return {"id": reply.id, "node": reply.node, "error": reply.kind.wire, "message": reply.message}


def encode_replies(replies: list[Reply]) -> bytes:
    return msgpack.packb({"v": CONTRACT_VERSION, "replies": [_reply_wire(r) for r in replies]})


def decode_reply(value: Any) -> Reply:
    body = _map(value, "a reply")
    reply_id = _name(body.get("id"), "id")
    node = _name(body.get("node"), "node")
    if "error" in body:
        kind = _KINDS.get(body["error"]) if type(body["error"]) is str else None
        message = body.get("message")
        if kind is None or type(message) is not str:
            raise ContractError("an error reply needs a known error kind and a message")
        return Failure(reply_id, node, kind, message[:1000])
    batch_size = _int(body.get("batch_size"), "batch_size")
    if batch_size < 1:
        raise ContractError("batch_size must be positive")
    version = _name(body.get("version"), "version")
    return Result(reply_id, node, batch_size, version, _tensors(body.get("outputs"), "outputs"))


def decode_replies(blob: bytes | str) -> tuple[list[Reply], list[str]]:
    """The valid replies of one blob, and why each of the others was refused.

    A blob that is not a msgpack map of this contract version raises.
    """
    try:
        body = msgpack.unpackb(blob)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ContractError(f"not msgpack: {type(exc).__name__}") from None
    body = _map(body, "a reply blob")
    _version(body, "a reply blob")
    raw_replies = body.get("replies")
    if type(raw_replies) is not list:
        raise ContractError("replies must be a list")
    replies: list[Reply] = []
    refused: list[str] = []
    for raw in raw_replies:
        try:
            replies.append(decode_reply(raw))
        except ContractError as exc:
            refused.append(str(exc))
    return replies, refused


# -- counters ------------------------------------------------------------------------------


def decode_counts(raw: dict[bytes, bytes]) -> dict[str, int]:
    """A hash of counters (``HGETALL``); fields whose value is not an integer are skipped."""
    return {k.decode(errors="replace"): int(v) for k, v in raw.items() if v.lstrip(b"-").isdigit()}


# -- the response cache ----------------------------------------------------------------------


def encode_cached(result: Result) -> bytes:
    """A result as the response cache stores it: the reply without its request id, every output."""
    wire = _reply_wire(result)
    del wire["id"]
    return msgpack.packb({"v": CONTRACT_VERSION, **wire})


def decode_cached(blob: bytes, result_id: str) -> Result:
    """A cached result, validated like a worker's reply, answering request ``result_id``; raises ContractError."""
    try:
        body = msgpack.unpackb(blob)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ContractError(f"not msgpack: {type(exc).__name__}") from None
    body = _map(body, "a cached result")
    _version(body, "a cached result")
    if "error" in body:
        raise ContractError("a cached result is never an error")
    reply = decode_reply({**body, "id": result_id})
    assert isinstance(reply, Result)  # no "error": decode_reply gives a Result or raises
    return reply


# -- sharded tables ------------------------------------------------------------------------

WHOLE_TABLE = "*"  # a ShardStatus.ring that holds every row (a worker with sharding off)


@dataclass(frozen=True)
class ShardStatus:
    """What one worker holds of one sharded table, as it counted it.

    ``ring``: the digest of the ring view (:func:`hashing.shards.ring_digest`) whose rows it
    has finished loading, or :data:`WHOLE_TABLE`. ``loaded`` and ``dropped`` are cumulative
    rows; ``read_through``: rows it served from the table file because it did not hold them;
    ``load_s``: how long its last load took.
    """

    ring: str
    held: int
    loaded: int
    dropped: int
    read_through: int
    load_s: float

    def wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def shard_table_name(model: str, version: str) -> str:
    """How a report names a model version's sharded table: ``"ranker/1"``."""
    return f"{model}/{version}"


def encode_shard_statuses(statuses: dict[str, ShardStatus]) -> bytes:
    return json.dumps({"v": CONTRACT_VERSION, "tables": {n: s.wire() for n, s in statuses.items()}}).encode()


def decode_shard_statuses(raw: bytes | str) -> dict[str, ShardStatus]:
    """A worker's report, validated; raises ContractError."""
    body = _json_message(raw, "a shard report")
    statuses: dict[str, ShardStatus] = {}
    for name, entry in _map(body.get("tables"), "tables").items():
        entry = _map(entry, "a table's report")
        load_s: Any = entry.get("load_s")
        try:
            load_s = float(load_s) if type(load_s) in (int, float) else math.nan
        except OverflowError:  # an integer beyond any float
            load_s = math.nan
        if not (math.isfinite(load_s) and load_s >= 0):
            raise ContractError("load_s must be a finite number >= 0")
        held, loaded, dropped, read_through = (
            _int(entry.get(k), k) for k in ("held", "loaded", "dropped", "read_through")
        )
        if min(held, loaded, dropped, read_through) < 0:
            raise ContractError("row counts must be >= 0")
        ring = _name(entry.get("ring"), "ring")
        statuses[_name(name, "a table name")] = ShardStatus(ring, held, loaded, dropped, read_through, load_s)
    return statuses


# -- served versions -----------------------------------------------------------------------


def encode_served_versions(served: dict[str, list[str]]) -> bytes:
    """``{"v": 2, "models": {"digits": ["1", "2"]}}``: the versions a worker has loaded."""
    return json.dumps({"v": CONTRACT_VERSION, "models": served}).encode()


def decode_served_versions(raw: bytes | str) -> dict[str, set[str]]:
    """A worker's report of its versions, validated; raises ContractError."""
    body = _json_message(raw, "a versions report")
    served: dict[str, set[str]] = {}
    for model, versions in _map(body.get("models"), "models").items():
        listed = _list(versions, "a model's versions", MAX_VERSIONS)
        served[_name(model, "a model name")] = {_name(v, "a version") for v in listed}
    return served


# -- membership announcements ---------------------------------------------------------------

NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Announcements:
    """How membership is spelled in Redis: the keys, and the announcement as versioned JSON.

    ``{"v": 2, "weight": 1.0, "incarnation": "<hex>", "heartbeat_ms": 500, "ttl_ms": 4000}``. Node ids match
    :data:`NODE_ID_PATTERN` (1-64 characters: letters, digits, ``_``, ``.``, ``-``); the
    weight's bounds are :class:`hashing.membership.Member`'s.
    """

    members_key = MEMBERS_KEY

    @staticmethod
    def member_key(node_id: str) -> str:
        return member_key(node_id)

    @staticmethod
    def valid_node_id(node_id: str) -> bool:
        return NODE_ID_PATTERN.fullmatch(node_id) is not None

    @staticmethod
    def encode(member: Member) -> bytes:
        body = {
            "v": CONTRACT_VERSION,
            "weight": member.weight,
            "incarnation": member.incarnation,
            "heartbeat_ms": member.heartbeat_ms,
            "ttl_ms": member.ttl_ms,
        }
        return json.dumps(body).encode()

    @staticmethod
    def decode(raw: bytes) -> Member:
        body = _json_message(raw, "an announcement")
        weight: Any = body.get("weight")
        if type(weight) not in (int, float):
            raise ContractError("weight must be a number")
        heartbeat_ms, ttl_ms = body.get("heartbeat_ms"), body.get("ttl_ms")
        if type(heartbeat_ms) is not int or type(ttl_ms) is not int:
            raise ContractError("heartbeat_ms and ttl_ms must be integers")
        try:
            return Member(float(weight), _name(body.get("incarnation"), "incarnation"), heartbeat_ms, ttl_ms)
        except ValueError as exc:
            raise ContractError(str(exc)) from None


ANNOUNCEMENTS = Announcements()


# -- what does not decode -------------------------------------------------------------------


class Drops:
    """Counts messages dropped because they did not decode, and logs them without flooding.

    Each reason is logged at most once per ``log_every_s``, with how many were dropped since;
    :meth:`take` hands the counts over (to be added to :data:`STATS_DROPPED_KEY`).
    """

    def __init__(self, where: str, log_every_s: float = 1.0) -> None:
        self._where = where
        self._log_every_s = log_every_s
        self._lock = threading.Lock()
        self._untaken = 0
        self._total = 0
        self._since_logged: Counter[str] = Counter()
        self._logged_at: dict[str, float] = {}

    @property
    def total(self) -> int:
        return self._total

    def drop(self, what: str, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._untaken += 1
            self._total += 1
            self._since_logged[what] += 1
            if now - self._logged_at.get(what, -math.inf) < self._log_every_s:
                return
            self._logged_at[what] = now
            count = self._since_logged.pop(what)
        log.warning("%s: dropped %d %s (%s)", self._where, count, what, reason[:300])

    def take(self) -> int:
        with self._lock:
            taken, self._untaken = self._untaken, 0
            return taken


# -- metrics ----------------------------------------------------------------------------------
#
# /metrics (app/metrics.py) sums what every gateway process and every worker counted, on any
# host, from Redis. Counters live in one hash (:data:`METRICS_KEY`) that gateways add their
# flushes to and workers their batches to; gauges only a live process can vouch for (its
# requests pending, its open breakers) in one expiring hash per gateway process. A field is one
# series: its name and label values as a JSON array, ``["nv_inference_count", "digits", "1"]``;
# its value a non-negative integer (durations in whole microseconds).

METRICS_KEY = KEY_PREFIX + "metrics"  # hash: series -> total, added to by every gateway and worker
METRICS_GATEWAYS_KEY = KEY_PREFIX + "metrics:gateways"  # set of gateway process ids that reported gauges

# Upper bounds (seconds) of the latency histograms' buckets; a bucket's count is stored on its
# own (not cumulative) under the label ``le``, and what exceeds the last bound under "+Inf".
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATENCY_LE = (*(f"{b:g}" for b in LATENCY_BUCKETS_S), "+Inf")

_MODEL = ("model", "version")
SERIES_LABELS: dict[str, tuple[str, ...]] = {
    # Triton's names (gateways count requests; workers count what they computed)
    "nv_inference_request_success": _MODEL,
    "nv_inference_request_failure": (*_MODEL, "reason"),
    "nv_inference_count": _MODEL,
    "nv_inference_exec_count": _MODEL,
    "nv_inference_request_duration_us": _MODEL,
    "nv_inference_queue_duration_us": _MODEL,
    "nv_inference_compute_infer_duration_us": _MODEL,
    "nv_inference_pending_request_count": _MODEL,  # a gauge, in the gateways' reports
    "nv_cache_num_hits_per_model": _MODEL,
    "nv_cache_num_misses_per_model": _MODEL,
    # ringserve's own
    "ringserve_requests_resent": ("cause",),
    "ringserve_requests_refused_for_memory": (),
    "ringserve_breaker_open": ("node",),  # a gauge, in the gateways' reports: 1 while not closed
    "ringserve_request_duration_seconds_bucket": (*_MODEL, "le"),
    "ringserve_request_duration_seconds_sum_us": _MODEL,
    "ringserve_queue_wait_seconds_bucket": (*_MODEL, "le"),
    "ringserve_batch_compute_seconds_bucket": (*_MODEL, "le"),
    "ringserve_batch_compute_seconds_sum_us": _MODEL,
}


class Series(NamedTuple):
    """One counter or gauge: its name and its label values, in :data:`SERIES_LABELS` order."""

    name: str
    labels: tuple[str, ...]

    def field(self) -> str:
        return json.dumps([self.name, *self.labels], separators=(",", ":"))


@functools.lru_cache(maxsize=4096)
def series_field(name: str, *labels: str) -> str:
    """The hash field of a series, memoised: counting a request or a batch encodes no JSON."""
    return Series(name, labels).field()


def latency_le(seconds: float) -> str:
    """The ``le`` of the latency bucket that counts ``seconds``."""
    return LATENCY_LE[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)]


def metrics_gauges_key(gateway_id: str) -> str:
    """Hash series -> value: one gateway process's gauges; it expires unless that process refreshes it."""
    return KEY_PREFIX + "metrics:gauges:" + gateway_id


def metrics_flushed_key(gateway_id: str) -> str:
    """The number of one gateway process's last applied counter flush, so that a retried flush adds once."""
    return KEY_PREFIX + "metrics:flushed:" + gateway_id


def decode_series(field: bytes, value: bytes) -> tuple[Series, int]:
    """One hash entry of :data:`METRICS_KEY` or a gauge report, validated; raises ContractError."""
    try:
        body = json.loads(field)
    except (ValueError, RecursionError):
        raise ContractError("a series that is not JSON") from None
    if type(body) is not list or not body or type(body[0]) is not str or body[0] not in SERIES_LABELS:
        raise ContractError("a series of no known name")
    name, labels = body[0], tuple(body[1:])
    if len(labels) != len(SERIES_LABELS[name]):
        raise ContractError(f"{name}: {len(labels)} label values for {len(SERIES_LABELS[name])} labels")
    if any(type(label) is not str or len(label) > MAX_NAME_CHARS for label in labels):
        raise ContractError(f"{name}: a label value that is not a string of at most {MAX_NAME_CHARS} characters")
    if name.endswith("_bucket") and labels[-1] not in LATENCY_LE:
        raise ContractError(f"{name}: no bucket le={labels[-1][:20]!r}")
    if not value.isdigit():
        raise ContractError(f"{name}: {value[:20]!r} is not a count")
    return Series(name, labels), int(value)
