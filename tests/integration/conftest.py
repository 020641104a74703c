from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from tasks.settings import Settings
from tests.conftest import Cluster


@pytest.fixture
def app_factory() -> Iterator[Callable[[Settings], Flask]]:
    """Gateways (the real Flask app, in-process) whose threads are stopped afterwards."""
    made: list[Flask] = []

    def make(settings: Settings) -> Flask:
        app = create_app(settings)
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions["ringserve"].stop()


@pytest.fixture
def client(shared_cluster: Cluster, app_factory: Callable[[Settings], Flask]) -> FlaskClient:
    return app_factory(shared_cluster.settings).test_client()
