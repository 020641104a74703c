"""The API key the bench's own requests carry when the system under test requires one.

The key comes from ``RINGSERVE_API_KEYS`` in the bench's environment (the first of them), as the
gateways it starts get it; it is sent as ``Authorization: Bearer`` and never recorded (results
record settings through :func:`tasks.settings.redact`).
"""

from __future__ import annotations

import os
import urllib.request
from http.client import HTTPResponse

from tasks.settings import Settings


def headers() -> dict[str, str]:
    """``{"Authorization": "Bearer <key>"}`` when API keys are configured, else nothing."""
    keys = Settings.from_env(os.environ).api_keys
    return {"Authorization": f"Bearer {keys[0]}"} if keys else {}


def get(url: str, timeout_s: float) -> HTTPResponse:
    """``urlopen(url)`` with the API key, if any; the caller closes the response (``with``)."""
    response: HTTPResponse = urllib.request.urlopen(urllib.request.Request(url, headers=headers()), timeout=timeout_s)
    return response
