"""HTTP/1.1 client connections for the load generator: a lean one of our own, or aiohttp.

The lean connection writes a prepared POST on a keep-alive socket and parses the answer by hand
(``Content-Length`` or chunked). On this project's 2-core machines the client shares the cores
with the system it measures, so its CPU per request matters: measured against the gateway, it
costs about 45 µs of CPU per request against aiohttp's 115 µs (wrk: about 15). aiohttp stays
available (``--transport aiohttp``) as the reference implementation and for servers that need
more HTTP than we parse.
"""

from __future__ import annotations

import asyncio
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from bench import auth

TRANSPORTS = ("raw", "aiohttp")
_HEADER_END = b"\r\n\r\n"


class HttpError(Exception):
    """A malformed answer or a lost connection: the request got no usable HTTP response."""


class Connection(Protocol):
    async def open(self) -> None: ...

    async def post(self, body: bytes, timeout_s: float) -> tuple[int, bytes]: ...

    async def close(self) -> None: ...


def parse_response(buf: bytes | bytearray) -> tuple[int, bytes, int, bool] | None:
    """One complete HTTP/1.1 response at the start of ``buf``: (status, body, bytes used, must close).

    None while the response is incomplete; raises :class:`HttpError` when it cannot be parsed.
    """
    end = buf.find(_HEADER_END)
    if end < 0:
        return None
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = head[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HttpError(f"bad status line {head[0]!r}")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    close = headers.get("connection", "").lower() == "close" or parts[0] == "HTTP/1.0"
    start = end + len(_HEADER_END)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunked = _dechunk(buf, start)
        if chunked is None:
            return None
        return int(parts[1]), chunked[0], chunked[1], close
    if "content-length" not in headers:
        raise HttpError("an answer without Content-Length or chunked encoding")
    stop = start + int(headers["content-length"])
    if len(buf) < stop:
        return None
    return int(parts[1]), bytes(buf[start:stop]), stop, close


def _dechunk(buf: bytes | bytearray, pos: int) -> tuple[bytes, int] | None:
    """The body of a chunked response starting at ``pos`` and the offset after it; None if partial."""
    body = bytearray()
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
        pos = line_end + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n", pos)  # no trailers expected: just the final CRLF
            return None if trailer_end < 0 else (bytes(body), trailer_end + 2)
        if len(buf) < pos + size + 2:
            return None
        body += buf[pos : pos + size]
        pos += size + 2


class _Stream(asyncio.Protocol):
    """Collects bytes and hands each complete response to the request waiting for it."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        try:
            parsed = parse_response(self.buffer)
        except (HttpError, ValueError) as exc:
            self.waiter.set_exception(HttpError(str(exc)))
            return
        if parsed is not None:
            status, body, used, close = parsed
            del self.buffer[:used]
            self.waiter.set_result((status, body, close))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HttpError(f"connection lost: {exc or 'closed by the server'}"))


class RawConnection:
    """One keep-alive connection to ``url``; reconnects after an error or ``Connection: close``."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"the raw transport speaks plain http only, not {url!r} (use --transport aiohttp)")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in auth.headers().items())
            + "Content-Length: "
        ).encode()
        self._stream: _Stream | None = None

    async def _connect(self) -> _Stream:
        loop = asyncio.get_running_loop()
        _, stream = await loop.create_connection(_Stream, self.host, self.port)
        return stream

    async def open(self) -> None:
        """Connect now, so that the first request's latency does not include the handshake."""
        if self._stream is None:
            self._stream = await self._connect()

    async def post(self, body: bytes, timeout_s: float) -> tuple[int, bytes]:
        try:
            return await asyncio.wait_for(self._exchange(body), timeout_s)
        except (TimeoutError, OSError, HttpError):
            await self.close()
            raise

    async def _exchange(self, body: bytes) -> tuple[int, bytes]:
        stream = self._stream
        if stream is None or stream.transport is None:
            stream = self._stream = await self._connect()
        assert stream.transport is not None
        stream.waiter = asyncio.get_running_loop().create_future()
        stream.transport.write(self._head + str(len(body)).encode() + b"\r\n\r\n" + body)
        status, answer, close = await stream.waiter
        if close:
            await self.close()
        return status, answer

    async def close(self) -> None:
        if self._stream is not None and self._stream.transport is not None:
            self._stream.transport.close()
        self._stream = None


class AiohttpConnection:
    """aiohttp's client, one session (and connection) per simulated user."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))

    async def post(self, body: bytes, timeout_s: float) -> tuple[int, bytes]:
        await self.open()
        assert self._session is not None
        try:
            async with self._session.post(
                self.url,
                data=body,
                headers={"Content-Type": "application/json", **auth.headers()},
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response:
                return response.status, await response.read()
        except aiohttp.ClientError as exc:
            raise HttpError(str(exc)) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def connection(transport: str, url: str) -> Connection:
    if transport == "raw":
        return RawConnection(url)
    if transport == "aiohttp":
        return AiohttpConnection(url)
    raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
