"""`RayBackend` (ray_backend.py) against the generator actor on a real two-node Ray cluster
(tests/fixtures_ray.py), then two ``loragen-vllm serve --ray-address`` servers sharing it.

Tests that stop or kill the actor leave it running again when they end.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

ray = pytest.importorskip("ray")

from loragen_vllm.errors import GeneratorUnavailable, InvalidDescription
from loragen_vllm.ray_actor import (
    NAMESPACE,
    ActorConfig,
    actor_class,
    find_actor,
    start_actor,
    stop_actor,
)
from loragen_vllm.ray_backend import RayBackend
from tests.fixtures_ray import actor_health, start_session_actor, wait_actor_healthy


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
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    seconds, message = out.stdout.split(" ", 1)
    assert "cannot connect to the Ray cluster" in message and "is the Ray head running?" in message
    assert float(seconds) < 10


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
    """SIGKILL the actor's process while calls are in flight: Ray re-sends them to the restarted
    actor, which answers every one (none is lost, none fails)."""
    before = actor_health()
    backend = RayBackend(ray_cluster.address, timeout_s=120)
    descriptions = [f"Extract every date mentioned in document {i}." for i in range(6)]

    async def main():
        tasks = [asyncio.create_task(backend.generate_with_meta(d, 0)) for d in descriptions[:3]]
        await asyncio.sleep(0.005)  # sent; inside the actor's 20 ms batch window at most
        os.kill(before["pid"], signal.SIGKILL)
        answered_before_kill = sum(t.done() for t in tasks)
        # and calls sent while the actor is dead or restarting
        tasks += [asyncio.create_task(backend.generate_with_meta(d, 0)) for d in descriptions[3:]]
        return answered_before_kill, await asyncio.gather(*tasks, return_exceptions=True)

    answered_before_kill, results = asyncio.run(main())
    assert answered_before_kill == 0
    assert not [r for r in results if isinstance(r, BaseException)], results  # none lost
    after = wait_actor_healthy()
    assert after["pid"] != before["pid"] and after["reconstructed"]
    assert after["node_id"] == before["node_id"]  # restarted on its pinned node
    # Every call -- the three in flight at the kill included -- was answered by the restarted
    # actor, with the adapter of its own description.
    assert [meta.actor_pid for _, meta in results] == [after["pid"]] * 6
    assert [meta.description for _, meta in results] == descriptions
    assert after["stats"]["calls"] >= 6


def test_adapters_are_keyed_by_the_fingerprint_returned_with_them(ray_cluster, tiny_generator_ckpt):
    """An actor restarted with another checkpoint: its adapters carry the new fingerprint, and
    the backend's cached fingerprint follows it within the refresh interval, even without a
    generation."""
    from pathlib import Path

    from loragen_vllm.backends import CheckpointInfo

    name = "loragen-fingerprint-test"
    other_ckpt = Path(__file__).resolve().parent.parent / "generator" / "checkpoints" / "default"
    fp_a = CheckpointInfo.read(tiny_generator_ckpt).fingerprint
    fp_b = CheckpointInfo.read(other_ckpt).fingerprint
    assert fp_a != fp_b

    def start(ckpt):
        deadline = time.monotonic() + 60
        while find_actor(name) is not None:  # a killed actor's name is released shortly after
            assert time.monotonic() < deadline
            time.sleep(0.2)
        start_actor(ckpt, name=name, num_gpus=0, num_cpus=0, config=ActorConfig(batch_window_s=0.02))

    start(tiny_generator_ckpt)
    try:
        generating = RayBackend(ray_cluster.address, actor_name=name, timeout_s=120, fingerprint_ttl_s=0.5)
        watching = RayBackend(ray_cluster.address, actor_name=name, timeout_s=120, fingerprint_ttl_s=0.5)

        async def main():
            assert await watching.get_fingerprint() == fp_a
            first = await generating.generate_adapter("Sort the list of numbers.", 0)
            assert first.fingerprint == fp_a
            stop_actor(name)
            await asyncio.get_running_loop().run_in_executor(None, start, str(other_ckpt))
            second = await generating.generate_adapter("Sort the list of numbers.", 0)
            assert second.fingerprint == fp_b and second.files != first.files
            deadline = time.monotonic() + 60
            while await watching.get_fingerprint() != fp_b:  # background refresh after the TTL
                assert time.monotonic() < deadline, "the restarted actor's checkpoint went unnoticed"
                await asyncio.sleep(0.2)

        asyncio.run(main())
    finally:
        stop_actor(name)


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


def _timed_chat(server, model: str) -> tuple[float, float, httpx.Response]:
    """(sent, answered, response); times are time.monotonic()."""
    sent = time.monotonic()
    r = _chat(server, model)
    return sent, time.monotonic(), r


def _adapter_key(r: httpx.Response) -> str:
    """The store key of the adapter that answered (``x-loragen-adapter: <key>; generator=<fp>``)."""
    return r.headers["x-loragen-adapter"].split(";")[0]


def _wait_for_actor(condition, timeout_s: float = 60.0) -> dict:
    """The actor's health once `condition(health)` holds (polled every 50 ms)."""
    deadline = time.monotonic() + timeout_s
    while not condition(health := actor_health()):
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    return health


