"""The edge of the HTTP server: what a client may send and what it gets back, before vLLM.

`EdgeGuard` is an ASGI middleware that ``loragen-vllm serve`` hands to vLLM's OpenAI server
(``--middleware loragen_vllm.edge.EdgeGuard``; vLLM adds it with ``app.add_middleware``, outside
its own ``--api-key`` check, which still applies to everything it lets through). It does four
things, each in one place:

* **Routes.** Clients reach only `PUBLIC_ROUTES`: chat and text completions, ``/v1/models``,
  ``/health``, ``/metrics``, ``/ping`` and ``/version``. vLLM's admin routes (runtime LoRA
  load/unload, sleep, profiling, weight updates, ...) answer 403 and every other route 404,
  unless the operator set an admin key (``serve --admin-key``, ``LORAGEN_ADMIN_KEY``) and the
  request carries it in the ``X-LoRAGen-Admin-Key`` header. ``serve`` must keep runtime LoRA
  updating on (vLLM only asks resolvers with it), which is what opens those routes in vLLM.
  While ``serve`` restricts vLLM's LoRA to the generator's modules (``LORAGEN_LORA_MODULES``;
  `lora_modules`), an admin's ``/v1/load_lora_adapter`` is a 400 unless the adapter is a local
  safetensors folder whose LoRA weights all lie on those layers: vLLM would load any other and
  serve it without the rest.
* **Inputs.** On chat and completions, a raw ``model`` field longer than
  ``LORAGEN_MAX_MODEL_BYTES`` (UTF-8, before normalisation) is a 400, and so is any other
  invalid description (`validate_description`: control and format/bidi characters, empty, too
  long after normalisation). vLLM never sees, keeps, echoes or lists such a name. The edge reads
  those bodies whole (to look at ``model``) and refuses one over ``LORAGEN_MAX_BODY_BYTES``
  with a 413, from its Content-Length before reading or as soon as the bytes read pass it.
* **Listing.** ``/v1/models`` lists the served base model only (resolved descriptions are
  other clients' requests; ``LORAGEN_LIST_DESCRIPTIONS=1`` lists them too), and never a
  filesystem path: vLLM puts the model folder and the adapters' store paths in ``root``.
* **Responses.** A response to a description names the adapter that answered it
  (``x-loragen-adapter: <store key>; generator=<fingerprint>``), and a 503 carries
  ``Retry-After`` (vLLM renders a resolver's error without headers; ours say "retry after N s").

It also counts the requests in flight per ``model`` name (`in_flight`): the bounded name table
(``vllm_patches.py``) never drops a name a request is still using; and before a request for a
description reaches vLLM it runs the arrival checks (`add_arrival_check`; ``vllm_patches.py``
registers the one that makes vLLM forget a name whose adapter files changed on disk).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

from loragen_vllm import envs
from loragen_vllm.descriptions import validate_description
from loragen_vllm.errors import DEFAULT_RETRY_AFTER_S, InvalidDescription, retry_after_s, to_http
from loragen_vllm.lora_modules import lora_layers, lora_weight_modules

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

GENERATE_PATHS = ("/v1/chat/completions", "/v1/completions")  # bodies carry a `model`
MODELS_PATH = "/v1/models"
PUBLIC_ROUTES: dict[str, frozenset[str]] = {
    "/v1/chat/completions": frozenset({"POST"}),
    "/v1/completions": frozenset({"POST"}),
    MODELS_PATH: frozenset({"GET", "HEAD"}),
    "/health": frozenset({"GET", "HEAD"}),
    "/metrics": frozenset({"GET", "HEAD"}),
    "/ping": frozenset({"GET", "POST", "HEAD"}),
    "/version": frozenset({"GET", "HEAD"}),
}
LOAD_ADAPTER_PATH = "/v1/load_lora_adapter"
# vLLM routes that change the server's state (403 rather than 404: they exist, but not for you)
ADMIN_PATHS = frozenset({
    LOAD_ADAPTER_PATH, "/v1/unload_lora_adapter",
    "/sleep", "/wake_up", "/is_sleeping", "/release_kv_cache_memory", "/collective_rpc",
    "/reset_prefix_cache", "/reset_mm_cache", "/reset_encoder_cache",
    "/start_profile", "/stop_profile", "/server_info",
    "/pause", "/resume", "/abort_requests", "/update_weights", "/start_weight_update",
    "/finish_weight_update", "/init_weight_transfer_engine", "/shutdown_weight_transfer_engine",
    "/scale_elastic_ep", "/is_scaling_elastic_ep",
})
ADMIN_HEADER = b"x-loragen-admin-key"
ADAPTER_HEADER = b"x-loragen-adapter"

# requests in flight per `model` name, in this process (the API server)
_in_flight: Counter[str] = Counter()


_idle_listeners: list[Callable[[str], None]] = []
_arrival_checks: list[Callable[[str], None]] = []


def in_flight(name: str) -> bool:
    """Whether a chat or completions request for ``name`` is being answered right now."""
    return _in_flight.get(name, 0) > 0


def add_idle_listener(listener: Callable[[str], None]) -> None:
    """Call ``listener(name)`` whenever the last request in flight for ``name`` ends."""
    _idle_listeners.append(listener)


def add_arrival_check(check: Callable[[str], None]) -> None:
    """Call ``check(name)`` when a chat or completions request for description ``name`` arrives,
    before vLLM sees it (on the event loop: it must be quick)."""
    _arrival_checks.append(check)


def _notify(listeners: list[Callable[[str], None]], name: str) -> None:
    for listener in listeners:
        try:
            listener(name)
        except Exception:  # never let bookkeeping break a request
            logger.exception("%s failed for %.60r", getattr(listener, "__name__", "listener"), name)


# ----------------------------------------------------------------------------------------------
# Pure parts (unit-tested without a server)


def check_model_field(model: object, base_models: set[str] | frozenset[str], max_bytes: int,
                      max_chars: int) -> None:
    """Raise `InvalidDescription` if ``model`` (the raw field) may not reach vLLM.

    A base model name passes; so does a non-string (vLLM answers that itself). The byte limit is
    checked first, on the raw text, so a huge name costs one length computation.
    """
    if not isinstance(model, str) or model in base_models:
        return
    size = len(model.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidDescription(
            f"invalid description: the model field is too long ({size} bytes; the limit is "
            f"{max_bytes} bytes)"
        )
    validate_description(model, max_chars)


def public_models_list(body: bytes, base_models: set[str] | frozenset[str], list_descriptions: bool) -> bytes:
    """vLLM's ``/v1/models`` body without filesystem paths and, unless ``list_descriptions``,
    without the resolved descriptions (only the base model)."""
    try:
        listing = json.loads(body)
        cards = listing["data"]
    except (ValueError, KeyError, TypeError):
        return body
    base = next(iter(sorted(base_models)), None)
    kept = []
    for card in cards:
        if not isinstance(card, dict):
            continue
        is_base = card.get("id") in base_models or card.get("parent") is None
        if not is_base and not list_descriptions:
            continue
        # root: vLLM's model folder or adapter path; name the model instead
        card["root"] = card.get("id") if is_base else (base or card.get("parent"))
        if not is_base:
            card["parent"] = base if base is not None else None
        kept.append(card)
    listing["data"] = kept
    return json.dumps(listing).encode()


def adapter_header(model: str) -> bytes | None:
    """``<key>; generator=<fingerprint>`` of the adapter resolved for ``model``, else None."""
    from loragen_vllm import plugin  # imports vLLM: only inside the server

    found = plugin.adapter_of(model)
    if found is None:
        return None
    key, fingerprint = found
    return f"{key}; generator={fingerprint}".encode()


def retry_after(message: str) -> int:
    """Seconds for ``Retry-After``: what an overload 503 asks for, else the default."""
    found = retry_after_s(message)
    return found if found is not None else DEFAULT_RETRY_AFTER_S


# ----------------------------------------------------------------------------------------------
# The middleware


class EdgeGuard:
    """ASGI middleware: see the module docstring. Configured from ``LORAGEN_*`` (set by `serve`)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.base_models = frozenset(envs.LORAGEN_SERVED_MODEL_NAMES)
        self.max_model_bytes = envs.LORAGEN_MAX_MODEL_BYTES
        self.max_chars = envs.LORAGEN_MAX_DESCRIPTION_CHARS
        self.max_body_bytes = envs.LORAGEN_MAX_BODY_BYTES
        self.admin_key = envs.LORAGEN_ADMIN_KEY
        self.list_descriptions = envs.LORAGEN_LIST_DESCRIPTIONS
        self.lora_modules = frozenset(envs.LORAGEN_LORA_MODULES)  # empty: vLLM's LoRA on every layer
        self.lora_layers = lora_layers(self.lora_modules)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        method = scope.get("method", "GET")
        public = path in PUBLIC_ROUTES and (method in PUBLIC_ROUTES[path] or method == "OPTIONS")
        public = public or (path.startswith("/metrics/") and method in ("GET", "HEAD"))
        if not public and not self._is_admin(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            if path in ADMIN_PATHS:
                await _error(send, HTTPStatus.FORBIDDEN, "forbidden: an admin route (the server "
                             "needs `--admin-key`, the request the X-LoRAGen-Admin-Key header)")
            else:
                await _error(send, HTTPStatus.NOT_FOUND, "not found")
            return
        if path == MODELS_PATH and method == "GET":
            await self.app(scope, receive, self._models_send(send))
        elif path in GENERATE_PATHS and method == "POST":
            await self._generate(scope, receive, send)
        elif path == LOAD_ADAPTER_PATH and method == "POST" and self.lora_modules:
            await self._load_adapter(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The request body, or None when there is none to pass on: the client went away, or
        the body is over ``LORAGEN_MAX_BODY_BYTES`` (then answered 413 here)."""
        length = _content_length(scope)
        try:
            if length is not None and length > self.max_body_bytes:
                raise BodyTooLarge
            return await _read_body(receive, self.max_body_bytes)
        except BodyTooLarge:
            await _error(send, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                         f"request body over {self.max_body_bytes} bytes (LORAGEN_MAX_BODY_BYTES)")
            return None

    async def _read_json(self, scope: Scope, receive: Receive, send: Send) -> tuple[bytes, Any] | None:
        """(body, its JSON or None where it is not JSON: vLLM answers malformed JSON itself), or
        None when nothing is to be passed on: no body (`_read_body`), or JSON nested too deeply
        to parse (answered 400 here; a parser, vLLM's too, would fail the same way with a 500)."""
        body = await self._read_body(scope, receive, send)
        if body is None:
            return None
        try:
            return body, json.loads(body)
        except ValueError:
            return body, None
        except RecursionError:
            await _error(send, HTTPStatus.BAD_REQUEST, "request body nested too deeply to parse")
            return None

    def _is_admin(self, scope: Scope) -> bool:
        if not self.admin_key:
            return False
        for name, value in scope.get("headers", []):
            if name.lower() == ADMIN_HEADER:
                return hmac.compare_digest(value, self.admin_key.encode())
        return False

    async def _load_adapter(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An admin's ``/v1/load_lora_adapter``: refused (400) unless the adapter's LoRA weights
        are all on layers vLLM applies LoRA to (``LORAGEN_LORA_MODULES``, set by ``serve``, with
        vLLM's packed layers: `lora_layers`), read from its ``adapter_model.safetensors``;
        vLLM would load any other adapter and serve it without the rest."""
        read = await self._read_json(scope, receive, send)
        if read is None:
            return
        body, request = read
        path = request.get("lora_path") if isinstance(request, dict) else None
        if isinstance(path, str) and path:
            served = " ".join(sorted(self.lora_modules))
            modules = await asyncio.to_thread(lora_weight_modules, path)
            if modules is None:
                await _error(send, HTTPStatus.BAD_REQUEST, (
                    f"cannot tell which layers the adapter at {path!r} has LoRA weights for (read from "
                    f"adapter_model.safetensors in a local folder); this server applies LoRA to {served} only "
                    "and vLLM would serve an adapter without the others"))
                return
            extra = sorted(modules - self.lora_layers)
            if extra:
                await _error(send, HTTPStatus.BAD_REQUEST, (
                    f"the adapter has LoRA weights for {', '.join(extra)}; this server applies LoRA to "
                    f"{served} only (the generator's modules; vLLM would serve the adapter without the "
                    f"others): restart serve with -- --lora-target-modules {served} {' '.join(extra)} "
                    "to serve it"))
                return
        await self.app(scope, _replay_body(body, receive), send)

    async def _generate(self, scope: Scope, receive: Receive, send: Send) -> None:
        read = await self._read_json(scope, receive, send)
        if read is None:
            return
        body, request = read
        model = request.get("model") if isinstance(request, dict) else None
        try:
            check_model_field(model, self.base_models, self.max_model_bytes, self.max_chars)
        except InvalidDescription as e:
            status, error = to_http(e)
            await _send_json(send, status, error)
            return
        replayed = _replay_body(body, receive)
        if not isinstance(model, str) or model in self.base_models:
            await self.app(scope, replayed, send)
            return
        _notify(_arrival_checks, model)
        _in_flight[model] += 1
        try:
            await self.app(scope, replayed, self._description_send(send, model))
        finally:
            _in_flight[model] -= 1
            if _in_flight[model] <= 0:
                del _in_flight[model]
                _notify(_idle_listeners, model)

    def _description_send(self, send: Send, model: str) -> Send:
        """``send`` that adds the adapter's provenance and, to a 503, ``Retry-After``."""
        held: list[Message] = []  # a 503's start, held until its body says how long to wait

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                headers = list(message.get("headers", []))
                if message.get("status") == 200 and (value := adapter_header(model)) is not None:
                    headers.append((ADAPTER_HEADER, value))
                message["headers"] = headers
                if message.get("status") == HTTPStatus.SERVICE_UNAVAILABLE:
                    held.append(message)
                    return
            elif message["type"] == "http.response.body" and held:
                held.append(message)
                if message.get("more_body", False):
                    return
                start, *bodies = held
                held.clear()
                text = b"".join(b.get("body", b"") for b in bodies)
                try:
                    msg = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    msg = ""
                if not any(k.lower() == b"retry-after" for k, _ in start["headers"]):
                    start["headers"].append((b"retry-after", str(retry_after(msg)).encode()))
                await send(start)
                await send({"type": "http.response.body", "body": text, "more_body": False})
                return
            await send(message)

        return wrapped

    def _models_send(self, send: Send) -> Send:
        """``send`` that rewrites the ``/v1/models`` body (`public_models_list`)."""
        held: list[Message] = []

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                held.append(message)
                return
            if message["type"] != "http.response.body" or not held:
                await send(message)
                return
            held.append(message)
            if message.get("more_body", False):
                return
            start, *bodies = held
            held.clear()
            body = b"".join(b.get("body", b"") for b in bodies)
            if start.get("status") == 200:
                body = public_models_list(body, self.base_models, self.list_descriptions)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        return wrapped


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body; None if the client went away first; `BodyTooLarge` once more than
    ``limit`` bytes arrived (the rest is not read)."""
    chunks, more, size = [], True, 0
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


class BodyTooLarge(Exception):
    """A request body over the edge's limit (``LORAGEN_MAX_BODY_BYTES``)."""


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server (h11) refuses a malformed one before the app sees it
    return None


async def _error(send: Send, status: HTTPStatus, message: str) -> None:
    type_ = {HTTPStatus.FORBIDDEN: "PermissionDeniedError", HTTPStatus.NOT_FOUND: "NotFoundError",
             HTTPStatus.BAD_REQUEST: "BadRequestError", HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "BadRequestError"}[status]
    await _send_json(send, status, {"error": {"message": message, "type": type_, "param": None,
                                              "code": status.value}})


async def _send_json(send: Send, status: HTTPStatus, content: dict[str, Any]) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": int(status),
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _replay_body(body: bytes, receive: Receive) -> Receive:
    """A `receive` that first returns the already read ``body``, then defers to the original."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay
