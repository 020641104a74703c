"""The Celery application, configured once for gateways (which send) and workers (which serve)."""

from __future__ import annotations

from celery import Celery

from tasks.settings import Settings


def make_celery(settings: Settings) -> Celery:
    """A Celery app on ``settings.redis_url``; nothing here imports the engine."""
    app = Celery("ringserve", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        # No pickle anywhere: task messages are msgpack (compact, carries raw tensor bytes);
        # JSON stays accepted for Celery's own control and event messages (Flower, inspect).
        task_serializer="msgpack",
        result_serializer="msgpack",
        accept_content=["msgpack", "json"],
        event_serializer="json",
        # Inference results travel on per-gateway reply lists (see tasks.contract), written in
        # one pipeline per batch; the Celery result backend keeps only what Flower/inspect use.
        task_ignore_result=True,
        result_expires=settings.reply_ttl_s,
        # Each worker consumes only its own queue (ringserve.<node_id>); nothing has a default.
        task_default_queue="ringserve.default",
        task_create_missing_queues=True,
        # The batch consumer holds messages unacknowledged until their results are written
        # (acks late), so a crash never loses one. It needs many messages in hand to build
        # batches: one worker process (solo pool) prefetches up to ``prefetch_messages``.
        task_acks_late=True,
        worker_prefetch_multiplier=settings.prefetch_messages,
        # Unacknowledged messages of a dead worker are handed back to its queue after this
        # long; by then the gateways have re-sent that work elsewhere and the worker skips
        # anything whose deadline passed. It must exceed the longest batch (well under 1 s).
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        worker_pool="solo",
        worker_concurrency=1,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    return app