def test_description_asked_on_two_servers_is_generated_once(ray_servers):
    """Both servers ask the actor for one new description at the same time: both calls are in
    the actor at once, the second joins the first's generation, and the adapter is generated
    once, in one generator pass, for both (a pass of the slow actor takes seconds)."""
    a, b = ray_servers
    d = "Classify the restaurant review as positive or negative."
    before = actor_health()["stats"]
    (sent_a, answered_a, ra), (sent_b, answered_b, rb) = _parallel(lambda s: _timed_chat(s, d), [a, b])
    assert [ra.status_code, rb.status_code] == [200, 200], [ra.text, rb.text]
    assert ra.json()["model"] == rb.json()["model"] == d
    assert max(sent_a, sent_b) < min(answered_a, answered_b)  # both sent before either was answered
    after = actor_health()["stats"]
    counts = {k: after[k] - before[k] for k in ("calls", "joined", "cache_hits", "passes", "generated")}
    # The second call found the first one's generation still in flight and joined it: they
    # overlapped in the actor (one after the other, the second would be a cache hit, not joined).
    # The description went through the generator once, in one pass, for both.
    assert counts == {"calls": 2, "joined": 1, "cache_hits": 0, "passes": 1, "generated": 1}, counts
    key = _adapter_key(ra)
    assert _adapter_key(rb) == key
    assert a.generations(key) == 1 and b.generations(key) == 1  # each published it into its own store
    assert _chat(a, d).status_code == 200  # now from a's store: the actor is not asked
    assert actor_health()["stats"]["calls"] == after["calls"]


def test_a_call_that_joined_an_expiring_one_queues_again_on_its_own_deadline(slow_generator_actor):
    """Two calls for one description share a generation; when the first one's (earlier) deadline
    passes while it waits behind another pass, the second, with time left, is not failed with it:
    it queues again and gets its adapter."""
    from loragen_vllm.errors import Overloaded
    from loragen_vllm.ray_actor import decode_meta

    actor = find_actor()
    joined = actor_health()["stats"]["joined"]
    # one pass of four descriptions: seconds (SLOW_STEPS), long past the short call's deadline
    busy = [actor.generate.remote(f"Occupy the generator for one pass, part {i}.", 0, time.time() + 120)
            for i in range(4)]
    time.sleep(0.3)  # that pass runs
    d = "Name the capital of the given country."
    short = actor.generate.remote(d, 0, time.time() + 0.4)  # passes while it waits behind that pass
    time.sleep(0.05)
    patient = actor.generate.remote(d, 0, time.time() + 120)  # joins the short call
    with pytest.raises(ray.exceptions.RayTaskError) as dropped:
        ray.get(short, timeout=120)
    assert isinstance(dropped.value.cause, Overloaded) and dropped.value.cause.reason == "deadline"
    files, meta = ray.get(patient, timeout=120)
    assert decode_meta(meta).description == d and files
    ray.get(busy, timeout=120)
    assert actor_health()["stats"]["joined"] == joined + 1  # the patient call did join the short one


