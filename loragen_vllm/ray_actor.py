"""The generator as a named, detached Ray actor that every vLLM server of a cluster asks.

One `GeneratorActor` per Ray cluster holds a generator checkpoint (on one GPU where the cluster
has one) and answers ``generate(description, seed)`` with the adapter's PEFT files as bytes
(`AdapterFiles`) plus msgspec-encoded `GeneratedAdapterMeta`. Each server's resolver
(`RayBackend`) publishes those bytes into its node-local store, so the cluster needs no shared
filesystem.

Why an async actor: calls that arrive within ``batch_window_s`` of each other share one
generator pass (``batching.MicroBatcher``, as in the in-process backend). The pass runs in a
worker thread, so the actor's event loop keeps accepting calls (and answering `health`) while
the generator works. Two calls for the same (description, seed) share one pass (in flight) or
one cached result (a bounded LRU of recent results): a description that several servers ask
for is generated once. A failed pass fails its calls with `GeneratorUnavailable`.

Deadlines: a call may carry its caller's deadline (wall-clock seconds, ``time.time()``; the
hosts' clocks are assumed synchronised to well under the deadlines in use). A call past it on
arrival, or still waiting for its generator pass when it passes, is dropped with `Overloaded`
(503 at the server) and not generated; the caller has given up by then.

Failure: the actor is created with ``max_restarts`` and ``max_task_retries``; when its worker
process dies, Ray restarts it (re-running ``__init__``, which reloads the checkpoint) and
re-sends the calls that were in flight. Generation is deterministic in (description, seed), so
a retried call returns the same adapter.

Checkpoint transport: the actor loads its checkpoint from a *path*, which must be readable on
the node the actor is placed on (a shared filesystem, or the same path copied to that node; pin
the actor to that node with ``--resources``). The bytes are deliberately not sent through the
object store: a detached actor outlives the ``generator start`` process that created it, and
large creation arguments are owned by that process, so a restart after it exited could not
fetch them again; a path can always be re-read.

The driver side -- `start_actor`, `find_actor`, `stop_actor`, `connect` -- is what
``loragen-vllm generator start|status|stop`` (``cli_generator.py``) and `RayBackend` use.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec

from loragen_vllm import envs
from loragen_vllm.adapter_files import AdapterFiles
from loragen_vllm.batching import MAX_BATCH, MicroBatcher

NAMESPACE = "loragen"  # Ray namespace of the actor; fixed so every server finds it by name
ACTOR_NAME = "loragen-generator"


# ----------------------------------------------------------------------------------------------
# Data that crosses the Ray boundary


class GeneratedAdapterMeta(msgspec.Struct, frozen=True):
    """What the actor says about one adapter it returns (msgspec msgpack on the wire)."""

    description: str  # normalised description the adapter was generated for
    seed: int
    fingerprint: str  # generator checkpoint fingerprint (part of the store key)
    kind: str  # "loragen" | "t2l"
    batch_size: int  # descriptions in the generator pass that produced it
    seconds: dict[str, float]  # that pass's timings: encode, diffuse, decode, total
    cached: bool  # served from the actor's result cache (no pass for this call)
    actor_pid: int = 0  # the actor process that answered (a restarted actor has another)


def encode_meta(meta: GeneratedAdapterMeta) -> bytes:
    return msgspec.msgpack.encode(meta)


def decode_meta(data: bytes) -> GeneratedAdapterMeta:
    return msgspec.msgpack.decode(data, type=GeneratedAdapterMeta)


@dataclass(frozen=True)
class ActorConfig:
    """How the actor batches and caches. Plain data: passed to the actor at creation."""

    batch_window_s: float = envs.default("LORAGEN_BATCH_WINDOW_MS") / 1e3  # as the in-process backend
    max_batch_size: int = MAX_BATCH  # descriptions per generator pass at most
    encode_early: bool = envs.default("LORAGEN_ENCODE_EARLY")  # encode a window's first description during it
    cache_bytes: int = 256 * 2**20  # LRU budget for recent results (bytes of AdapterFiles)


@dataclass
class ActorStats:
    """Counters of calls the actor reports in `health()` (besides its batcher's `BatchStats`)."""

    calls: int = 0  # generate() calls received
    cache_hits: int = 0  # calls answered from the result cache
    joined: int = 0  # calls that joined an identical call already in flight
    errors: int = 0  # calls that ended with an exception
    expired: int = 0  # calls dropped because their deadline passed before their pass
    last_error: str | None = None


# ----------------------------------------------------------------------------------------------
# The actor (a plain class; `actor_class()` wraps it with ray.remote)


class GeneratorActor:
    """Holds one generator and answers batched, de-duplicated, cached generate calls."""

    def __init__(self, checkpoint: str, config: dict[str, Any] | None = None) -> None:
        import ray
        import torch

        from generator import load_generator

        self.config = ActorConfig(**(config or {}))
        self.checkpoint = checkpoint
        if not Path(checkpoint).is_dir():
            host = os.uname().nodename
            raise FileNotFoundError(
                f"generator checkpoint {checkpoint!r} is not a readable folder on the actor's "
                f"node ({host}); the path must exist on the node the actor is placed on"
            )
        ctx = ray.get_runtime_context()
        cpus = ctx.get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus)))
        self.device = "cuda" if ray.get_gpu_ids() else "cpu"
        t0 = time.perf_counter()
        self.generator = load_generator(checkpoint, device=self.device)
        # Before the first call: loads the text encoder, warms torch and (on a GPU) captures the
        # CUDA graph of every batch-size bucket, so that the actor answers `health` (and
        # `generator start` returns) only once it is really ready.
        self.generator.warm_up()
        self.load_s = time.perf_counter() - t0
        self.started = time.time()
        self.reconstructed = bool(ctx.was_current_actor_reconstructed)
        self.node_id = ctx.get_node_id()
        self.stats = ActorStats()
        self._batcher: MicroBatcher[str, tuple[AdapterFiles, GeneratedAdapterMeta]] = MicroBatcher(
            self._run_pass, self.config.batch_window_s, self.config.max_batch_size, thread_name="generator-pass",
            # during a window: the pass then finds its first description's embedding cached
            prepare=(lambda d: self.generator.encoder.encode([d])) if self.config.encode_early else None,
        )
        self._inflight: dict[tuple[str, int], asyncio.Task[tuple[AdapterFiles, GeneratedAdapterMeta]]] = {}
        self._cache: collections.OrderedDict[tuple[str, int], tuple[AdapterFiles, GeneratedAdapterMeta]] = (
            collections.OrderedDict()
        )
        self._cache_size = 0

    # ------------------------------------------------------------------------------------------
    # Public methods (called through Ray)

    async def generate(
        self, description: str, seed: int = 0, deadline: float | None = None
    ) -> tuple[AdapterFiles, bytes]:
        """The adapter for (description, seed): (PEFT files, msgspec-encoded `GeneratedAdapterMeta`).

        ``deadline`` (``time.time()`` seconds): past it before the call's generator pass, the
        call is dropped (`Overloaded`). Identical calls in flight share the first one's pass; one
        that joined a call whose earlier deadline passed in the queue queues again on its own.
        """
        from loragen_vllm.descriptions import validate_description
        from loragen_vllm.errors import Overloaded

        self.stats.calls += 1
        try:
            description = validate_description(description, max_chars=None)
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise TypeError(f"seed must be an int, got {type(seed).__name__}")
            key = (description, seed)
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.stats.cache_hits += 1
                files, meta = hit
                return files, encode_meta(msgspec.structs.replace(meta, cached=True))
            left = None if deadline is None else deadline - time.time()
            if left is not None and left <= 0:
                raise Overloaded("the call's deadline passed before it reached the actor", reason="deadline")
            mine = None if left is None else time.monotonic() + left
            while True:
                task = self._inflight.get(key)
                joined = task is not None
                if task is None:
                    task = asyncio.ensure_future(self._generate(key, mine))
                    self._inflight[key] = task
                else:
                    self.stats.joined += 1
                try:
                    # shield: a cancelled caller must not cancel the pass others are waiting on
                    files, meta = await asyncio.shield(task)
                except Overloaded as e:
                    # The call it joined had an earlier deadline, which passed in the queue: this
                    # call, with time left, queues again on its own deadline.
                    if joined and e.reason == "deadline" and (mine is None or time.monotonic() < mine):
                        continue
                    raise
                return files, encode_meta(meta)
        except BaseException as e:
            if getattr(e, "reason", None) == "deadline" and not isinstance(e, asyncio.CancelledError):
                self.stats.expired += 1
            self.stats.errors += 1
            self.stats.last_error = f"{type(e).__name__}: {e}"
            raise

    async def fingerprint(self) -> str:
        return self.generator.fingerprint

    async def health(self) -> dict[str, Any]:
        """Liveness and statistics, as plain data (JSON-able)."""
        batches = self._batcher.stats
        return {
            "ok": True,
            "fingerprint": self.generator.fingerprint,
            "kind": self.generator.kind,
            "checkpoint": self.checkpoint,
            "device": self.device,
            "node_id": self.node_id,
            "pid": os.getpid(),
            "host": os.uname().nodename,
            "uptime_s": round(time.time() - self.started, 3),
            "load_s": round(self.load_s, 3),  # checkpoint load + warm-up pass
            "reconstructed": self.reconstructed,
            "queued": self._batcher.waiting,
            "inflight": len(self._inflight),
            "cached": len(self._cache),
            "cache_bytes": self._cache_size,
            "config": asdict(self.config),
            "stats": {
                **asdict(self.stats),
                "passes": batches.passes,
                "failed_passes": batches.failed,
                "expired_in_queue": batches.expired,
                "generated": batches.done,  # adapters generated (sum of successful pass sizes)
                "batch_sizes": dict(batches.batch_sizes),  # pass size -> number of passes
                "encoded_early": batches.prepared,  # descriptions encoded during a window
                "encode_early_s": round(batches.prepare_s, 6),  # their encoding, in all
            },
        }

    # ------------------------------------------------------------------------------------------
    # Generation

    async def _generate(
        self, key: tuple[str, int], deadline: float | None = None
    ) -> tuple[AdapterFiles, GeneratedAdapterMeta]:
        """One (description, seed) through the batcher (dropped there if ``deadline``, monotonic,
        passes first), into the cache; shared by identical calls."""
        try:
            files, meta = await self._batcher.submit(*key, deadline=deadline)
        finally:
            self._inflight.pop(key, None)
        self._remember(key, files, meta)
        return files, meta

    def _run_pass(self, descriptions: list[str], seed: int) -> list[tuple[AdapterFiles, GeneratedAdapterMeta]]:
        """One generator pass (runs in the pass thread): adapters as PEFT bytes + metadata."""
        t0 = time.perf_counter()
        adapters, seconds = self.generator.generate_timed(descriptions, seed=seed)
        files = [a.to_peft_files() for a in adapters]
        seconds = {**{k: float(v) for k, v in seconds.items()}, "total": time.perf_counter() - t0}
        g = self.generator
        return [
            (f, GeneratedAdapterMeta(d, seed, g.fingerprint, g.kind, len(descriptions), seconds, False, os.getpid()))
            for d, f in zip(descriptions, files)
        ]

    def _remember(self, key: tuple[str, int], files: AdapterFiles, meta: GeneratedAdapterMeta) -> None:
        size = sum(len(v) for v in files.values())
        if size > self.config.cache_bytes:
            return
        self._cache[key] = (files, meta)
        self._cache_size += size
        while self._cache_size > self.config.cache_bytes:
            _, (old, _) = self._cache.popitem(last=False)
            self._cache_size -= sum(len(v) for v in old.values())


