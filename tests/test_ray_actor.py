"""The generator actor (ray_actor.py) on a real two-node Ray cluster (tests/fixtures_ray.py),
called directly: placement, what it returns, batching, de-duplication.

The actor holds the tiny trained checkpoint (tests/fixtures_generator.py) and is pinned to the
``lg_gen`` node.
"""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")

from generator import LoRAAdapter
from loragen_vllm.ray_actor import decode_meta, find_actor
from tests.fixtures_ray import GEN_RESOURCE, actor_health


def test_actor_is_pinned_to_its_node(ray_cluster, generator_actor):
    health = actor_health()
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
    before = actor_health()["stats"]
    descriptions = [f"Classify the sentiment of review number {i}." for i in range(8)]
    refs = [find_actor().generate.remote(d, 0) for d in descriptions]
    results = ray.get(refs, timeout=300)
    after = actor_health()["stats"]
    metas = [decode_meta(m) for _, m in results]
    assert [m.description for m in metas] == descriptions
    assert after["generated"] - before["generated"] == 8  # each distinct description once
    new_passes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    assert max(k for k, v in new_passes.items() if v > 0) > 1, new_passes
    assert max(m.batch_size for m in metas) > 1


def test_same_description_is_generated_once(generator_actor):
    before = actor_health()["stats"]
    d = "Translate the sentence into French."
    first = ray.get([find_actor().generate.remote(d, 0) for _ in range(3)])
    again = ray.get(find_actor().generate.remote(d, 0))
    after = actor_health()["stats"]
    assert after["generated"] - before["generated"] == 1
    # The three concurrent calls overlapped: the first started the generation and two joined it
    # in flight (serialised calls would have been cache hits); the fourth call was a cache hit.
    assert after["joined"] - before["joined"] == 2 and after["cache_hits"] - before["cache_hits"] == 1
    assert all(f == first[0][0] for f, _ in first) and again[0] == first[0][0]
    assert decode_meta(again[1]).cached


def test_a_call_past_its_deadline_is_dropped_not_generated(generator_actor):
    from loragen_vllm.errors import Overloaded

    before = actor_health()["stats"]
    late = find_actor().generate.remote("Name the author of the quoted novel.", 0, time.time() - 1)
    with pytest.raises(ray.exceptions.RayTaskError) as dropped:
        ray.get(late, timeout=60)
    assert isinstance(dropped.value.cause, Overloaded) and dropped.value.cause.reason == "deadline"
    on_time = ray.get(find_actor().generate.remote("Name the author of the quoted poem.", 0, time.time() + 60))
    after = actor_health()["stats"]
    assert after["generated"] - before["generated"] == 1  # only the call still wanted
    assert after["expired"] - before["expired"] == 1
    assert decode_meta(on_time[1]).actor_pid == actor_health()["pid"]


def test_a_lone_call_is_encoded_during_its_window(generator_actor):
    """The actor's batching window is not idle: its pass thread encodes the window's first
    description meanwhile (`ActorConfig.encode_early`, on by default), counted in `health()`."""
    before = actor_health()
    assert before["config"]["encode_early"] is True
    for i in range(3):  # one at a time: each call opens a window of its own
        ray.get(find_actor().generate.remote(f"Count the vowels in word number {i}.", 0), timeout=120)
    after = actor_health()["stats"]
    assert after["generated"] - before["stats"]["generated"] == 3
    # Each lone call is prepared unless the actor's loop reached it only after its window (a few
    # ms) had passed; all three that late would mean a stalled actor.
    assert 1 <= after["encoded_early"] - before["stats"]["encoded_early"] <= 3
    assert after["encode_early_s"] > before["stats"]["encode_early_s"]
