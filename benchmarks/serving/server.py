"""The server under test: started by the benchmark through `loragen-vllm serve`, or already running.

A started server runs in its own process group with stdout and stderr in a log file (kept
beside the results, it is where the plugin's timing lines are read from) and is stopped with
SIGINT, then SIGTERM, then SIGKILL, each only to that group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def http_get_json(url: str, timeout: float = 5.0) -> dict | list | None:
    """GET url and parse JSON; None on any failure (connection refused, non-2xx, bad JSON)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read().decode() or "null")
    except (urllib.error.URLError, OSError, ValueError):
        return None


def http_ok(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Server:
    """A vLLM OpenAI server: its root URL (no /v1) and, if we started it, the process."""

    url: str
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    command: list[str] = field(default_factory=list)
    env_overrides: dict[str, str] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return self.url.rstrip("/") + "/v1"

    def served_models(self) -> list[str]:
        data = http_get_json(self.api_url + "/models")
        return [m["id"] for m in data.get("data", [])] if isinstance(data, dict) else []

    def vllm_version(self) -> str | None:
        data = http_get_json(self.url.rstrip("/") + "/version")
        return data.get("version") if isinstance(data, dict) else None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop the server we started (its process group only); no-op for an attached one."""
        p = self.process
        if p is None or p.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                return
            try:
                p.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def attach(url: str, timeout_s: float = 10.0) -> Server:
    """A server already running at `url`; raises if /health does not answer."""
    server = Server(url=url.rstrip("/").removesuffix("/v1"))
    deadline = time.monotonic() + timeout_s
    while not http_ok(server.url + "/health"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no vLLM server answers at {server.url}/health")
        time.sleep(0.5)
    return server


def start(command: list[str], env_overrides: dict[str, str], port: int, log_path: Path,
          timeout_s: float = 900.0) -> Server:
    """Start `command` and wait until /health answers; raises with the log's tail on failure."""
    env = {**os.environ, **env_overrides}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path,
                    command=command, env_overrides=env_overrides)
    deadline = time.monotonic() + timeout_s
    try:
        while not http_ok(server.url + "/health", timeout=2.0):
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode} while starting; "
                                   f"log tail:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become healthy in {timeout_s:.0f} s; "
                                   f"log tail:\n{_tail(log_path)}")
            time.sleep(1.0)
    except BaseException:
        server.stop(grace_s=5.0)
        raise
    return server


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def loragen_serve_prefix() -> list[str]:
    """How to call `loragen-vllm` with this interpreter (works without the console script,
    e.g. on a machine where the project is only on PYTHONPATH)."""
    return [sys.executable, "-m", "loragen_vllm"]
