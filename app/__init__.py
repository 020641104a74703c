"""The Flask gateway: ``create_app(settings)``; served by granian (see README)."""

from __future__ import annotations

import logging

from flask import Flask

from app.api import register_routes
from app.errors import register_error_handlers
from app.gateway import Gateway
from app.metrics import init_app as init_metrics
from tasks.settings import Settings


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Flask("ringserve")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    gateway = app.extensions["ringserve"] = Gateway(settings)
    register_error_handlers(app)
    register_routes(app)
    if settings.metrics:
        init_metrics(app, gateway)
    return app
