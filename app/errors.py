"""One error hierarchy, mapped to HTTP in one place: every error answers ``{"error": msg}``."""

from __future__ import annotations

import logging

import orjson
from flask import Flask, Response
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class RingserveError(Exception):
    status = 500
    retry_after_s: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(RingserveError):
    status = 400


class Unauthorized(RingserveError):
    status = 401


class NotFound(RingserveError):
    status = 404


class PayloadTooLarge(RingserveError):
    status = 413


class TooManyRequests(RingserveError):
    status = 429
    retry_after_s = 1


class BadGateway(RingserveError):
    """A worker's answer does not fit its request (a fault of ours, never of the client's)."""

    status = 502


class Unavailable(RingserveError):
    status = 503
    retry_after_s = 1


class DeadlineExceeded(RingserveError):
    status = 504


BY_STATUS: dict[int, type[RingserveError]] = {
    cls.status: cls
    for cls in (BadRequest, Unauthorized, NotFound, PayloadTooLarge, TooManyRequests, Unavailable, DeadlineExceeded)
}


def error_for_status(status: int, message: str) -> RingserveError:
    """The error a worker's ``{"status", "error"}`` reply stands for."""
    return BY_STATUS.get(status, RingserveError)(message)


def error_response(status: int, message: str, retry_after_s: int | None = None) -> Response:
    response = Response(orjson.dumps({"error": message}), status=status, mimetype="application/json")
    if retry_after_s is not None:
        response.headers["Retry-After"] = str(retry_after_s)
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(RingserveError)
    def _ringserve(exc: RingserveError) -> Response:
        if exc.status >= 500:
            log.warning("%d: %s", exc.status, exc.message)
        return error_response(exc.status, exc.message, exc.retry_after_s)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        message = {413: "request body too large"}.get(status, exc.description or exc.name)
        return error_response(status, message)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error")
        return error_response(500, "internal error; the gateway log has the details")
