"""The connection guards of `zerolm serve`, in front of the endpoints (zerolm/serve/routes.py).

- `Edge` (ASGI middleware): the API key is checked on /v1 before any body is read (401), and the
  body is read whole before the app sees it, within `max_body_bytes` (413, declared or chunked)
  and `body_timeout_s` (408).
- `GuardedH11` (uvicorn's h11 protocol, extended): a request head must arrive whole within
  `header_timeout_s` of the connection opening or of its last response, else the socket closes;
  at most `max_connections` sockets stay open (below RLIMIT_NOFILE, so accept never fails): over
  it, the oldest idle one is closed, or with none idle the new one gets 503. uvicorn's own
  `limit_concurrency` is not used: it answers only once a request head has arrived, so idle
  sockets would still exhaust the descriptors.
- `RateLimit` (logging filter): one identical message per interval, the rest counted.
- `uvicorn_config`: uvicorn's settings from the server's Limits (keep-alive, graceful shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import secrets
import time
from collections.abc import Mapping

import h11
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from zerolm.serve import protocol as P


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class Edge:
    """ASGI middleware: key check, then the whole body within its size and time limits, then the
    app."""

    def __init__(self, app, server, api_key: str | None):
        self.app, self.server, self.api_key = app, server, api_key

    async def __call__(self, scope, receive, send):  # noqa: C901 (the request gate: key, size and timing checks in order)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lim, headers = self.server.limits, dict(scope["headers"])
        refused = None
        if self.api_key is not None and scope["path"].startswith("/v1"):
            got = headers.get(b"authorization", b"")
            if not (
                got.startswith(b"Bearer ")
                and secrets.compare_digest(got[7:], self.api_key.encode())
            ):
                refused = error_response(
                    401,
                    "missing or wrong API key: send the header 'Authorization: Bearer "
                    "<key>' with the key given to `zerolm serve --api-key`",
                    code="invalid_api_key",
                )
        too_big = error_response(
            413,
            f"request body over {lim.max_body_bytes} bytes; send less (a shorter prompt "
            "or fewer messages)",
            code="request_too_large",
            headers={"Connection": "close"},
        )
        declared = headers.get(b"content-length", b"")
        if refused is None and declared.isdigit() and int(declared) > lim.max_body_bytes:
            refused = too_big
        body, more = bytearray(), refused is None
        deadline = time.monotonic() + lim.body_timeout_s
        while more:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                refused = error_response(
                    408,
                    f"the request body did not arrive within {lim.body_timeout_s:g} s",
                    code="request_timeout",
                    headers={"Connection": "close"},
                )
                break
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > lim.max_body_bytes:
                refused = too_big
                break
        if refused is not None:
            self.server.http_errors += 1
            return await refused(scope, receive, send)
        replayed = False

        async def replay():  # the body once, then the client's own channel (to see it disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def _busy() -> bytes:
    body = json.dumps(
        P.ErrorResponse(
            error=P.ErrorDetail(
                message="too many open connections; retry shortly",
                type="server_error",
                code="server_busy",
            )
        ).model_dump()
    )
    return (
        f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n{body}"
    ).encode()


BUSY = _busy()


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head and a cap on open sockets."""

    header_timeout_s: float = 10.0
    max_connections: int = 512

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm()
        open_ = [
            c for c in self.connections if not c.transport.is_closing()
        ]  # closed ones leave a tick later
        if len(open_) > self.max_connections:
            idle = [c for c in open_ if c is not self and isinstance(c, GuardedH11) and c._idle()]
            if idle:
                min(idle, key=lambda c: c._idle_since)._close()
            else:
                transport.write(BUSY)
                transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _idle(self) -> bool:
        """No request in progress: waiting for (the rest of) a request head."""
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._idle_since = self.loop.time()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_late)

    def _head_late(self) -> None:
        if self._idle():
            self._close()

    def _close(self) -> None:
        if not self.transport.is_closing():
            with contextlib.suppress(h11.LocalProtocolError):  # mid-head: nothing to close cleanly
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()


class RateLimit(logging.Filter):
    """Lets one record per (logger, message) through every `interval` s; the next one that passes
    says how many were dropped. A flood of identical errors (e.g. "Too many open files") costs a
    line per interval, not a traceback per occurrence."""

    def __init__(self, interval: float = 10.0):
        super().__init__()
        self.interval = interval
        self.seen: dict[tuple, tuple[float, int]] = {}  # key -> (last let through, dropped since)

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg), record.exc_info and record.exc_info[0])
        now = time.monotonic()
        last, dropped = self.seen.get(key, (-float("inf"), 0))
        if now - last < self.interval:
            self.seen[key] = (last, dropped + 1)
            return False
        if len(self.seen) > 1000:  # bounded: forget the old keys
            self.seen.clear()
        self.seen[key] = (now, 0)
        if dropped:
            record.msg = f"{record.msg} [{dropped} more like this in the last {now - last:.0f} s]"
        return True


def rate_limit_logs(interval: float = 10.0) -> None:
    """Install RateLimit on the loggers a hostile client can make noisy (idempotent)."""
    for name in ("asyncio", "uvicorn.error", "zerolm.serve.scheduler"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimit) for f in logger.filters):
            logger.addFilter(RateLimit(interval))


def socket_budget(wanted: int) -> tuple[int, int]:
    """(max open connections, accept backlog) that stay below this process's RLIMIT_NOFILE. asyncio
    accepts up to `backlog` sockets per loop iteration before any is seen (and capped), and a shed
    socket's descriptor is freed an iteration or two later, so the cap leaves room for three bursts,
    plus 64 descriptors for the model, logs, pipes and threads. (One burst of room failed under
    load: at 256 descriptors, 300 connects in a row overran it and accept() hit EMFILE.)"""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted, 2048
    backlog = min(2048, max(16, soft // 8))
    return max(8, min(wanted, soft - 3 * backlog - 64)), backlog


def uvicorn_config(app, limits, *, host: str, port: int, log_level: str = "info"):
    """uvicorn's Config for the app, with the Limits' timeouts and connection cap."""
    import uvicorn

    cap, backlog = socket_budget(limits.max_connections)
    protocol = type(
        "ZerolmH11",
        (GuardedH11,),
        {"header_timeout_s": limits.header_timeout_s, "max_connections": cap},
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=protocol,
        backlog=backlog,
        timeout_keep_alive=limits.keep_alive_s,
        timeout_graceful_shutdown=limits.shutdown_timeout_s,
    )