def actor_class(max_restarts: int = -1, max_task_retries: int = 3):
    """`GeneratorActor` as a Ray actor class (restarts forever by default; calls retried)."""
    import ray

    return ray.remote(max_restarts=max_restarts, max_task_retries=max_task_retries)(GeneratorActor)


# ----------------------------------------------------------------------------------------------
# Starting, finding and stopping the actor (driver side)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raise ConnectionError unless the GCS port of a ``HOST:PORT`` address accepts connections.

    ``ray.init`` retries an unreachable GCS for many minutes without giving up (and ignores
    SIGTERM meanwhile), so the address is tried first. Other address forms are not checked.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"nothing answers at {address} ({e.strerror or e}); is the Ray head running?") from None


def connect(address: str, namespace: str = NAMESPACE) -> None:
    """Connect this process to the Ray cluster at `address` as a driver (idempotent)."""
    import ray

    if ray.is_initialized():
        return
    check_reachable(address)
    ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="WARNING")


def find_actor(name: str = ACTOR_NAME, namespace: str = NAMESPACE):
    """The running actor's handle, or None if there is none (needs `connect` first)."""
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def default_num_gpus() -> int:
    """1 where the cluster has a GPU, else 0 (the actor runs on CPU)."""
    import ray

    return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0


def start_actor(
    checkpoint: str | Path,
    *,
    name: str = ACTOR_NAME,
    namespace: str = NAMESPACE,
    num_gpus: float | None = None,
    num_cpus: float = 1,
    resources: dict[str, float] | None = None,
    config: ActorConfig | None = None,
    max_restarts: int = -1,
    max_task_retries: int = 3,
    ready_timeout_s: float = 300.0,
) -> tuple[Any, dict[str, Any], bool]:
    """Create the detached actor (or find the running one); wait until it answers.

    Returns (handle, health, created). Raises RuntimeError if an actor of that name already
    runs another checkpoint, or if the new actor fails to start (its error is in the message).
    """
    import ray

    checkpoint = str(Path(checkpoint).expanduser().absolute())
    handle = find_actor(name, namespace)
    if handle is not None:
        health = ray.get(handle.health.remote(), timeout=ready_timeout_s)
        if health["checkpoint"] != checkpoint:
            raise RuntimeError(
                f"actor {namespace}/{name} already runs checkpoint {health['checkpoint']} "
                f"(fingerprint {health['fingerprint'][:12]}); stop it first"
            )
        return handle, health, False
    if num_gpus is None:
        num_gpus = default_num_gpus()
    cls = actor_class(max_restarts=max_restarts, max_task_retries=max_task_retries)
    handle = cls.options(
        name=name,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,  # two concurrent starts end with one actor
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        resources=resources or {},
    ).remote(checkpoint, asdict(config or ActorConfig()))
    try:
        health = ray.get(handle.health.remote(), timeout=ready_timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(
            f"actor {namespace}/{name} did not become ready within {ready_timeout_s:.0f} s; is there "
            f"a node with the requested resources (num_gpus={num_gpus}, resources={resources or {}})?"
            " See `ray status`. The actor is left pending; `generator stop` removes it."
        ) from None
    except ray.exceptions.RayActorError as e:
        raise RuntimeError(f"actor {namespace}/{name} failed to start: {e}") from None
    return handle, health, True


def stop_actor(name: str = ACTOR_NAME, namespace: str = NAMESPACE) -> bool:
    """Kill the actor for good (no restart). False if none was running."""
    import ray

    handle = find_actor(name, namespace)
    if handle is None:
        return False
    ray.kill(handle, no_restart=True)
    return True
