"""Chat requests shaped by their description: the system prompt, and answers among named labels.

This ASGI middleware, which `serve` hands to vLLM's OpenAI server (`--middleware`), rewrites the
body of `POST /v1/chat/completions` whose `model` is a description (not the served base model):

* **The description as the system prompt** (`LORAGEN_DESCRIPTION_SYSTEM_PROMPT`, default on;
  `serve --[no-]description-system-prompt`). On the validation tasks, LoRAGen's
  adapters answered better when the chat also carried the description as its system prompt
  (`benchmarks/results/quality_choice.json`): when the messages have no system message, one with
  the description (normalised as the resolver normalises it) is put first.
* **Answers among the labels a description names** (`LORAGEN_LABEL_CHOICE`; `serve
  --label-choice` / `--no-label-choice`). A description that states its labels
  (`loragen_vllm.labels.stated_labels`: the closing sentence ``Answer with one of: "NEG",
  "POS".``, or plain words such as ``Answer Yes or No.``) gets vLLM's structured outputs
  restricted to those labels (``structured_outputs: {"choice": [...]}``), unless the request
  brings its own constraint (`CONSTRAINT_FIELDS`). Measured through the server:
  `benchmarks/results/quality_label_choice_served.md`, `quality_stated_labels.md`.

Anything else passes through unchanged: other routes, bodies that are not a JSON object, invalid
descriptions (the resolver answers those with 400), and bodies over `LORAGEN_MAX_BODY_BYTES`
(which `EdgeGuard`, outside this middleware in `serve`, refuses before they get here).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from loragen_vllm import envs
from loragen_vllm.descriptions import validate_description
from loragen_vllm.errors import InvalidDescription
from loragen_vllm.labels import stated_labels

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CHAT_PATH = "/v1/chat/completions"


# Request fields by which a client constrains the answer itself: label choice leaves those alone.
CONSTRAINT_FIELDS = ("structured_outputs", "response_format", "tools", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar")


def _constrained(request: dict[str, Any]) -> bool:
    """Whether the request constrains its answer itself (a null field or plain-text
    ``response_format`` does not)."""
    fmt = request.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "text":
        request = {k: v for k, v in request.items() if k != "response_format"}
    return any(request.get(k) is not None for k in CONSTRAINT_FIELDS)


def shape_chat(body: bytes, base_models: set[str], system_prompt: bool = True, label_choice: bool = False) -> bytes:
    """The chat request body with the description as the first (system) message (`system_prompt`)
    and answers restricted to the labels the description names (`label_choice`), each where it
    applies; `body` itself when neither does."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):  # vLLM answers malformed (or too deeply nested) JSON itself
        return body
    if not isinstance(request, dict):
        return body
    model, messages = request.get("model"), request.get("messages")
    if not isinstance(model, str) or model in base_models or not isinstance(messages, list):
        return body
    try:
        description = validate_description(model, envs.LORAGEN_MAX_DESCRIPTION_CHARS)
    except InvalidDescription:
        return body
    changed = False
    if system_prompt and not any(isinstance(m, dict) and m.get("role") in ("system", "developer") for m in messages):
        request["messages"] = [{"role": "system", "content": description}, *messages]
        changed = True
    if label_choice and not _constrained(request) and (labels := stated_labels(description)):
        request["structured_outputs"] = {"choice": labels}
        changed = True
    return json.dumps(request).encode() if changed else body


class DescriptionChat:
    """ASGI middleware: see the module docstring. The served model names come from
    `LORAGEN_SERVED_MODEL_NAMES` (set by `serve`), what to do from
    `LORAGEN_DESCRIPTION_SYSTEM_PROMPT` and `LORAGEN_LABEL_CHOICE`."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.base_models = set(envs.LORAGEN_SERVED_MODEL_NAMES)
        self.system_prompt = envs.LORAGEN_DESCRIPTION_SYSTEM_PROMPT
        self.label_choice = envs.LORAGEN_LABEL_CHOICE
        self.max_body_bytes = envs.LORAGEN_MAX_BODY_BYTES  # larger bodies are passed on untouched

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
        if size <= self.max_body_bytes:
            body = shape_chat(body, self.base_models, self.system_prompt, self.label_choice)
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
