"""The generator actor and `RayBackend` on a real two-node Ray cluster (tests/fixtures_ray.py).

The actor holds the tiny trained checkpoint (tests/fixtures_generator.py) and is pinned to the
``lg_gen`` node. Tests that stop or kill the actor leave it running again when they end.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

ray = pytest.importorskip("ray")

from generator import LoRAAdapter  # noqa: E402
from loragen_vllm.errors import GeneratorUnavailable, InvalidDescription  # noqa: E402
from loragen_vllm.ray_actor import (  # noqa: E402
    ACTOR_NAME,
    NAMESPACE,
    ActorConfig,
    actor_class,
    decode_meta,
    find_actor,
    start_actor,
    stop_actor,
)
from loragen_vllm.ray_backend import RayBackend  # noqa: E402
from tests.fixtures_ray import GEN_RESOURCE  # noqa: E402


def _health() -> dict:
    return ray.get(find_actor().health.remote(), timeout=120)


def _wait_healthy(timeout_s: float = 180.0) -> dict:
    """Health of the (re)started actor, waiting through a restart."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return _health()
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, AttributeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loragen_vllm", "generator", *args],  # the `loragen-vllm` CLI
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_backend_without_cluster_is_unavailable_at_once():
    """No Ray head at the address: a 503-type error within seconds (ray.init alone would hang)."""
    from tests.fixtures_serving import free_port

    code = (
        "import asyncio, time\n"
        "from loragen_vllm.errors import GeneratorUnavailable\n"
        "from loragen_vllm.ray_backend import RayBackend\n"
        f"b = RayBackend('127.0.0.1:{free_port()}', timeout_s=30)\n"
        "t0 = time.monotonic()\n"
        "try:\n"
        "    asyncio.run(b.generate('Write a haiku about the sea.', 0))\n"
        "except GeneratorUnavailable as e:\n"
        "    print(round(time.monotonic() - t0, 1), e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    seconds, message = out.stdout.split(" ", 1)
    assert "cannot connect to the Ray cluster" in message and "is the Ray head running?" in message
    assert float(seconds) < 10


def test_actor_is_pinned_to_its_node(ray_cluster, generator_actor):
    health = _health()
    assert health["node_id"] == ray_cluster.node_id(GEN_RESOURCE)
    assert health["node_id"] != ray_cluster.node_id("lg_head")
    assert health["device"] == "cpu" and health["fingerprint"] == generator_actor["fingerprint"]


def test_actor_returns_loadable_adapter_and_meta(generator_actor):
    files, meta_bytes = ray.get(find_actor().generate.remote("Answer with the capital of the country.", 3))
    meta = decode_meta(meta_bytes)
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors"}
    adapter = LoRAAdapter.from_peft_files(files)
    assert adapter.target.rank >= 1
    assert (meta.description, meta.seed, meta.fingerprint) == (
        "Answer with the capital of the country.", 3, generator_actor["fingerprint"],
    )  # fmt: skip


def test_concurrent_calls_are_batched(generator_actor):
    before = _health()["stats"]
    descriptions = [f"Classify the sentiment of review number {i}." for i in range(8)]
    refs = [find_actor().generate.remote(d, 0) for d in descriptions]
    results = ray.get(refs, timeout=300)
    after = _health()["stats"]
    metas = [decode_meta(m) for _, m in results]
    assert [m.description for m in metas] == descriptions
    assert after["generated"] - before["generated"] == 8  # each distinct description once
    new_passes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    assert max(k for k, v in new_passes.items() if v > 0) > 1, new_passes
    assert max(m.batch_size for m in metas) > 1


def test_same_description_is_generated_once(generator_actor):
    before = _health()["stats"]
    d = "Translate the sentence into French."
    first = ray.get([find_actor().generate.remote(d, 0) for _ in range(3)])
    again = ray.get(find_actor().generate.remote(d, 0))
    after = _health()["stats"]
    assert after["generated"] - before["generated"] == 1
    assert (after["joined"] - before["joined"]) + (after["cache_hits"] - before["cache_hits"]) == 3
    assert all(f == first[0][0] for f, _ in first) and again[0] == first[0][0]
    assert decode_meta(again[1]).cached


def test_backend_awaits_without_blocking_the_loop(generator_actor):
    backend = RayBackend(ray.get_runtime_context().gcs_address, timeout_s=120)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        t0 = time.monotonic()
        files = await backend.generate("Summarize the paragraph in one sentence.", 7)
        elapsed = time.monotonic() - t0
        task.cancel()
        return files, ticks, elapsed

    files, ticks, elapsed = asyncio.run(main())
    assert "adapter_model.safetensors" in files
    assert backend.fingerprint == generator_actor["fingerprint"] and backend.kind == generator_actor["kind"]
    # The loop kept running while the actor worked: about one tick per 10 ms.
    assert ticks >= 0.3 * elapsed / 0.01, (ticks, elapsed)


def test_backend_passes_invalid_description_through(generator_actor):
    backend = RayBackend(ray.get_runtime_context().gcs_address, timeout_s=60)
    with pytest.raises(InvalidDescription, match="control character"):
        asyncio.run(backend.generate("bad\x00description", 0))


def test_backend_wait_is_bounded_when_actor_cannot_start(ray_cluster, tiny_generator_ckpt):
    name = "loragen-unplaceable"
    handle = actor_class().options(
        name=name, namespace=NAMESPACE, resources={"no_such_node": 1}, num_cpus=0
    ).remote(str(tiny_generator_ckpt))
    try:
        backend = RayBackend(ray_cluster.address, actor_name=name, timeout_s=2)
        t0 = time.monotonic()
        with pytest.raises(GeneratorUnavailable, match="did not finish within 2 s"):
            asyncio.run(backend.generate("Write a haiku about the sea.", 0))
        assert time.monotonic() - t0 < 10
    finally:
        ray.kill(handle, no_restart=True)


def test_kill_actor_while_requests_in_flight(ray_cluster, generator_actor):
    """SIGKILL the actor's process mid-flight: each request ends in an adapter or a 503 message."""
    before = _health()
    backend = RayBackend(ray_cluster.address, timeout_s=60)
    descriptions = [f"Extract every date mentioned in document {i}." for i in range(6)]

    async def main():
        tasks = [asyncio.create_task(backend.generate(d, 0)) for d in descriptions[:3]]
        await asyncio.sleep(0.05)  # calls submitted, first pass under way
        os.kill(before["pid"], signal.SIGKILL)
        # and calls sent while the actor is dead or restarting: in flight for certain
        tasks += [asyncio.create_task(backend.generate(d, 0)) for d in descriptions[3:]]
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    for r in results:
        if isinstance(r, BaseException):
            assert isinstance(r, GeneratorUnavailable), repr(r)
            assert "retry later" in str(r) and backend.where in str(r)
        else:
            assert "adapter_model.safetensors" in r
    after = _wait_healthy()
    assert after["pid"] != before["pid"] and after["reconstructed"]
    assert after["node_id"] == before["node_id"]  # restarted on its pinned node
    # Calls in flight at the kill reached the restarted actor (Ray re-sent them), or timed out.
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert after["stats"]["calls"] >= 1 or len(ok) < len(results)
    files = asyncio.run(backend.generate("Count the vowels in the word.", 0))
    assert "adapter_model.safetensors" in files


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


# ----------------------------------------------------------------------------------------------
# End to end: two vLLM servers (serve --ray-address) share the actor


def _chat(server, model: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": model, "max_tokens": 4, "temperature": 0,
              "messages": [{"role": "user", "content": "The soup was cold and the waiter rude."}]},
        timeout=300,
    )  # fmt: skip


