"""The in-process generator backend on the tiny trained checkpoint: checkpoint facts without the
weights, concurrent calls sharing one generator pass, a broken generator as GeneratorUnavailable.
(The Ray backend: tests/test_ray_backend.py; batching itself: tests/test_batching.py.)"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from benchmarks.serving.server_timings import _PASS_RE
from loragen_vllm.backends import CheckpointInfo, GeneratorBackend, InProcessBackend
from loragen_vllm.errors import GeneratorUnavailable
from tests.fixtures_serving import break_weights

DESC = "Classify the sentiment of a movie review as positive or negative."



def test_checkpoint_info_reads_config_without_weights(own_ckpt: Path) -> None:
    info = CheckpointInfo.read(own_ckpt)
    from generator.api import Generator

    gen = Generator.load(own_ckpt)
    assert (info.fingerprint, info.kind, info.rank) == (gen.fingerprint, gen.kind, gen.target.rank)
    with pytest.raises(FileNotFoundError, match="not a generator checkpoint"):
        CheckpointInfo.read(own_ckpt.parent)


def test_concurrent_calls_share_one_generator_pass(own_ckpt: Path) -> None:
    backend = InProcessBackend(own_ckpt, batch_window_s=0.05)
    assert isinstance(backend, GeneratorBackend)
    descriptions = [f"Task {i}: answer the question briefly." for i in range(5)]

    async def main() -> tuple[list[dict[str, bytes]], dict[str, bytes]]:
        together = await asyncio.gather(*(backend.generate(d) for d in descriptions))
        alone = await backend.generate(descriptions[2])
        return list(together), alone

    together, alone = asyncio.run(main())
    # five concurrent calls overlapped: one pass held all five (serialised calls would make five
    # passes of one), then the lone call had a pass of its own
    assert backend.passes == 2 and backend._batcher.stats.batch_sizes == {5: 1, 1: 1}
    assert all(set(f) == {"adapter_config.json", "adapter_model.safetensors"} for f in together)
    assert len({f["adapter_model.safetensors"] for f in together}) == 5  # one adapter each
    # a description's adapter does not depend on its batch (up to float rounding)
    from generator import LoRAAdapter

    a, b = (LoRAAdapter.from_peft_files(f) for f in (together[2], alone))
    for m in a.A:
        assert (a.A[m] - b.A[m]).abs().max() < 1e-4 and (a.B[m] - b.B[m]).abs().max() < 1e-4
    backend.close()


def test_a_lone_description_is_encoded_during_its_window(own_ckpt: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The batching window is not idle time: the pass thread embeds the description meanwhile,
    and the pass finds it in the encoder's cache (without `encode_early`, the pass embeds it);
    the pass's log line says how long the early encoding took."""
    caplog.set_level(logging.INFO, logger="loragen_vllm.backends")
    for early in (True, False):
        caplog.clear()
        backend = InProcessBackend(own_ckpt, batch_window_s=0.3, encode_early=early)
        encoder = backend._load().encoder
        in_pass, calls = [False], []  # whether a pass runs; (texts, in a pass) per encoder run
        embed, run_pass = encoder._embed, backend._batcher.run_pass

        def spy_embed(texts: list[str]):
            calls.append((list(texts), in_pass[0]))
            return embed(texts)

        def spy_pass(items: list[str], seed: int):
            in_pass[0] = True
            try:
                return run_pass(items, seed)
            finally:
                in_pass[0] = False

        encoder._embed, backend._batcher.run_pass = spy_embed, spy_pass
        try:
            description = f"Answer with the capital city of the given country ({early})."
            files = asyncio.run(backend.generate(description))
        finally:
            encoder._embed = embed  # the encoder is the process's shared one
            backend.close()
        assert "adapter_model.safetensors" in files
        assert calls == [([description], not early)], calls  # once: before its pass, or in it
        assert backend._batcher.stats.prepared == int(early) and (backend._batcher.stats.prepare_s > 0) == early
        finished = [r.getMessage() for r in caplog.records if "finished" in r.getMessage()]
        assert len(finished) == 1, finished
        parsed = _PASS_RE.search(finished[0])  # the serving benchmark reads this line
        assert parsed is not None and parsed["b"] == "1", finished
        assert (float(parsed["early"]) > 0) == early, finished


def test_generator_failure_is_generator_unavailable_then_recovers(own_ckpt: Path) -> None:
    good = break_weights(own_ckpt)
    backend = InProcessBackend(own_ckpt)
    assert backend.fingerprint == CheckpointInfo.read(own_ckpt).fingerprint  # known without weights
    with pytest.raises(GeneratorUnavailable, match="could not be loaded"):
        asyncio.run(backend.generate(DESC))
    (own_ckpt / "model.safetensors").write_bytes(good)
    assert "adapter_model.safetensors" in asyncio.run(backend.generate(DESC))  # load retried
    backend.close()


def test_generate_adapter_returns_the_fingerprint_with_the_adapter(own_ckpt: Path) -> None:
    backend = InProcessBackend(own_ckpt)
    generated = asyncio.run(backend.generate_adapter(DESC, 0))
    info = CheckpointInfo.read(own_ckpt)
    assert (generated.fingerprint, generated.kind) == (info.fingerprint, info.kind)
    assert generated.files == asyncio.run(backend.generate(DESC, 0))  # same adapter
    backend.close()
