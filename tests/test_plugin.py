"""The resolver plugin without a server: real store on disk, real generator checkpoint (in-process
backend), vLLM's own LoRARequest and resolver registry. (Through a real vLLM server:
tests/test_serve.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolverRegistry

from loragen_vllm.backends import InProcessBackend
from loragen_vllm.errors import to_http
from loragen_vllm.plugin import RESOLVER_NAME, LoRAGenResolver, PluginConfig, register
from loragen_vllm.store import AdapterStore
from tests.fixtures_serving import break_weights

DESC = "Classify the sentiment of a movie review as positive or negative."


@pytest.fixture
def resolver(own_ckpt: Path, tmp_path: Path) -> LoRAGenResolver:
    config = PluginConfig(generator=str(own_ckpt))
    return LoRAGenResolver(config, store=AdapterStore(tmp_path / "store"), backend=InProcessBackend(own_ckpt))



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


def test_invalid_description_and_generator_failure_map_to_http(resolver: LoRAGenResolver, own_ckpt: Path) -> None:
    with pytest.raises(Exception) as bad:
        asyncio.run(resolver.resolve_lora("base", "x" * 5000))
    status, body = to_http(bad.value.__cause__)
    assert status == 400 and "too long" in body["error"]["message"]

    break_weights(own_ckpt)
    with pytest.raises(Exception) as down:
        asyncio.run(resolver.resolve_lora("base", DESC))
    assert to_http(down.value.__cause__)[0] == 503
    assert resolver.store.keys() == [] and resolver.remembered == 0
    assert not any((resolver.store.root / "pins").iterdir())  # the failed request left no pin


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
