"""The server's limits, and the checks of a request against them before anything is queued: each
refusal is an ApiError (400) naming the field and the limit."""

from __future__ import annotations

from dataclasses import dataclass

from zerolm.infer.sampling import SamplingParams
from zerolm.serve import protocol as P
from zerolm.serve.errors import ApiError


@dataclass(frozen=True)
class Limits:
    # per choice; also the default when a request gives none (capped by the window)
    max_tokens: int = 512
    max_n: int = 8
    max_messages: int = 256
    max_stop: int = 4
    max_prompt_tokens: int | None = None  # None: the model window - 1
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1
    max_inspect: int = 2  # inspector calls at once (503 + Retry-After above)
    # the HTTP edge (zerolm/serve/edge.py): a slow or idle client is closed, never waited for
    header_timeout_s: float = 10.0  # a request head must arrive whole within this (else closed)
    body_timeout_s: float = 30.0  # a body must arrive whole within this (else 408)
    keep_alive_s: int = 5  # an idle keep-alive connection closes after this
    shutdown_timeout_s: int = 10  # on SIGTERM, requests still running after this are cancelled
    # open sockets at most (lowered to fit RLIMIT_NOFILE); the oldest idle one goes
    max_connections: int = 512


DEFAULT_LIMITS = Limits()  # frozen: one instance serves as every default


def check_choices(req: P.SamplingRequest, lim: Limits, served: str) -> list[str]:
    """The request's model, n and stop strings against the limits; returns the stop strings."""
    if req.model is not None and req.model != served:
        raise ApiError(
            400,
            f"model {req.model!r} is not served here; this server serves {served!r} (or omit "
            "model)",
            "model",
            "model_not_found",
        )
    if req.n > lim.max_n:
        raise ApiError(400, f"n={req.n} is over this server's limit of {lim.max_n}", "n")
    stops = req.stops()
    if len(stops) > lim.max_stop or any(not s for s in stops):
        raise ApiError(400, f"stop takes up to {lim.max_stop} non-empty strings", "stop")
    return stops


def max_new_tokens(
    req: P.SamplingRequest, n_prompt: int, lim: Limits, window: int, param: str
) -> int:
    """The new tokens per choice: the request's max_tokens, or what the window leaves (at most
    lim.max_tokens); a prompt or max_tokens over the limits or the window is refused."""
    max_prompt = lim.max_prompt_tokens or window - 1
    if n_prompt > max_prompt:
        raise ApiError(
            400,
            f"the prompt is {n_prompt} tokens; this server takes at most {max_prompt} "
            f"(model window {window}): shorten it",
            param,
            "context_length_exceeded",
        )
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if asked is not None and asked > lim.max_tokens:
        raise ApiError(
            400,
            f"max_tokens={asked} is over this server's limit of {lim.max_tokens}",
            "max_tokens",
        )
    room = window - n_prompt
    if asked is not None and asked > room:
        raise ApiError(
            400,
            f"the prompt ({n_prompt} tokens) + max_tokens={asked} exceed the model window of "
            f"{window} tokens: lower max_tokens to {room} or shorten the prompt",
            "max_tokens",
            "context_length_exceeded",
        )
    return asked or min(room, lim.max_tokens)


def check_seed(req: P.SamplingRequest) -> None:
    if req.seed is not None and req.seed + req.n > 1 << 64:  # choice i draws with seed + i
        raise ApiError(
            400,
            f"seed + n - 1 must be below 2**64 (choice i uses seed + i); got seed={req.seed}, "
            f"n={req.n}",
            "seed",
            "invalid_value",
        )


def sampling_params(req: P.SamplingRequest) -> SamplingParams:
    return SamplingParams(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
    )


def check_text(texts: list[str], param: str, max_bytes: int) -> None:
    """Refuse text that is not UTF-8 (a lone surrogate) or of more than max_bytes, before it is
    tokenized."""
    size = 0
    for t in texts:
        try:
            size += len(t.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise ApiError(
                400,
                f"{param} is not valid UTF-8 text ({e.reason} at character {e.start}): send "
                "whole characters, no lone surrogates",
                param,
                "invalid_value",
            ) from e
    if size > max_bytes:
        raise ApiError(
            400,
            f"{param} is {size} bytes, more than the {max_bytes} that could fit in this "
            f"server's prompt limit: shorten it",
            param,
            "context_length_exceeded",
        )
