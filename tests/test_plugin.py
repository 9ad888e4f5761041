"""The resolver plugin without a server: real store on disk, real generator checkpoint (in-process
backend), vLLM's own LoRARequest and resolver registry. (Through a real vLLM server:
tests/test_serve.py.)"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from vllm.entrypoints.serve.exception_handling.error_response import (
    create_error_response,
)
from vllm.exceptions import RetryableRequestError, VLLMValidationError
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolverRegistry

from loragen_vllm.backends import InProcessBackend
from loragen_vllm.descriptions import validate_description
from loragen_vllm.errors import retry_after_s
from loragen_vllm.plugin import (
    RESOLVER_NAME,
    LoRAGenResolver,
    PluginConfig,
    adapter_of,
    discard_resolved,
    register,
)
from loragen_vllm.store import AdapterStore
from tests.fixtures_serving import break_weights
from tests.procs import key_lock_held_elsewhere

DESC = "Classify the sentiment of a movie review as positive or negative."


@pytest.fixture
def resolver(own_ckpt: Path, tmp_path: Path) -> LoRAGenResolver:
    config = PluginConfig(generator=str(own_ckpt))
    return LoRAGenResolver(config, store=AdapterStore(tmp_path / "store"), backend=InProcessBackend(own_ckpt))



def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def make_resolver(ckpt: Path, store: Path, *, window_s: float = 0.005, **config) -> LoRAGenResolver:
    return LoRAGenResolver(
        PluginConfig(generator=str(ckpt), **config),
        store=AdapterStore(store, lock_timeout_s=config.get("generate_timeout_s", 10)),
        backend=InProcessBackend(ckpt, batch_window_s=window_s),
    )


def vllm_status(exc: BaseException) -> tuple[int, str]:
    """What vLLM's server answers for the exception the resolver raised (its own mapping)."""
    err = create_error_response(exc).error
    return err.code, err.message


def test_resolve_generates_once_and_pins(resolver: LoRAGenResolver) -> None:
    spellings = [DESC, "  " + DESC, DESC.replace(" ", "\n"), DESC + "\t"]
    before = {
        "hit": metric("loragen_store_lookups_total", result="hit"),
        "generated": metric("loragen_generations_total", outcome="ok"),
        "resolved": metric("loragen_resolutions_total"),
    }

    async def main() -> list[LoRARequest]:
        return list(await asyncio.gather(*(resolver.resolve_lora("base", s) for s in spellings)))

    requests = asyncio.run(main())
    store, backend = resolver.store, resolver.backend
    assert isinstance(backend, InProcessBackend) and backend.passes == 1
    # The four overlapped: they shared one in-flight resolution (one lookup, a miss, and one
    # generation). Had they run one after another, the later three would be store hits.
    assert metric("loragen_store_lookups_total", result="hit") == before["hit"]
    assert metric("loragen_generations_total", outcome="ok") - before["generated"] == 1
    assert metric("loragen_resolutions_total") - before["resolved"] == 4
    assert len(store.keys()) == 1 and {r.lora_path for r in requests} == {str(store.path(store.keys()[0]))}
    assert [r.lora_name for r in requests] == spellings
    key = store.keys()[0]
    assert store.get(key, record_hit=False).meta.description == DESC
    assert len(store.pins(key)) == 1 and resolver.remembered == 4
    for s in spellings[:3]:
        resolver.forget(s)
    assert len(store.pins(key)) == 1  # one name still uses it
    resolver.forget(spellings[3])
    assert store.pins(key) == []


def test_stored_adapter_is_not_regenerated_and_corruption_is(resolver: LoRAGenResolver) -> None:
    first = asyncio.run(resolver.resolve_lora("base", DESC))
    asyncio.run(resolver.resolve_lora("base", DESC + " "))
    assert resolver.backend.passes == 1
    weights = Path(first.lora_path) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated on disk
    again = asyncio.run(resolver.resolve_lora("base", " " + DESC))
    assert resolver.backend.passes == 2 and again.lora_path == first.lora_path
    assert resolver.store.get(resolver.store.keys()[0], record_hit=False) is not None


