"""Every knob of ringserve, read from ``RINGSERVE_*`` environment variables in one place.

The gateway and the workers both build a :class:`Settings`; tests build their own and
hand them in (``create_app(settings)``, ``make_celery(settings)``). Names carry units.
This module imports only the standard library so that any process may use it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

ENV_PREFIX = "RINGSERVE_"

REDIS_URL = "redis://127.0.0.1:6390/0"
MODEL_REPOSITORY = str(Path(__file__).resolve().parent.parent / "models")
DEFAULT_MODEL = "digits"
VNODES = 150
NODE_WEIGHT = 1.0
MAX_BATCH_SIZE = 32
MAX_DELAY_MS = 20
BATCH_IDLE_MS = 2.0
REQUEST_TIMEOUT_MS = 10_000
LOAD_FACTOR = 1.25
MAX_IN_FLIGHT_PER_WORKER = 1024
BREAKER_FAILURES = 5
BREAKER_COOLDOWN_MS = 5_000
MAX_BODY_BYTES = 8 * 1024 * 1024
MEMBER_TTL_MS = 4_000
HEARTBEAT_MS = 500
RING_REFRESH_MS = 250
REPLY_TTL_S = 60
QUEUE_GRACE_S = 60
PREFETCH_MESSAGES = 256
SHARD_GRACE_MS = 2_000
SHARD_SETTLE_MS = 1_000
CACHE_TTL_S = 300  # a cached answer lives this long
CACHE_MAX_BYTES = 64 * 1024 * 1024  # what the response cache may hold in Redis, entries' overhead included
REPOSITORY_POLL_MS = 1_000
VERSION_GRACE_MS = 15_000


@dataclass(frozen=True)
class Settings:
    """Configuration shared by gateways and workers; see README "Configuration"."""

    redis_url: str = field(default=REDIS_URL, repr=False)  # holds the password once read from its file
    redis_password_file: str = ""
    model_repository: str = MODEL_REPOSITORY
    default_model: str = DEFAULT_MODEL
    vnodes: int = VNODES
    node_id: str = ""
    node_weight: float = NODE_WEIGHT
    max_batch_size: int = MAX_BATCH_SIZE
    max_delay_ms: int = MAX_DELAY_MS
    batch_idle_ms: float = BATCH_IDLE_MS
    request_timeout_ms: int = REQUEST_TIMEOUT_MS
    load_factor: float = LOAD_FACTOR
    gateway_processes: int = 1  # granian's processes on this host: each keeps a worker within its part of a batch
    max_in_flight_per_worker: int = MAX_IN_FLIGHT_PER_WORKER
    breaker_failures: int = BREAKER_FAILURES
    breaker_cooldown_ms: int = BREAKER_COOLDOWN_MS
    max_body_bytes: int = MAX_BODY_BYTES
    member_ttl_ms: int = MEMBER_TTL_MS
    heartbeat_ms: int = HEARTBEAT_MS
    ring_refresh_ms: int = RING_REFRESH_MS
    reply_ttl_s: int = REPLY_TTL_S
    queue_grace_s: int = QUEUE_GRACE_S
    prefetch_messages: int = PREFETCH_MESSAGES
    sharding: bool = True  # off: a worker holds whole tables (the unsharded baseline)
    shard_settle_ms: int = SHARD_SETTLE_MS  # membership must hold still this long before a load
    shard_grace_ms: int = SHARD_GRACE_MS  # rows a worker no longer owns are kept this long
    metrics: bool = True  # off: gateways and workers count nothing for /metrics (which then answers 404)
    task_events: bool = True  # workers send Celery task events per message, so that Flower lists the work
    repository_poll_ms: int = REPOSITORY_POLL_MS  # gateways and workers rescan the model repository; 0: never
    version_grace_ms: int = VERSION_GRACE_MS  # a worker still answers a version removed from the repository
    api_keys: tuple[str, ...] = field(default_factory=tuple, repr=False)
    cache: bool = True  # the response cache, for models whose config allows it (see app/cache.py)
    cache_ttl_s: int = CACHE_TTL_S
    cache_max_bytes: int = CACHE_MAX_BYTES
    cache_redis_url: str = field(default="", repr=False)  # the cache's own Redis; empty: redis_url

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``RINGSERVE_<FIELD>`` variables; ``overrides`` (e.g. CLI flags) win."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, raw, f.default)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]
        if settings.redis_password_file:
            password = Path(settings.redis_password_file).read_text().strip()
            settings = dataclasses.replace(settings, redis_url=with_password(settings.redis_url, password))
        return settings


def with_password(url: str, password: str) -> str:
    """``url`` authenticating with ``password`` (kept out of every command line and file but its own)."""
    parts = urlsplit(url)
    netloc = f"{parts.username or ''}:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


SECRET_NAME = re.compile(r"KEY|PASSWORD|SECRET|TOKEN|AUTH", re.IGNORECASE)
REDACTED = "***"


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (what logs, output and results may show)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{REDACTED}@{parts.netloc.rpartition('@')[2]}"))


def redact(name: str, value: str) -> str:
    """A setting's value as it may be shown: secrets (API keys, passwords, tokens) hidden, URLs without password.

    A ``*_FILE`` setting names where a secret lives, not the secret: it is shown.
    """
    if SECRET_NAME.search(name) and not name.upper().endswith("_FILE"):
        return REDACTED
    return redact_url(value) if "://" in value else value


def _parse(name: str, raw: str, default: object) -> object:
    if name == "api_keys":
        return tuple(k.strip() for k in raw.split(",") if k.strip())
    try:
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid number") from None
    return raw
