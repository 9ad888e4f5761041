"""Errors of loragen-vllm: one exception type per failure kind, mapped to HTTP in one place.

Every failure a request can meet is a `LoragenError` subclass that carries its HTTP status, its
OpenAI-style error ``type`` (vLLM's spelling: "BadRequestError", ...), the request parameter it
concerns and a short machine-readable ``code``. `to_http(exc)` is the one mapping from any
exception to (status, OpenAI error body); `to_vllm_exception(exc)` turns it into the exception
vLLM's OpenAI server renders as that same status, type and param. Nothing here imports vLLM at
module level (importing vLLM costs seconds; the store and the CLI must not pay it).

How an error raised in our LoRA resolver reaches the client (read from vLLM 0.32's source):

* ``OpenAIServingModels.resolve_lora`` (``vllm/entrypoints/openai/models/serving.py``) awaits each
  registered ``LoRAResolver.resolve_lora(base_model_name, lora_name)`` with no ``try`` around it
  (only ``engine_client.add_lora`` of the returned request is guarded). An exception from the
  resolver propagates out of ``_check_model`` (``vllm/entrypoints/serve/engine/serving.py``) and
  out of the route handler to FastAPI's exception handlers
  (``vllm/entrypoints/serve/exception_handling/register.py``), which answer with
  ``create_error_response(exc)``: ``VLLMValidationError`` -> 400 "BadRequestError" with its
  ``parameter`` as ``param``; ``RetryableRequestError`` -> 503 "ServiceUnavailableError" (through
  the ``GenerationError`` handler, which logs no stack trace); ``GracefulHTTPError`` -> its own
  status with the HTTP phrase as type; ``ValueError``/``TypeError`` -> 400; anything else -> 500
  "InternalServerError". The body is
  ``{"error": {"message": sanitize_message(str(exc)), "type", "param", "code": <status>}}``
  where ``sanitize_message`` strips file paths and memory addresses, so messages must not depend
  on paths. ``VLLMValidationError.__str__`` appends ``" (parameter=model)"`` to the message.
* No headers: every one of those handlers answers ``JSONResponse(err.model_dump(),
  status_code=...)``, so nothing a resolver raises can set ``Retry-After``. `Overloaded` therefore
  ends its message with "retry after N s" (`retry_after_s` reads it back), and the HTTP middleware
  in front of vLLM turns that into the header.
* ``_check_model`` runs before a ``StreamingResponse`` exists, so streaming requests get the same
  status and body (no half-open stream).
* Returning ``None`` from the resolver gives 404 "The model `...` does not exist" -- never right
  for a description (every valid description resolves). A returned ``LoRARequest`` whose folder
  vLLM cannot load gives 400 "LoRA adapter '...' was found but could not be loaded" -- the store
  therefore never deletes an adapter a live server may still (re)load (pins, see ``store.py``).
* The resolver lock in ``OpenAIServingModels`` is an ``async with``: it is released when we raise,
  and a failed name is not remembered, so the next request for it resolves again.

So the plugin catches `LoragenError` at its edge and raises ``to_vllm_exception(err) from err``;
the client then sees the status, type and param that ``to_http(err)`` describes (checked against
vLLM's own ``create_error_response`` in ``tests/test_descriptions.py``). `StoreCorrupt` is
internal: the store turns it into a miss, the adapter is regenerated, and it never reaches a
client; should it ever escape it maps to 500. Each vLLM class is imported on its own; where
one is missing (older vLLM, e.g. 0.26 on the GPU machines: not verified here) the fallback is
``ValueError`` for 4xx (vLLM maps it to 400) and ``RuntimeError`` for 5xx (500, so a 503 would
degrade to a 500 there).
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any, ClassVar

# ----------------------------------------------------------------------------------------------
# Exception types


class LoragenError(Exception):
    """Base of every loragen-vllm failure; subclasses fix status, type, code and param."""

    status: ClassVar[HTTPStatus] = HTTPStatus.INTERNAL_SERVER_ERROR
    type: ClassVar[str] = "InternalServerError"  # OpenAI "type", spelled as vLLM spells it
    code: ClassVar[str] = "internal_error"  # short machine-readable code (logs, CLI)
    param: ClassVar[str | None] = None  # the request field at fault, if any

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidDescription(LoragenError, ValueError):
    """The request's ``model`` field is not a usable task description (empty, too long, ...)."""

    status = HTTPStatus.BAD_REQUEST
    type = "BadRequestError"
    code = "invalid_description"
    param = "model"