def test_servers_survive_actor_killed_mid_flight(ray_servers, slow_generator_actor):
    """SIGKILL the actor while both servers' calls are in it, mid-pass. What ray_actor.py and
    ray_backend.py promise: Ray restarts the actor and re-sends the calls that were in flight, and
    calls sent while it is down wait for it; each is answered once the actor is back, if that is
    within the servers' bound on one call (LORAGEN_RAY_TIMEOUT_S), else it is a 503 saying so at
    that bound. Here the restart takes seconds: every request is a 200, its adapter generated by
    the restarted actor, stored intact in its server's store; later requests are answered."""
    from loragen_vllm import envs
    from loragen_vllm.ray_actor import decode_meta
    from loragen_vllm.store import AdapterStore

    ray_timeout_s = envs.default("LORAGEN_RAY_TIMEOUT_S")  # the servers' (not set by the fixtures)
    before = actor_health()
    descriptions = [f"Rewrite the customer email number {i} politely." for i in range(4)]
    jobs = [(ray_servers[i % 2], d) for i, d in enumerate(descriptions)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(_timed_chat, s, d) for s, d in jobs[:2]]
        at_kill = _wait_for_actor(lambda h: h["inflight"] == 2)  # both calls are in the actor
        os.kill(before["pid"], signal.SIGKILL)
        killed_at = time.time()
        # in flight for real: neither adapter was done when the actor died
        assert at_kill["stats"]["generated"] == before["stats"]["generated"], at_kill
        assert not [f for f in futures if f.done()]
        futures += [pool.submit(_timed_chat, s, d) for s, d in jobs[2:]]  # sent while it is down
        replies = [f.result() for f in futures]
    after = wait_actor_healthy()
    restart_s = time.time() - after["uptime_s"] - killed_at  # kill -> the new actor ready
    assert after["pid"] != before["pid"] and after["reconstructed"]
    assert after["node_id"] == before["node_id"]  # restarted on its pinned node
    answers = [(r.status_code, round(answered - sent, 1)) for sent, answered, r in replies]
    if restart_s < ray_timeout_s - 10:  # the case here: all answered, by the restarted actor
        assert [r.status_code for _, _, r in replies] == [200] * 4, (restart_s, [r.text for _, _, r in replies])
        # The restarted actor generated all four, the two in flight at the kill included.
        assert after["stats"]["generated"] == 4, (after["stats"], answers)
    else:  # a restart longer than a call may wait (a very loaded machine): bounded 503s
        for sent, answered, r in replies:
            if r.status_code != 200:
                assert r.status_code == 503 and answered - sent < ray_timeout_s + 15, (restart_s, answers)
                _assert_ok_or_503(r)
    for server in ray_servers:
        assert server.proc.poll() is None and httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    # Nothing lost or corrupt: each answered adapter is in its server's store (every file's
    # sha256 verified), for its description, published once, and byte for byte the adapter the
    # restarted actor generated (now in its result cache).
    fingerprint = slow_generator_actor["fingerprint"]
    served = [(s, d, _adapter_key(r)) for (s, d), (_, _, r) in zip(jobs, replies) if r.status_code == 200]
    for server, d, key in served:
        stored = AdapterStore(server.store).get(key, record_hit=False)
        assert stored is not None, f"adapter {key} of {d!r} is missing or corrupt"
        assert (stored.meta.description, stored.meta.fingerprint) == (d, fingerprint)
        assert server.generations(key) == 1
        files, meta = ray.get(find_actor().generate.remote(d, 0), timeout=120)
        assert decode_meta(meta).cached and decode_meta(meta).actor_pid == after["pid"]
        assert {name: (stored.path / name).read_bytes() for name in files} == files
    # Later requests succeed: the same descriptions from the stores (no generation, the actor
    # not asked), and a new description on both servers.
    calls, generations = actor_health()["stats"]["calls"], [s.generations() for s in ray_servers]
    assert [_chat(s, d).status_code for s, d, _ in served] == [200] * len(served)
    assert actor_health()["stats"]["calls"] == calls and [s.generations() for s in ray_servers] == generations
    new = "List the ingredients named in the recipe."
    assert [_chat(s, new).status_code for s in ray_servers] == [200, 200]
    print(f"restart {restart_s:.1f} s after the kill; answers (status, seconds): {answers}")


def test_actor_gone_503_stored_still_served_then_recovers(ray_servers, slow_generator_ckpt):
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
        start_session_actor(slow_generator_ckpt)
    # The server finds the new actor by name by itself.
    r = _chat(a, "Name the capital city of the country in the question.")
    assert r.status_code == 200, r.text