def _parallel(fn, args: list) -> list:
    with ThreadPoolExecutor(len(args)) as pool:
        return list(pool.map(fn, args))


def _assert_ok_or_503(r: httpx.Response) -> None:
    assert r.status_code in (200, 503), (r.status_code, r.text)
    if r.status_code == 503:
        message = r.json()["error"]["message"]
        assert "generator actor" in message and "retry later" in message, message


def test_description_asked_on_two_servers_is_generated_once(ray_servers):
    a, b = ray_servers
    d = "Classify the restaurant review as positive or negative."
    before = _health()["stats"]
    replies = _parallel(lambda s: _chat(s, d), [a, b])
    assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
    assert all(r.json()["model"] == d for r in replies)
    after = _health()["stats"]
    assert after["generated"] - before["generated"] == 1  # one generator pass for both servers
    shared = (after["joined"] - before["joined"]) + (after["cache_hits"] - before["cache_hits"])
    assert shared == 1
    assert a.generations() >= 1 and b.generations() >= 1  # each published it into its own store
    assert _chat(a, d).status_code == 200  # now from a's store: the actor is not asked
    assert _health()["stats"]["calls"] == after["calls"]


def test_servers_survive_actor_killed_mid_flight(ray_servers):
    before = _health()
    descriptions = [f"Rewrite the customer email number {i} politely." for i in range(4)]
    jobs = [(ray_servers[i % 2], d) for i, d in enumerate(descriptions)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(_chat, s, d) for s, d in jobs[:2]]
        time.sleep(0.5)  # requests reach the actor
        os.kill(before["pid"], signal.SIGKILL)
        futures += [pool.submit(_chat, s, d) for s, d in jobs[2:]]  # sent while it is down
        replies = [f.result() for f in futures]
    for r in replies:
        _assert_ok_or_503(r)
    for server in ray_servers:
        assert server.proc.poll() is None and httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    after = _wait_healthy()
    assert after["pid"] != before["pid"]
    assert after["stats"]["calls"] >= 1 or any(r.status_code == 503 for r in replies)
    r = _chat(ray_servers[0], "List the ingredients named in the recipe.")
    assert r.status_code == 200, r.text


def test_actor_gone_503_stored_still_served_then_recovers(ray_cluster, ray_servers, tiny_generator_ckpt):
    a, _ = ray_servers
    stored = "Classify the restaurant review as positive or negative."  # generated above
    assert _chat(a, stored).status_code == 200
    assert stop_actor()
    try:
        r = _chat(a, "Name the capital city of the country in the question.")
        assert r.status_code == 503
        assert "generator start" in r.json()["error"]["message"]
        assert _chat(a, stored).status_code == 200  # stored adapters keep working
    finally:
        start_actor(tiny_generator_ckpt, num_gpus=0, resources={GEN_RESOURCE: 1},
                    config=ActorConfig(batch_window_s=0.02), max_task_retries=-1)  # fmt: skip
    # The server finds the new actor by name by itself.
    r = _chat(a, "Name the capital city of the country in the question.")
    assert r.status_code == 200, r.text
