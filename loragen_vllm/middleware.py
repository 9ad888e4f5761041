"""The task description as the system prompt, beside the adapter generated from it.

On the validation tasks, LoRAGen's adapters answered better when the chat also carried the
description as its system prompt (`benchmarks/results/quality_choice.json`), so `serve` does
that by default (`--no-description-system-prompt` turns it off). This ASGI middleware, which
`serve` hands to vLLM's OpenAI server (`--middleware`), rewrites the body of
`POST /v1/chat/completions`: when `model` is a description (not the served base model) and the
messages have no system message, a system message with the description (normalised as the
resolver normalises it) is put first. Anything else passes through unchanged: other routes,
bodies that are not a JSON object, invalid descriptions (the resolver answers those with 400),
chats that bring their own system prompt, and bodies over `MAX_BODY_BYTES`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from loragen_vllm import envs
from loragen_vllm.descriptions import validate_description
from loragen_vllm.errors import InvalidDescription

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CHAT_PATH = "/v1/chat/completions"
MAX_BODY_BYTES = 8 << 20  # larger bodies are passed on untouched


def with_description_system_prompt(body: bytes, base_models: set[str]) -> bytes:
    """The request body with the description as the first (system) message, or `body` unchanged."""
    try:
        request = json.loads(body)
    except ValueError:
        return body
    if not isinstance(request, dict):
        return body
    model, messages = request.get("model"), request.get("messages")
    if not isinstance(model, str) or model in base_models or not isinstance(messages, list):
        return body
    if any(isinstance(m, dict) and m.get("role") in ("system", "developer") for m in messages):
        return body
    try:
        description = validate_description(model, envs.LORAGEN_MAX_DESCRIPTION_CHARS)
    except InvalidDescription:
        return body
    request["messages"] = [{"role": "system", "content": description}, *messages]
    return json.dumps(request).encode()


class DescriptionSystemPrompt:
    """ASGI middleware: see the module docstring. The served model names come from
    `LORAGEN_SERVED_MODEL_NAMES` (set by `serve`)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.base_models = set(envs.LORAGEN_SERVED_MODEL_NAMES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") != CHAT_PATH:
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if size <= MAX_BODY_BYTES:
            body = with_description_system_prompt(body, self.base_models)
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        request = {"type": "http.request", "body": body, "more_body": False}
        await self.app({**scope, "headers": headers}, _replay([request], receive), send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that first returns `messages`, then defers to the original."""
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay
