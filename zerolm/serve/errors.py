"""The API's errors: `ApiError` (a request's fault, 4xx, or the server's, 5xx) and the handlers that
turn every exception into an OpenAI-style body {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from zerolm.serve.edge import error_response

if TYPE_CHECKING:
    from zerolm.serve.server import Server


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers


class ClientGone(Exception):
    """A non-streaming request's client disconnected; its generation has been cancelled."""


def install_error_handlers(app: FastAPI, server: Server) -> None:
    """The app's exception handlers; each error but a gone client counts in server.http_errors."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> Response:
        server.http_errors += 1
        return error_response(e.status, e.message, e.kind, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Response:
        server.http_errors += 1
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return error_response(
                400, f"the request body is not valid JSON: {err.get('msg')}", code="invalid_json"
            )
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return error_response(
            400, f"{param or 'body'}: {err.get('msg')}", param=param, code="invalid_value"
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> Response:
        server.http_errors += 1
        return error_response(
            e.status_code,
            str(e.detail),
            "invalid_request_error" if e.status_code < 500 else "server_error",
            headers=e.headers,
        )  # 405 keeps its Allow header

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: the client has left

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> Response:
        server.http_errors += 1
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")