class GeneratorUnavailable(LoragenError):
    """No adapter could be generated now: generator failed, timed out, or is unreachable."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "ServiceUnavailableError"
    code = "generator_unavailable"


class Overloaded(GeneratorUnavailable):
    """Refused at once to keep every wait bounded: too many generations pending, the adapter's
    key lock held elsewhere past the deadline, the request's deadline passed, or the store's disk
    full. A 503 like `GeneratorUnavailable`; ``retry_after_s`` is what ``Retry-After`` should say
    (the message ends with "retry after N s", which `retry_after_s` reads back: vLLM renders
    the error from the message alone, without headers)."""

    code = "overloaded"

    def __init__(self, message: str, *, reason: str, retry_after_s: int = 0) -> None:
        self.retry_after_s = max(1, int(retry_after_s or DEFAULT_RETRY_AFTER_S))
        super().__init__(f"{message}; retry after {self.retry_after_s} s")
        self.reason = reason  # queue_full | lock_timeout | deadline | disk_full (metrics label)

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable (a Ray actor raises it to the server): rebuilt from its parts, not re-init'd
        return (_rebuild_overloaded, (type(self), self.message, self.reason, self.retry_after_s))


def _rebuild_overloaded(cls: type[Overloaded], message: str, reason: str, retry_after_s: int) -> Overloaded:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.message, err.reason, err.retry_after_s = message, reason, retry_after_s
    return err


class LockTimeout(Overloaded, TimeoutError):
    """A store lock stayed held (by another process or thread, perhaps stopped) past the
    deadline of the wait: a 503 within that deadline, never a hang."""

    def __init__(self, message: str, *, retry_after_s: int = 0) -> None:
        Overloaded.__init__(self, message, reason="lock_timeout", retry_after_s=retry_after_s)


class StoreFull(Overloaded):
    """No space left to publish a new adapter (stored ones are still served)."""

    def __init__(self, message: str, *, retry_after_s: int = 0) -> None:
        super().__init__(message, reason="disk_full", retry_after_s=retry_after_s)


DEFAULT_RETRY_AFTER_S = 5
_RETRY_AFTER_RE = re.compile(r"retry after (\d+) s\b")


def retry_after_s(message: str) -> int | None:
    """The ``Retry-After`` seconds an `Overloaded` message asks for, None if it asks none."""
    m = _RETRY_AFTER_RE.search(message or "")
    return int(m.group(1)) if m else None


class StoreCorrupt(LoragenError):
    """A stored adapter failed its integrity check. Internal: it is regenerated, never served."""

    code = "store_corrupt"

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"stored adapter {key[:12]} is corrupt: {reason}")
        self.key = key
        self.reason = reason


class UnknownAdapter(LoragenError, KeyError):
    """No stored adapter matches the given key (or the key prefix matches several)."""

    status = HTTPStatus.NOT_FOUND
    type = "NotFoundError"
    code = "unknown_adapter"


class AdapterPinned(LoragenError):
    """Refused to remove an adapter that a live server process has pinned (may reload it)."""

    status = HTTPStatus.CONFLICT
    type = "ConflictError"
    code = "adapter_pinned"


# ----------------------------------------------------------------------------------------------
# Command-line failures (``cli.main`` maps them, and the ones above, to exit codes)


class UsageError(Exception):
    """Bad command-line input that argparse cannot see (exit code 2)."""


class CommandFailed(Exception):
    """A command could not do its job (exit code 1)."""


# ----------------------------------------------------------------------------------------------
# The one mapping to HTTP


def to_http(exc: BaseException) -> tuple[HTTPStatus, dict[str, Any]]:
    """Map any exception to (HTTP status, OpenAI-style error body), as vLLM's server shapes it.

    A `LoragenError` keeps its message; any other exception becomes a 500 whose message does
    not leak internals (its details belong in the server log, not in the response).
    """
    if isinstance(exc, LoragenError):
        status, type_, param, message = exc.status, exc.type, exc.param, exc.message
    else:
        status, type_, param = HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError", None
        message = "internal error while resolving the adapter"
    body = {"error": {"message": message, "type": type_, "param": param, "code": status.value}}
    return status, body


def to_vllm_exception(exc: BaseException) -> Exception:
    """The exception to raise from a vLLM ``LoRAResolver`` so the client gets `to_http(exc)`.

    Imports vLLM lazily (only the plugin, inside vLLM, calls this). See the module docstring
    for how vLLM 0.32 renders each returned type.
    """
    status, body = to_http(exc)
    message = body["error"]["message"]
    param = body["error"]["param"]
    if status == HTTPStatus.BAD_REQUEST:
        try:
            from vllm.exceptions import VLLMValidationError
        except ImportError:  # older vLLM: ValueError is what it maps to 400
            return ValueError(message)
        return VLLMValidationError(message, parameter=param)
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        try:
            from vllm.exceptions import RetryableRequestError
        except ImportError:
            pass
        else:
            return RetryableRequestError(message)
        # vLLM 0.26 has neither RetryableRequestError nor GracefulHTTPError, but its server
        # renders a FastAPI HTTPException as an OpenAI-style error with that status.
        from fastapi import HTTPException

        return HTTPException(status_code=int(status), detail=message)
    if status >= 500 and status != HTTPStatus.SERVICE_UNAVAILABLE:
        return RuntimeError(message)  # -> 500 "InternalServerError"
    try:
        from vllm.exceptions import GracefulHTTPError
    except ImportError:  # older vLLM: 4xx as ValueError (400), 503 as a plain error (500)
        return ValueError(message) if status < 500 else RuntimeError(message)
    return GracefulHTTPError(message, status)  # other 4xx: type is the HTTP phrase
