"""The resolver plugin, the in-process backend and serve's bounded tables, without a server:
real store on disk, real generator checkpoint, vLLM's own LoRARequest / resolver registry.
(Through a real vLLM server: tests/test_serve.py.)"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolverRegistry

from loragen_vllm.backends import CheckpointInfo, GeneratorBackend, InProcessBackend
from loragen_vllm.errors import GeneratorUnavailable, to_http
from loragen_vllm.plugin import RESOLVER_NAME, LoRAGenResolver, PluginConfig, register
from loragen_vllm.serve import BoundedLoRARequests, LockTable, fit_lora_rank, vllm_serve_argv
from loragen_vllm.store import AdapterStore

DESC = "Classify the sentiment of a movie review as positive or negative."


@pytest.fixture
def ckpt(tiny_generator_ckpt: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint (tests break it)."""
    return Path(shutil.copytree(tiny_generator_ckpt, tmp_path / "ckpt"))


@pytest.fixture
def resolver(ckpt: Path, tmp_path: Path) -> LoRAGenResolver:
    config = PluginConfig(generator=str(ckpt))
    return LoRAGenResolver(config, store=AdapterStore(tmp_path / "store"), backend=InProcessBackend(ckpt))


def _break(ckpt: Path) -> bytes:
    weights = ckpt / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:1000])
    return good


# ----------------------------------------------------------------------------------------------
# In-process backend


def test_checkpoint_info_reads_config_without_weights(ckpt: Path) -> None:
    info = CheckpointInfo.read(ckpt)
    from generator.api import Generator

    gen = Generator.load(ckpt)
    assert (info.fingerprint, info.kind, info.rank) == (gen.fingerprint, gen.kind, gen.target.rank)
    with pytest.raises(FileNotFoundError, match="not a generator checkpoint"):
        CheckpointInfo.read(ckpt.parent)


def test_concurrent_calls_share_one_generator_pass(ckpt: Path) -> None:
    backend = InProcessBackend(ckpt, batch_window_s=0.05)
    assert isinstance(backend, GeneratorBackend)
    descriptions = [f"Task {i}: answer the question briefly." for i in range(5)]

    async def main() -> tuple[list[dict[str, bytes]], dict[str, bytes]]:
        together = await asyncio.gather(*(backend.generate(d) for d in descriptions))
        alone = await backend.generate(descriptions[2])
        return list(together), alone

    together, alone = asyncio.run(main())
    assert backend.passes == 2  # five concurrent calls in one pass, then one more
    assert all(set(f) == {"adapter_config.json", "adapter_model.safetensors"} for f in together)
    assert len({f["adapter_model.safetensors"] for f in together}) == 5  # one adapter each
    # a description's adapter does not depend on its batch (up to float rounding)
    from generator.adapter import LoRAAdapter

    a, b = (LoRAAdapter.from_peft_files(f) for f in (together[2], alone))
    for m in a.A:
        assert (a.A[m] - b.A[m]).abs().max() < 1e-4 and (a.B[m] - b.B[m]).abs().max() < 1e-4
    backend.close()


def test_generator_failure_is_generator_unavailable_then_recovers(ckpt: Path) -> None:
    good = _break(ckpt)
    backend = InProcessBackend(ckpt)
    assert backend.fingerprint == CheckpointInfo.read(ckpt).fingerprint  # known without weights
    with pytest.raises(GeneratorUnavailable, match="could not be loaded"):
        asyncio.run(backend.generate(DESC))
    (ckpt / "model.safetensors").write_bytes(good)
    assert "adapter_model.safetensors" in asyncio.run(backend.generate(DESC))  # load retried
    backend.close()


# ----------------------------------------------------------------------------------------------
# Resolver


def test_resolve_generates_once_and_pins(resolver: LoRAGenResolver) -> None:
    spellings = [DESC, "  " + DESC, DESC.replace(" ", "\n"), DESC + "\t"]

    async def main() -> list[LoRARequest]:
        return list(await asyncio.gather(*(resolver.resolve_lora("base", s) for s in spellings)))

    requests = asyncio.run(main())
    store, backend = resolver.store, resolver.backend
    assert isinstance(backend, InProcessBackend) and backend.passes == 1
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


def test_invalid_description_and_generator_failure_map_to_http(resolver: LoRAGenResolver, ckpt: Path) -> None:
    with pytest.raises(Exception) as bad:
        asyncio.run(resolver.resolve_lora("base", "x" * 5000))
    status, body = to_http(bad.value.__cause__)
    assert status == 400 and "too long" in body["error"]["message"]

    _break(ckpt)
    with pytest.raises(Exception) as down:
        asyncio.run(resolver.resolve_lora("base", DESC))
    assert to_http(down.value.__cause__)[0] == 503
    assert resolver.store.keys() == [] and resolver.remembered == 0
    assert not any((resolver.store.root / "pins").iterdir())  # the failed request left no pin


def test_register_reads_the_environment(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("LORAGEN_GENERATOR", "LORAGEN_RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    LoRAResolverRegistry.resolvers.pop(RESOLVER_NAME, None)
    register()
    assert RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers()
    monkeypatch.setenv("LORAGEN_GENERATOR", str(ckpt))
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
# serve: bounded tables, vLLM command line


def test_bounded_lora_requests_is_an_lru_that_reports_what_it_drops() -> None:
    dropped: list[str] = []
    table: BoundedLoRARequests[int] = BoundedLoRARequests(3, on_evict=dropped.append)
    for i, name in enumerate("abc"):
        table[name] = i
    assert table["a"] == 0  # a read makes "a" the most recent
    table["d"] = 3
    assert dropped == ["b"] and list(table) == ["c", "a", "d"]
    for _ in table.values():  # reading while iterating is fine (snapshot)
        table.get("c")
    del table["a"]
    assert dropped == ["b", "a"] and len(table) == 2 and "a" not in table
    # names it may not evict (adapters loaded with --lora-modules) stay and do not count
    many: BoundedLoRARequests[int] = BoundedLoRARequests(10, evictable=lambda n: n != "static")
    many["static"] = -1
    for i in range(10_000):
        many[f"description {i}"] = i
    assert len(many) == 11 and many.evicted == 9_990 and "static" in many


def test_lock_table_drops_only_idle_locks() -> None:
    async def main() -> None:
        locks = LockTable(max_entries=4)
        held = locks["held"]
        await held.acquire()
        for i in range(10):
            locks[f"n{i}"]
        assert len(locks) <= 5 and locks["held"] is held
        held.release()

    asyncio.run(main())


def test_vllm_command_line() -> None:
    assert [fit_lora_rank(r) for r in (1, 4, 8, 9, 64)] == [1, 8, 8, 16, 64]
    argv = vllm_serve_argv(Path("/m/SmolLM2"), "SmolLM2", 4, "127.0.0.1", 9000, ["--max-lora-rank", "32"])
    assert argv[0] == "/m/SmolLM2" and "--enable-lora" in argv
    assert argv[argv.index("--max-lora-rank") + 1] == "8" and argv[-2:] == ["--max-lora-rank", "32"]
