"""The Celery application, configured once for gateways (which send) and workers (which serve)."""

from __future__ import annotations

from celery import Celery

from tasks.settings import Settings
from tasks.transport import transport_for


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
        # Fail-over is the gateway's job: it keeps every unanswered request and re-sends it
        # when its worker leaves the ring or restarts (app.submit). Broker redelivery would
        # come only after a visibility timeout, long after the request's deadline, and kombu's
        # emulated acks cost two Redis round trips per message. So acknowledgements stay in
        # the worker's memory (ack_emulation off) and only bound how many messages it holds:
        # the batch consumer acks a message once all its requests were answered, and one
        # worker process (solo pool) holds up to ``prefetch_messages`` to build batches from.
        task_acks_late=True,
        worker_prefetch_multiplier=settings.prefetch_messages,
        broker_transport_options={"ack_emulation": False},
        # kombu's Redis transport, with a guard that drops what is not a kombu message instead
        # of letting it stop the worker (tasks.transport).
        broker_transport=transport_for(settings.redis_url),
        broker_connection_retry_on_startup=True,
        worker_pool="solo",
        worker_concurrency=1,
        # The batch consumer sends its messages' task events itself (tasks.events), through the
        # dispatcher this enables for the "task" group; Celery's own per-task events never fire.
        worker_send_task_events=settings.task_events,
        worker_hijack_root_logger=False,
    )
    return app