def _resolve_and_die_after(ckpt: str, root: str, step: str) -> None:
    """A server process resolving DESC, killed with SIGKILL right after ``step`` of the publish."""
    store = AdapterStore(root)
    store.step_timer = lambda name, s: os.kill(os.getpid(), signal.SIGKILL) if name == step else None
    resolver = LoRAGenResolver(PluginConfig(generator=ckpt), store=store, backend=InProcessBackend(ckpt))
    asyncio.run(resolver.resolve_lora("base", DESC))
    sys.exit(3)  # never reached: the test fails on this exit code


@pytest.mark.parametrize("step", ["write", "rename"])
def test_a_server_killed_mid_publish_leaves_the_next_one_a_correct_adapter(own_ckpt: Path, tmp_path: Path,
                                                                            step: str) -> None:
    """kill -9 of a real resolver process after the new adapter's files are written (not yet
    visible) or after it is renamed into place (visible, not fsynced, no gc yet): the next
    server serves the generator's exact adapter, generating it only if it was not published."""
    code = f"from tests.test_plugin import _resolve_and_die_after as f; f({str(own_ckpt)!r}, {str(tmp_path)!r}, {step!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    resolver = make_resolver(own_ckpt, tmp_path)
    request = asyncio.run(resolver.resolve_lora("base", DESC))
    assert resolver.backend.passes == (1 if step == "write" else 0)
    expected = asyncio.run(InProcessBackend(own_ckpt).generate(validate_description(DESC)))
    assert {f.name: f.read_bytes() for f in Path(request.lora_path).iterdir() if f.name in expected} == expected
    assert resolver.store.drain(10) and len(resolver.store.keys()) == 1
    assert os.listdir(tmp_path / "quarantine") == []


def test_invalid_description_and_generator_failure_reach_vllm_as_400_and_503(
    resolver: LoRAGenResolver, own_ckpt: Path
) -> None:
    # What vLLM receives from the resolver, rendered by vLLM's own create_error_response.
    with pytest.raises(VLLMValidationError) as bad:
        asyncio.run(resolver.resolve_lora("base", "x" * 5000))
    code, message = vllm_status(bad.value)
    assert code == 400 and "too long" in message and bad.value.parameter == "model"

    break_weights(own_ckpt)
    with pytest.raises(RetryableRequestError) as down:
        asyncio.run(resolver.resolve_lora("base", DESC))
    assert vllm_status(down.value)[0] == 503
    assert resolver.store.keys() == [] and resolver.remembered == 0
    assert not any((resolver.store.root / "pins").iterdir())  # the failed request left no pin

    # A checkpoint that went away after start (the backend not made yet): a 503, not a 500.
    gone = LoRAGenResolver(PluginConfig(generator=str(own_ckpt.parent / "moved")), store=resolver.store)
    with pytest.raises(RetryableRequestError) as missing:
        asyncio.run(gone.resolve_lora("base", DESC))
    code, message = vllm_status(missing.value)
    assert code == 503 and "cannot be set up" in message


