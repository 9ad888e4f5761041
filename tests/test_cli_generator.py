"""``loragen-vllm generator start | status | stop`` (cli_generator.py) as a real subprocess on a
real two-node Ray cluster (tests/fixtures_ray.py); a `RayBackend` finds the restarted actor.

The test leaves the actor running again when it ends.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray")

from loragen_vllm.errors import GeneratorUnavailable  # noqa: E402
from loragen_vllm.ray_actor import ACTOR_NAME, NAMESPACE, find_actor  # noqa: E402
from loragen_vllm.ray_backend import RayBackend  # noqa: E402
from tests.fixtures_ray import GEN_RESOURCE  # noqa: E402


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loragen_vllm", "generator", *args],  # the `loragen-vllm` CLI
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_stop_then_start_and_backend_recovers(ray_cluster, generator_actor, tiny_generator_ckpt):
    addr = ["--ray-address", ray_cluster.address]
    backend = RayBackend(ray_cluster.address, timeout_s=30)
    assert "adapter_model.safetensors" in asyncio.run(backend.generate("Name the largest planet.", 0))

    status = _cli("status", *addr)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["fingerprint"] == generator_actor["fingerprint"]

    stopped = _cli("stop", *addr)
    assert stopped.returncode == 0 and "stopped" in stopped.stderr
    with pytest.raises(GeneratorUnavailable, match="generator start"):
        asyncio.run(backend.generate("Name the smallest planet.", 0))
    assert _cli("status", *addr).returncode == 1

    started = _cli(
        "start", *addr, "--checkpoint", str(tiny_generator_ckpt), "--num-gpus", "0",
        "--resources", json.dumps({GEN_RESOURCE: 1}), "--batch-window-ms", "20", "--max-task-retries", "-1",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    assert "started" in started.stderr
    again = _cli("start", *addr, "--checkpoint", str(tiny_generator_ckpt))
    assert again.returncode == 0 and "already running" in again.stderr
    # The same backend object finds the new actor by name.
    assert "adapter_model.safetensors" in asyncio.run(backend.generate("Name the smallest planet.", 0))
    assert backend.fingerprint == generator_actor["fingerprint"]
    assert find_actor(ACTOR_NAME, NAMESPACE) is not None
