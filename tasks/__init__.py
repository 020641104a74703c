"""The Celery side of ringserve: the app, the batch consumer and the numpy engine.

``celery -A tasks worker -n worker_1@%h -Q ringserve.worker_1`` finds ``tasks.app``. It is
built on first access (PEP 562), from ``RINGSERVE_*`` settings, so that importing
``tasks.contract`` or ``tasks.settings`` (as the gateway does) builds nothing.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name != "app":
        raise AttributeError(name)
    from tasks.celery_app import make_celery
    from tasks.consumer import install_worker
    from tasks.settings import Settings

    settings = Settings.from_env()
    app = make_celery(settings)
    install_worker(app, settings)
    globals()["app"] = app
    return app
