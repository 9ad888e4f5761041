"""Generator backends: where the resolver plugin gets the adapter of a description it has not stored.

A backend turns a normalised description and a seed into `AdapterFiles` (the PEFT folder's files
as bytes) and says which generator it runs (``fingerprint``, part of every store key, and
``kind``). The resolver only knows the `GeneratorBackend` protocol; two implementations exist:

* `InProcessBackend` (this module): the generator runs inside the API-server process, on a worker
  thread of its own, so vLLM's asyncio event loop never waits on it. Requests that arrive within
  a short window (``batch_window_s``) share one generator pass (``batching.MicroBatcher``).
* ``RayBackend`` (``ray_backend.py``): the generator runs in a named Ray actor.

The fingerprint, kind and rank of an in-process checkpoint are read from its ``config.json``
without loading the weights, so stored adapters are served at once, and even while the
weights cannot be loaded; the weights are loaded on the first generation (then `Generator.load`
checks them against that fingerprint). A generator that fails -- to load, or in a pass --
fails the requests of that pass with `GeneratorUnavailable` (HTTP 503); the next request tries
again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from loragen_vllm import envs
from loragen_vllm.adapter_files import AdapterFiles
from loragen_vllm.batching import MAX_BATCH, MicroBatcher
from loragen_vllm.errors import GeneratorUnavailable

if TYPE_CHECKING:  # importing the generator pulls in torch; only the worker thread needs it
    from generator.api import Generator

logger = logging.getLogger(__name__)

DEFAULT_BATCH_WINDOW_S: float = envs.default("LORAGEN_BATCH_WINDOW_MS") / 1e3  # 5 ms, as the Ray actor


@dataclass(frozen=True)
class Generated:
    """An adapter's files and the generator that made them, as returned with the adapter.

    The resolver keys and publishes the adapter by *this* fingerprint, never by one it read
    earlier: a Ray actor may have restarted with another checkpoint in between.
    """

    files: AdapterFiles
    fingerprint: str
    kind: str


@runtime_checkable
class GeneratorBackend(Protocol):
    """What the resolver needs from a generator, wherever it runs."""

    name: str  # short label for logs: "in-process", "ray"

    @property
    def fingerprint(self) -> str | None:
        """Fingerprint of the generator (hex sha256 of config + weights), None if not known yet."""

    @property
    def kind(self) -> str | None:
        """"loragen" | "t2l", None if not known yet."""

    async def get_fingerprint(self) -> str:
        """The fingerprint, finding it out if needed; raises `GeneratorUnavailable`."""

    async def generate(self, description: str, seed: int = 0) -> AdapterFiles:
        """PEFT files of the adapter for a normalised description; raises `GeneratorUnavailable`."""

    async def generate_adapter(self, description: str, seed: int = 0, *, deadline: float | None = None) -> Generated:
        """The adapter with the fingerprint and kind of the generator that made it. ``deadline``
        (``time.monotonic()`` seconds): a call still waiting for its generator pass then is
        dropped, not generated (`Overloaded`, reason ``deadline``)."""

    def close(self) -> None:
        """Release what the backend holds (threads, handles)."""


# ----------------------------------------------------------------------------------------------
# Checkpoint facts without loading the weights


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``config.json`` of a generator checkpoint says: enough to key and serve its adapters."""

    path: Path
    kind: str
    fingerprint: str
    rank: int  # LoRA rank of the adapters it generates
    base_model: str  # the base model its adapters target, e.g. "HuggingFaceTB/SmolLM2-135M-Instruct"
    modules: tuple[str, ...]  # target modules, e.g. ("q_proj", "v_proj")

    @classmethod
    def read(cls, ckpt_dir: str | Path) -> CheckpointInfo:
        """Read ``<ckpt_dir>/config.json``; raises FileNotFoundError / ValueError with a clear message."""
        from generator.api import CONFIG_FILE, WEIGHTS_FILE  # light: no weights are read

        path = Path(ckpt_dir).expanduser().resolve()
        cfg_path = path / CONFIG_FILE
        if not path.is_dir():
            raise FileNotFoundError(f"generator checkpoint folder not found: {path}")
        if not cfg_path.is_file() or not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"{path} is not a generator checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})"
            )
        try:
            cfg = json.loads(cfg_path.read_text())
            target = cfg["target"]
            return cls(
                path=path,
                kind=str(cfg["kind"]),
                fingerprint=str(cfg["fingerprint"]),
                rank=int(target["rank"]),
                base_model=str(target.get("base_model", cfg.get("base_model", ""))),
                modules=tuple(target["modules"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{cfg_path} is not a valid generator config: {e!r}") from None


# ----------------------------------------------------------------------------------------------
# In-process backend


class InProcessBackend:
    """A generator in this process: one worker thread, micro-batched passes, lazy weights.

    ``generate`` may be awaited from any number of coroutines of one event loop; calls arriving
    within ``batch_window_s`` of the oldest waiting one (same seed) share one generator pass of
    at most ``max_batch`` descriptions. Passes run one at a time on a thread of their own; while
    a window waits, that thread encodes its first description (``encode_early``).
    """

    name = "in-process"

    def __init__(
        self,
        checkpoint: str | Path,
        device: str = "cpu",
        *,
        batch_window_s: float = DEFAULT_BATCH_WINDOW_S,
        max_batch: int = MAX_BATCH,
        encode_early: bool = envs.default("LORAGEN_ENCODE_EARLY"),
    ) -> None:
        self.info = CheckpointInfo.read(checkpoint)
        self.device = device
        self._generator: Generator | None = None
        self._load_lock = threading.Lock()
        self._prepare_s_logged = 0.0  # the batcher's `prepare_s` up to the last pass's log line
        self._batcher: MicroBatcher[str, AdapterFiles] = MicroBatcher(
            self._run_pass, batch_window_s, max_batch, thread_name="loragen-generator",
            prepare=self._encode_early if encode_early else None,
        )

    @property
    def passes(self) -> int:
        """Generator passes run so far (a failed one included)."""
        return self._batcher.stats.passes

    # -- what the resolver needs besides adapters ----------------------------------------------

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def rank(self) -> int:
        return self.info.rank

    async def get_fingerprint(self) -> str:
        return self.info.fingerprint

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, description: str, seed: int = 0) -> AdapterFiles:
        """PEFT files for one normalised description (joins the next generator pass)."""
        return await self._batcher.submit(description, seed)

    async def generate_adapter(self, description: str, seed: int = 0, *, deadline: float | None = None) -> Generated:
        """`generate`, with this checkpoint's fingerprint; dropped unpassed at ``deadline``."""
        files = await self._batcher.submit(description, seed, deadline=deadline)
        return Generated(files, self.info.fingerprint, self.info.kind)

    async def generate_many(self, descriptions: Sequence[str], seed: int = 0) -> list[AdapterFiles]:
        """PEFT files for each normalised description, in order (joining the next pass)."""
        return await self._batcher.submit_many(descriptions, seed)

    def _run_pass(self, descriptions: list[str], seed: int) -> list[AdapterFiles]:
        """Pass thread: one generator pass, adapters serialised to PEFT files."""
        gen = self._load()
        n = self.passes  # this pass's number
        logger.info("generator pass %d started: %d description(s)", n, len(descriptions))
        t0 = time.perf_counter()
        adapters, seconds = gen.generate_timed(descriptions, seed=seed)
        files = [a.to_peft_files() for a in adapters]
        # Encoding done during the window since the last pass (same thread: no race); its
        # description's encode inside this pass was then a cache hit.
        early = self._batcher.stats.prepare_s - self._prepare_s_logged
        self._prepare_s_logged += early
        logger.info(
            "generator pass %d finished: %d adapter(s) in %.4f s (encode %.4f + %.4f during the window, "
            "diffuse %.4f, decode %.4f)",  # benchmarks/serving/server_timings.py parses this line
            n, len(descriptions), time.perf_counter() - t0, seconds.get("encode", 0.0), early,
            seconds.get("diffuse", 0.0), seconds.get("decode", 0.0),
        )
        return files

    def _encode_early(self, description: str) -> None:
        """Pass thread, during a batching window: embed the description now (the encoder caches
        it), so that its pass skips the encoder (`MicroBatcher`'s ``prepare``). Only once the
        generator is loaded: loading (and a load that fails) is the pass's."""
        if self._generator is not None:
            self._generator.encoder.encode([description])

    def _load(self) -> Generator:
        """The loaded generator (loaded on first use; a failed load is retried next time)."""
        with self._load_lock:
            if self._generator is None:
                import torch

                from generator.api import Generator

                if torch.device(self.device).type == "cpu":
                    # This process is vLLM's API server: torch computes nothing else here, and
                    # the engine's workers own the cores. A generator pass on every core
                    # (OpenMP spin-waits) would starve them; one thread keeps requests of
                    # other users moving while an adapter is generated.
                    torch.set_num_threads(envs.LORAGEN_GENERATOR_THREADS)
                t0 = time.perf_counter()
                try:
                    gen = Generator.load(self.info.path, device=self.device)
                except Exception as e:
                    raise GeneratorUnavailable(
                        f"the generator checkpoint could not be loaded ({type(e).__name__}: {e})"
                    ) from e
                if gen.fingerprint != self.info.fingerprint:  # replaced on disk since we started
                    raise GeneratorUnavailable(
                        "the generator checkpoint changed on disk since the server started "
                        f"(fingerprint {gen.fingerprint[:12]}, expected {self.info.fingerprint[:12]})"
                    )
                if torch.device(self.device).type == "cuda":
                    gen.warm_up()  # capture every batch-size bucket's CUDA graph once, now
                self._generator = gen
                logger.info(
                    "loaded %s generator %s (rank %d) on %s in %.1f s",
                    gen.kind, gen.fingerprint[:12], self.info.rank, self.device, time.perf_counter() - t0,
                )
            return self._generator

    def close(self) -> None:
        self._batcher.close()