def test_register_reads_the_environment(own_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("LORAGEN_GENERATOR", "LORAGEN_RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    LoRAResolverRegistry.resolvers.pop(RESOLVER_NAME, None)
    register()
    assert RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers()
    monkeypatch.setenv("LORAGEN_GENERATOR", str(own_ckpt))
    monkeypatch.setenv("LORAGEN_SEED", "7")
    monkeypatch.setenv("LORAGEN_STORE", str(tmp_path / "store"))
    try:
        register()
        resolver = LoRAResolverRegistry.get_resolver(RESOLVER_NAME)
        assert isinstance(resolver, LoRAGenResolver) and resolver.config.seed == 7
        assert resolver._backend is None and resolver._store is None  # nothing opened yet
        register()  # vLLM calls it again in the same process: the resolver stays
        assert LoRAResolverRegistry.get_resolver(RESOLVER_NAME) is resolver
    finally:
        LoRAResolverRegistry.resolvers.pop(RESOLVER_NAME, None)


# ----------------------------------------------------------------------------------------------
# Bounded waits, abandoned calls, consistency, metrics


def test_a_full_queue_of_pending_generations_is_503_with_retry_after(own_ckpt: Path, tmp_path: Path) -> None:
    resolver = make_resolver(own_ckpt, tmp_path / "store", window_s=1.0, max_pending=1)
    rejects = metric("loragen_rejects_total", reason="queue_full")

    async def main() -> tuple[LoRARequest, BaseException, float]:
        first = asyncio.ensure_future(resolver.resolve_lora("base", DESC))
        await asyncio.sleep(0.3)  # first is pending (its pass waits out the 1 s window)
        assert metric("loragen_generations_in_flight") == 1 and metric("loragen_generations_queued") == 1
        t0 = time.monotonic()
        try:
            await resolver.resolve_lora("base", "Translate English to French.")
        except Exception as e:  # noqa: BLE001
            second, took = e, time.monotonic() - t0
        else:
            raise AssertionError("a second pending generation was admitted")
        return await first, second, took

    first, second, took = asyncio.run(main())
    assert first.lora_path and took < 0.5  # refused at once, not queued
    assert isinstance(second, RetryableRequestError)
    code, message = vllm_status(second)
    assert code == 503 and "too many adapters" in message and retry_after_s(message) == 5
    assert metric("loragen_rejects_total", reason="queue_full") == rejects + 1


def test_the_deadline_counts_queueing_and_an_expired_call_is_not_generated(own_ckpt: Path, tmp_path: Path) -> None:
    resolver = make_resolver(own_ckpt, tmp_path / "store", window_s=2.0, generate_timeout_s=0.5)

    async def main() -> tuple[BaseException, float]:
        t0 = time.monotonic()
        try:
            await resolver.resolve_lora("base", DESC)
        except Exception as e:  # noqa: BLE001
            took = time.monotonic() - t0
            await asyncio.sleep(2.5)  # the batch window ends: the dropped call must not run
            return e, took
        raise AssertionError("resolved past its deadline")

    err, took = asyncio.run(main())
    assert isinstance(err, RetryableRequestError) and vllm_status(err)[0] == 503
    assert 0.4 < took < 1.5
    assert resolver.backend.passes == 0  # waited in the batcher past its deadline: never generated
    assert resolver.store.keys() == []


class SlowPassBackend(InProcessBackend):
    """The in-process backend whose every generation takes `extra_s` longer (a busy generator)."""

    extra_s = 2.5

    async def generate_adapter(self, description: str, seed: int = 0, *, deadline: float | None = None):
        generated = await super().generate_adapter(description, seed, deadline=deadline)
        await asyncio.sleep(self.extra_s)
        return generated


def test_a_request_that_joins_a_generation_late_waits_for_it_on_its_own_deadline(own_ckpt: Path, tmp_path: Path) -> None:
    """A request that joins a generation in flight keeps it going past the first request's
    deadline: the first gets a 503 at its own deadline, the late one the adapter."""
    resolver = LoRAGenResolver(PluginConfig(generator=str(own_ckpt), generate_timeout_s=2.0),
                               store=AdapterStore(tmp_path / "store"), backend=SlowPassBackend(own_ckpt))
    resolver.backend._load()  # loaded now: the timings below are about the generation's deadline

    async def main() -> tuple[BaseException | LoRARequest, BaseException | LoRARequest]:
        first = asyncio.ensure_future(resolver.resolve_lora("base", DESC))
        await asyncio.sleep(1.5)  # the generation started with the first one's deadline (2.0 s)
        late = asyncio.ensure_future(resolver.resolve_lora("base", DESC))  # its deadline: 3.5 s
        return tuple(await asyncio.gather(first, late, return_exceptions=True))

    first, late = asyncio.run(main())
    assert isinstance(first, RetryableRequestError) and vllm_status(first)[0] == 503
    assert isinstance(late, LoRARequest) and len(resolver.store.keys()) == 1
    assert resolver.backend.passes == 1


def test_a_client_that_gives_up_is_not_generated_for(own_ckpt: Path, tmp_path: Path) -> None:
    resolver = make_resolver(own_ckpt, tmp_path / "store", window_s=1.0)

    async def main() -> None:
        gone = asyncio.ensure_future(resolver.resolve_lora("base", DESC))
        await asyncio.sleep(0.3)
        gone.cancel()  # the client disconnected
        await asyncio.sleep(1.5)

    asyncio.run(main())
    assert resolver.backend.passes == 0 and resolver.store.keys() == []
    assert not any((resolver.store.root / "pins").iterdir())


def test_a_key_lock_held_by_a_stopped_process_is_503_within_the_deadline(own_ckpt: Path, tmp_path: Path) -> None:
    resolver = make_resolver(own_ckpt, tmp_path / "store", generate_timeout_s=1.0)
    # Loaded now: the 1 s deadline is about the held lock; loading the generator and the text
    # encoder took longer than that on a busy 2-core CI machine (a clean-clone run, 2026-12-06).
    resolver.backend._load()
    key = AdapterStore.key(DESC, resolver.backend.fingerprint, 0)
    with key_lock_held_elsewhere(tmp_path / "store", key) as holder:
        os.kill(holder.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(RetryableRequestError) as busy:
            asyncio.run(resolver.resolve_lora("base", DESC))
        took = time.monotonic() - t0
        assert took < 2.5 and vllm_status(busy.value)[0] == 503
        other = asyncio.run(resolver.resolve_lora("base", "Translate English to French."))
        assert other.lora_path  # another key is not held up
    assert resolver.backend.passes == 1  # the held key was never generated


def test_stored_adapters_whose_locks_are_held_elsewhere_do_not_hold_up_other_lookups(
        own_ckpt: Path, tmp_path: Path) -> None:
    """Another server process generating 8 keys holds their locks: lookups of those keys (as
    many as the resolver's 8 store threads) must not wait out the store's lock deadline in those
    threads, or the lookup of a 9th, free stored adapter queues behind them past its deadline."""
    names = [f"Task number {i} of a stalled store." for i in range(9)]
    made = make_resolver(own_ckpt, tmp_path / "store")

    async def resolve_all(resolver: LoRAGenResolver, descriptions: list[str]) -> list:
        return list(await asyncio.gather(*(resolver.resolve_lora("base", d) for d in descriptions),
                                         return_exceptions=True))

    assert all(isinstance(r, LoRARequest) for r in asyncio.run(resolve_all(made, names)))
    keys = [made.store.key(n, made.backend.fingerprint, 0) for n in names]
    # A fresh server on the same store: lock waits of 30 s, a 3 s request deadline.
    resolver = LoRAGenResolver(PluginConfig(generator=str(own_ckpt), generate_timeout_s=3.0),
                               store=AdapterStore(tmp_path / "store", lock_timeout_s=30),
                               backend=InProcessBackend(own_ckpt))

    async def main() -> tuple[list, float, object, float]:
        t_held = time.monotonic()
        held = asyncio.ensure_future(resolve_all(resolver, names[:8]))
        await asyncio.sleep(0.3)  # their lookups have started
        t0 = time.monotonic()
        [free] = await resolve_all(resolver, names[8:])
        took = time.monotonic() - t0
        answers = await held
        return answers, time.monotonic() - t_held, free, took

    with key_lock_held_elsewhere(tmp_path / "store", *keys[:8]) as holder:
        os.kill(holder.pid, signal.SIGSTOP)
        held, held_took, free, took = asyncio.run(main())
    assert isinstance(free, LoRARequest) and took < 1.0, f"{free!r} after {took:.2f} s"
    assert [vllm_status(e)[0] for e in held] == [503] * 8  # waited for on the miss path, to the deadline
    assert held_took < 3.0 + 1.5, f"the 503s came {held_took:.1f} s after the requests (deadline 3 s)"
    assert resolver.backend.passes == 0  # nothing was generated again


def test_a_pin_that_cannot_be_dropped_now_ends_with_its_lease(own_ckpt: Path, tmp_path: Path) -> None:
    """Forgetting a name whose key lock another process holds cannot remove the pin file now:
    the pin is no longer renewed (nor spared by this process's gc), so it ends with its lease."""
    resolver = LoRAGenResolver(PluginConfig(generator=str(own_ckpt)), store=AdapterStore(tmp_path / "store",
                               lock_timeout_s=0.5), backend=InProcessBackend(own_ckpt))
    asyncio.run(resolver.resolve_lora("base", DESC))
    key = resolver.store.keys()[0]
    assert key in resolver.store._pins._mine  # renewed while vLLM may load it
    with key_lock_held_elsewhere(tmp_path / "store", key):
        assert resolver.forget(DESC) is True  # its unpin waits 0.5 s for the lock, then gives up
    assert key not in resolver.store._pins._mine and key not in resolver.store._unwritten_pins
    assert len(resolver.store.pins(key)) == 1  # still there, until its lease ends


def test_discard_after_a_failed_load_unpins_and_forgets(resolver: LoRAGenResolver) -> None:
    LoRAResolverRegistry.resolvers[RESOLVER_NAME] = resolver
    try:
        request = asyncio.run(resolver.resolve_lora("base", DESC))
        key = resolver.store.keys()[0]
        assert adapter_of(DESC) == (key, resolver.backend.fingerprint)
        assert Path(request.lora_path).name == key and len(resolver.store.pins(key)) == 1
        assert discard_resolved(DESC) is True
        assert adapter_of(DESC) is None and not resolver.resolved(DESC)
        assert resolver.store.pins(key) == []
        assert discard_resolved(DESC) is False  # already forgotten
        assert metric("loragen_names_resolved") == resolver.remembered == 0
    finally:
        LoRAResolverRegistry.resolvers.pop(RESOLVER_NAME, None)


def test_metrics_move_with_real_resolutions(resolver: LoRAGenResolver) -> None:
    def snap() -> dict[str, float]:
        return {
            "gen_ok": metric("loragen_generations_total", outcome="ok"),
            "gen_seconds": metric("loragen_generation_seconds_count", stage="generate"),
            "total_seconds": metric("loragen_generation_seconds_count", stage="total"),
            "hit": metric("loragen_store_lookups_total", result="hit"),
            "miss": metric("loragen_store_lookups_total", result="miss"),
            "invalid": metric("loragen_rejects_total", reason="invalid"),
        }

    a = snap()
    asyncio.run(resolver.resolve_lora("base", DESC))
    asyncio.run(resolver.resolve_lora("base", "Translate English to French."))
    assert metric("loragen_names_resolved") == 2
    b = snap()
    asyncio.run(resolver.resolve_lora("base", DESC + " "))  # stored: a hit
    with pytest.raises(VLLMValidationError):
        asyncio.run(resolver.resolve_lora("base", ""))
    c = snap()
    assert b["gen_ok"] - a["gen_ok"] == 2 and b["gen_seconds"] - a["gen_seconds"] == 2
    assert b["miss"] - a["miss"] >= 2 and c["hit"] - b["hit"] == 1 and c["gen_ok"] == b["gen_ok"]
    assert c["total_seconds"] - a["total_seconds"] == 3 and c["invalid"] - b["invalid"] == 1
    assert resolver.store.drain(30)  # the store gauges are set by gc, after a publish, in the background
    assert metric("loragen_store_adapters") == 2 and metric("loragen_store_bytes") > 0
    assert metric("loragen_generations_in_flight") == 0 and metric("loragen_generations_queued") == 0


def test_with_the_disk_full_stored_adapters_resolve_and_new_ones_are_503(own_ckpt: Path, tmp_path: Path) -> None:
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True, check=False).returncode:
        pytest.skip("cannot mount a small tmpfs (needs root)")
    try:
        resolver = make_resolver(own_ckpt, mnt / "store")
        first = asyncio.run(resolver.resolve_lora("base", DESC))
        resolver.forget(DESC)
        with open(mnt / "filler", "wb", buffering=0) as f:  # the disk is full from here on
            for block in (1 << 16, 1):
                try:
                    while True:
                        f.write(b"\0" * block)
                except OSError:
                    pass
        again = asyncio.run(resolver.resolve_lora("base", " " + DESC))  # stored: still served
        assert again.lora_path == first.lora_path
        with pytest.raises(RetryableRequestError) as full:
            asyncio.run(resolver.resolve_lora("base", "Translate English to French."))
        code, message = vllm_status(full.value)
        assert code == 503 and "no space left" in message and retry_after_s(message) == 30
        # The pin of the adapter just served could not be written, yet the gc that tried to make
        # room spared it (this process knows it serves it).
        assert Path(again.lora_path).is_dir() and resolver.store.get(Path(again.lora_path).name) is not None
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_early_encoding_follows_its_setting(own_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`LORAGEN_ENCODE_EARLY` reaches the in-process backend: on by default, off with `0`."""
    monkeypatch.setenv("LORAGEN_GENERATOR", str(own_ckpt))
    for value, early in ((None, True), ("0", False), ("1", True)):
        if value is None:
            monkeypatch.delenv("LORAGEN_ENCODE_EARLY", raising=False)
        else:
            monkeypatch.setenv("LORAGEN_ENCODE_EARLY", value)
        config = PluginConfig.from_env()
        assert config is not None and config.encode_early is early
        backend = config.make_backend()
        assert isinstance(backend, InProcessBackend) and (backend._batcher.prepare is not None) is early
        backend.close()
