"""HTTP clients of the fault run: one chat request with its outcome, and a client that hangs up.

`chat` sends one OpenAI chat request and returns what the client saw (status, error kind,
seconds, the ``x-loragen-adapter`` and ``Retry-After`` headers, the error message); `Stats`
tallies outcomes, errors by kind and requests past the client's deadline, thread-safe.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    """What one request got back."""

    status: str  # "200", "503", ..., "timeout", "conn_error"
    error: str | None  # error kind (http_503, client_deadline, conn:...), None for a 2xx
    seconds: float
    adapter: str | None = None  # x-loragen-adapter header
    retry_after: str | None = None
    message: str | None = None  # error message of a non-2xx body (first 300 chars)

    @property
    def ok(self) -> bool:
        return self.status == "200"


def parse_adapter_header(value: str | None) -> tuple[str, str] | None:
    """``"<key>; generator=<fingerprint>"`` -> (key, fingerprint); None if absent or malformed."""
    if not value:
        return None
    key, _, rest = value.partition(";")
    fp = rest.strip().removeprefix("generator=")
    key = key.strip()
    if len(key) != 64 or not rest.strip().startswith("generator="):
        return None
    return key, fp


def _error_message(body: bytes) -> str | None:
    try:
        return str(json.loads(body)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return body[:300].decode(errors="replace") or None


def chat(url: str, model: str, deadline_s: float, max_tokens: int = 8) -> Answer:
    """One chat completion for ``model`` (a description or the base model), waited for at most
    ``deadline_s`` seconds (the client's deadline)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello."}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=deadline_s) as r:
            r.read()
            return Answer(str(r.status), None, time.monotonic() - t0, r.headers.get("x-loragen-adapter"))
    except urllib.error.HTTPError as e:
        msg = _error_message(e.read())
        return Answer(str(e.code), f"http_{e.code}", time.monotonic() - t0, e.headers.get("x-loragen-adapter"),
                      e.headers.get("retry-after"), msg)
    except (socket.timeout, TimeoutError):
        return Answer("timeout", "client_deadline", time.monotonic() - t0)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return Answer("conn_error", f"conn:{type(reason).__name__}", time.monotonic() - t0)


def disconnect_mid_generation(port: int, model: str, wait_s: float = 1.5) -> None:
    """Send a request for a new description, then close the socket before the answer comes."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 8}).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    time.sleep(wait_s)
    s.close()


class Stats:
    """Outcomes per phase and kind, errors by kind, requests past the client's deadline."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.past_deadline = 0
        self.total = 0
        self.slowest_s = 0.0

    def add(self, phase: str, kind: str, a: Answer) -> None:
        with self.lock:
            self.total += 1
            self.outcomes[f"{phase}/{kind}:{a.status}"] += 1
            if a.error:
                self.errors[a.error] += 1
            if a.seconds > self.deadline_s or a.error == "client_deadline":
                self.past_deadline += 1
            self.slowest_s = max(self.slowest_s, a.seconds)
