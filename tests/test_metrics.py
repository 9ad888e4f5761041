"""loragen's metrics are in the registry vLLM's /metrics serves (real vLLM, real store, no server:
the serving tests check the endpoint itself)."""

from __future__ import annotations

import os

import pytest
from prometheus_client import generate_latest

from loragen_vllm import metrics
from loragen_vllm.store import AdapterStore

FP = "f" * 64


def test_our_metrics_are_in_the_registry_vllm_serves(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)  # one API server: serve's setup
    text = generate_latest(get_prometheus_registry()).decode()
    for name in ("loragen_generations_total", "loragen_generation_seconds_bucket", "loragen_store_lookups_total",
                 "loragen_generations_in_flight", "loragen_generations_queued", "loragen_rejects_total",
                 "loragen_store_adapters", "loragen_store_bytes", "loragen_names_resolved",
                 "loragen_resolutions_total"):
        assert f"\n{name}" in text, name
    for reason in metrics.REJECT_REASONS:  # every reason is exported from the start, at 0
        assert f'loragen_rejects_total{{reason="{reason}"}}' in text


def test_store_metrics_follow_real_store_calls(tmp_path) -> None:
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    store = AdapterStore(tmp_path, max_adapters=2, max_bytes=None)
    files = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": os.urandom(3000)}
    hits, misses = value("loragen_store_lookups_total", result="hit"), value("loragen_store_lookups_total", result="miss")
    for i in range(3):
        store.publish(files, description=f"task {i}", fingerprint=FP, seed=0, generator_kind="t2l")
    assert store.drain(timeout=30)  # the store's limits are enforced after publishing, off the response path
    assert value("loragen_store_adapters") == 2  # the gc after the third publish evicted one
    assert value("loragen_store_bytes") == 2 * sum(len(v) for v in files.values())
    key = store.key("task 2", FP, 0)
    assert store.get(key) is not None and store.get(store.key("task 9", FP, 0)) is None
    assert value("loragen_store_lookups_total", result="hit") == hits + 1
    assert value("loragen_store_lookups_total", result="miss") - misses >= 1
    (store.path(key) / "adapter_model.safetensors").write_bytes(b"broken")
    corrupt = value("loragen_store_lookups_total", result="corrupt")
    assert store.get(key) is None
    assert value("loragen_store_lookups_total", result="corrupt") == corrupt + 1
