"""`zerolm serve`: the OpenAI-compatible HTTP API (FastAPI + SSE) and the web UI, over the
continuous-batching scheduler. This is the HTTP edge: the endpoints are zerolm/serve/routes.py
and inspector.py, their answers responses.py, the text work behind them (limits, ids <-> text,
stop strings) server.py, limits.py and generation.py; the scheduler sees ids only.

Every error is an OpenAI-style body {"error": {"message", "type", "param", "code"}} with a 4xx
status (5xx only for a server fault; errors.py); no request can take the server down. A choice
that fails mid-generation is a 500 for its own request, or in a stream an error event and then
[DONE]. The CPU work of a request (tokenizing, the inspector's pass and its JSON) runs in worker
threads, so the event loop keeps every other stream flowing; a non-streaming request whose client
leaves is cancelled, as a stream is. Key, body size and time, header timeouts and the connection
cap are in zerolm/serve/edge.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI

from zerolm.model.protocol import LanguageModel
from zerolm.serve import inspector, routes
from zerolm.serve import protocol as P
from zerolm.serve.edge import Edge, rate_limit_logs, uvicorn_config
from zerolm.serve.errors import install_error_handlers
from zerolm.serve.limits import Limits
from zerolm.serve.server import Server, load_server


def create_app(server: Server, api_key: str | None = None) -> Edge:
    """The ASGI app: the FastAPI endpoints behind the Edge guards (key, body size and time)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        server.scheduler.close()

    app = FastAPI(
        title="zerolm",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible API of a zerolm model, with continuous batching.",
        responses={
            400: {"model": P.ErrorResponse},
            401: {"model": P.ErrorResponse},
            413: {"model": P.ErrorResponse},
            503: {"model": P.ErrorResponse},
        },
    )
    app.state.server = server  # the endpoints' Server (routes.current_server)
    install_error_handlers(app, server)
    app.include_router(routes.router)
    app.include_router(inspector.router)
    return Edge(app, server, api_key)


def serve(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    limits: Limits | None = None,
    log_level: str = "info",
    name: str | None = None,
    compile: bool = False,
    model: LanguageModel | None = None,
    mirror=None,
) -> None:
    """Load the model and serve it until interrupted (`zerolm serve`); SIGTERM stops it within
    limits.shutdown_timeout_s, cancelling what still runs. `model` and `mirror`: rank 0 of a
    tensor-parallel server (serve/tp.py)."""
    import uvicorn

    server = load_server(
        model_dir,
        max_batch=max_batch,
        max_queue=max_queue,
        limits=limits or Limits(),
        name=name,
        compile=compile,
        model=model,
        mirror=mirror,
    )
    config = uvicorn_config(
        create_app(server, api_key), server.limits, host=host, port=port, log_level=log_level
    )
    rate_limit_logs()  # after uvicorn's logging setup
    uvicorn.Server(config).run()
