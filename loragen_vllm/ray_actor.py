"""The generator as a named, detached Ray actor that every vLLM server of a cluster asks.

One `GeneratorActor` per Ray cluster holds a generator checkpoint (on one GPU where the cluster
has one) and answers ``generate(description, seed)`` with the adapter's PEFT files as bytes
(`AdapterFiles`) plus msgspec-encoded `AdapterMeta`. Each server's resolver (`RayBackend`)
publishes those bytes into its node-local store, so the cluster needs no shared filesystem.

Why an async actor with a queue: a generator pass over a batch costs about as much as a pass
over one description (the encoder and the denoiser are batched), so calls that arrive within
``batch_window_s`` of each other are collected by one batcher task and run as one pass. The
pass runs in a worker thread, so the actor's event loop keeps accepting calls (and answering
`health`) while the generator works. Two calls for the same (description, seed) share one
pass (in flight) or one cached result (a bounded LRU of recent results): a description that
several servers ask for is generated once.

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

CLI (wired into ``loragen-vllm generator ...``; also ``python -m loragen_vllm.ray_actor``):
``start --ray-address ADDR [--checkpoint CKPT] [--num-gpus N]``, ``status``, ``stop``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec

NAMESPACE = "loragen"  # Ray namespace of the actor; fixed so every server finds it by name
ACTOR_NAME = "loragen-generator"

AdapterFiles = dict[str, bytes]  # the PEFT folder's files (see generator.adapter)


# ----------------------------------------------------------------------------------------------
# Data that crosses the Ray boundary


class AdapterMeta(msgspec.Struct, frozen=True):
    """What the actor says about one adapter it returns (msgspec msgpack on the wire)."""

    description: str  # normalised description the adapter was generated for
    seed: int
    fingerprint: str  # generator checkpoint fingerprint (part of the store key)
    kind: str  # "loragen" | "t2l"
    batch_size: int  # descriptions in the generator pass that produced it
    seconds: dict[str, float]  # that pass's timings: encode, diffuse, decode, total
    cached: bool  # served from the actor's result cache (no pass for this call)


def encode_meta(meta: AdapterMeta) -> bytes:
    return msgspec.msgpack.encode(meta)


def decode_meta(data: bytes) -> AdapterMeta:
    return msgspec.msgpack.decode(data, type=AdapterMeta)


@dataclass(frozen=True)
class ActorConfig:
    """How the actor batches and caches. Plain data: passed to the actor at creation."""

    batch_window_s: float = 0.005  # collect calls arriving this soon after the first into one pass
    max_batch_size: int = 32  # descriptions per generator pass at most
    cache_bytes: int = 256 * 2**20  # LRU budget for recent results (bytes of AdapterFiles)


@dataclass
class ActorStats:
    """Counters the actor reports in `health()`."""

    calls: int = 0  # generate() calls received
    passes: int = 0  # generator passes run
    generated: int = 0  # adapters generated (sum of pass sizes)
    cache_hits: int = 0  # calls answered from the result cache
    joined: int = 0  # calls that joined an identical call already in flight
    errors: int = 0  # calls that ended with an exception
    batch_sizes: dict[int, int] = field(default_factory=dict)  # pass size -> number of passes
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
        # One pass before the first call: loads the text encoder and warms torch, so that the
        # actor answers `health` (and `generator start` returns) only once it is really ready.
        self.generator.generate(["warm-up"], seed=0)
        self.load_s = time.perf_counter() - t0
        self.started = time.time()
        self.reconstructed = bool(ctx.was_current_actor_reconstructed)
        self.node_id = ctx.get_node_id()
        self.stats = ActorStats()
        self._pass_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generator-pass")
        self._queue: asyncio.Queue[tuple[str, int]] | None = None
        self._batcher: asyncio.Task | None = None
        self._inflight: dict[tuple[str, int], asyncio.Future] = {}
        self._cache: collections.OrderedDict[tuple[str, int], tuple[AdapterFiles, AdapterMeta]] = (
            collections.OrderedDict()
        )
        self._cache_size = 0

    # ------------------------------------------------------------------------------------------
    # Public methods (called through Ray)

    async def generate(self, description: str, seed: int = 0) -> tuple[AdapterFiles, bytes]:
        """The adapter for (description, seed): (PEFT files, msgspec-encoded `AdapterMeta`)."""
        from loragen_vllm.descriptions import validate_description

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
            fut = self._inflight.get(key)
            if fut is None:
                fut = asyncio.get_running_loop().create_future()
                self._inflight[key] = fut
                self._ensure_batcher()
                self._queue.put_nowait(key)
            else:
                self.stats.joined += 1
            # shield: a cancelled caller must not cancel the pass others are waiting on
            files, meta = await asyncio.shield(fut)
            return files, encode_meta(meta)
        except BaseException as e:
            self.stats.errors += 1
            self.stats.last_error = f"{type(e).__name__}: {e}"
            raise

    async def fingerprint(self) -> str:
        return self.generator.fingerprint

    async def health(self) -> dict[str, Any]:
        """Liveness and statistics, as plain data (JSON-able)."""
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
            "queued": self._queue.qsize() if self._queue is not None else 0,
            "inflight": len(self._inflight),
            "cached": len(self._cache),
            "cache_bytes": self._cache_size,
            "config": asdict(self.config),
            "stats": asdict(self.stats),
        }

    # ------------------------------------------------------------------------------------------
    # Batching

    def _ensure_batcher(self) -> None:
        # Created lazily: the actor's event loop runs only once methods are called.
        if self._batcher is None or self._batcher.done():
            self._queue = self._queue or asyncio.Queue()
            self._batcher = asyncio.get_running_loop().create_task(self._batch_loop())

    async def _next_batch(self) -> list[tuple[str, int]]:
        """Block for one key, then take whatever else arrives within the window (bounded)."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.config.batch_window_s
        while len(batch) < self.config.max_batch_size:
            if not self._queue.empty():  # calls queued while the last pass ran
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            by_seed: dict[int, list[str]] = {}
            for description, seed in batch:
                by_seed.setdefault(seed, []).append(description)
            for seed, descriptions in by_seed.items():
                try:
                    results = await loop.run_in_executor(self._pass_thread, self._run_pass, descriptions, seed)
                except Exception as e:  # the pass failed: every caller in it gets the error
                    for d in descriptions:
                        fut = self._inflight.pop((d, seed), None)
                        if fut is not None and not fut.done():
                            fut.set_exception(RuntimeError(f"generator pass failed: {type(e).__name__}: {e}"))
                    continue
                self.stats.passes += 1
                self.stats.generated += len(descriptions)
                n = len(descriptions)
                self.stats.batch_sizes[n] = self.stats.batch_sizes.get(n, 0) + 1
                for d, (files, meta) in zip(descriptions, results):
                    self._remember((d, seed), files, meta)
                    fut = self._inflight.pop((d, seed), None)
                    if fut is not None and not fut.done():
                        fut.set_result((files, meta))

    def _run_pass(self, descriptions: list[str], seed: int) -> list[tuple[AdapterFiles, AdapterMeta]]:
        """One generator pass (runs in the pass thread): adapters as PEFT bytes + metadata."""
        t0 = time.perf_counter()
        adapters, seconds = self.generator.generate_timed(descriptions, seed=seed)
        files = [a.to_peft_files() for a in adapters]
        seconds = {**{k: float(v) for k, v in seconds.items()}, "total": time.perf_counter() - t0}
        g = self.generator
        return [
            (f, AdapterMeta(d, seed, g.fingerprint, g.kind, len(descriptions), seconds, False))
            for d, f in zip(descriptions, files)
        ]

    def _remember(self, key: tuple[str, int], files: AdapterFiles, meta: AdapterMeta) -> None:
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

    # Imported by its package name, so that Ray pickles the class by reference even when this
    # file runs as __main__ (``python -m loragen_vllm.ray_actor``).
    from loragen_vllm.ray_actor import GeneratorActor as cls

    return ray.remote(max_restarts=max_restarts, max_task_retries=max_task_retries)(cls)


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


# ----------------------------------------------------------------------------------------------
# CLI: loragen-vllm generator start | status | stop


def add_generator_commands(parser: argparse.ArgumentParser) -> None:
    """Add ``start``, ``status``, ``stop`` under `parser` (the ``generator`` command)."""
    sub = parser.add_subparsers(dest="generator_command", required=True, metavar="{start,status,stop}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--ray-address", required=True, metavar="ADDR", help="Ray cluster address, e.g. 10.0.0.1:6379")
        p.add_argument("--name", default=ACTOR_NAME, help=f"actor name (default {ACTOR_NAME})")
        p.add_argument("--namespace", default=NAMESPACE, help=f"Ray namespace (default {NAMESPACE})")

    p = sub.add_parser("start", help="start the generator actor on the Ray cluster (idempotent)")
    common(p)
    p.add_argument(
        "--checkpoint",
        "--generator",
        dest="checkpoint",
        metavar="CKPT",
        default=None,
        help="generator checkpoint folder; must be readable at this path on the actor's node "
        "(default: $LORAGEN_GENERATOR, else the shipped checkpoint)",
    )
    p.add_argument("--num-gpus", type=float, default=None, metavar="N",
                   help="GPUs for the actor (default: 1 if the cluster has one, else 0)")
    p.add_argument("--num-cpus", type=float, default=1, metavar="N", help="CPUs for the actor (default 1)")
    p.add_argument(
        "--resources",
        type=json.loads,
        default=None,
        metavar="JSON",
        help='custom Ray resources, to pin the actor to a node, e.g. \'{"generator_node": 1}\'',
    )
    p.add_argument("--batch-window-ms", type=float, default=ActorConfig.batch_window_s * 1000, metavar="MS",
                   help="calls arriving this soon after the first share one generator pass (default 5)")
    p.add_argument("--max-batch-size", type=int, default=ActorConfig.max_batch_size, metavar="N",
                   help="descriptions per generator pass at most (default 32)")
    p.add_argument("--cache-mib", type=float, default=ActorConfig.cache_bytes / 2**20, metavar="MIB",
                   help="memory for recent results, so that a description several servers ask for "
                   "is generated once (default 256)")
    p.add_argument("--max-restarts", type=int, default=-1, metavar="N", help="-1: restart forever (default)")
    p.add_argument("--max-task-retries", type=int, default=3, metavar="N",
                   help="times a call in flight when the actor died is re-sent to the restarted one "
                   "(default 3; -1: always)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the actor to be ready")
    p.set_defaults(generator_func=_cmd_start)

    p = sub.add_parser("status", help="print the actor's health and statistics as JSON")
    common(p)
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(generator_func=_cmd_status)

    p = sub.add_parser("stop", help="kill the actor for good")
    common(p)
    p.set_defaults(generator_func=_cmd_stop)


def run_generator_command(args: argparse.Namespace) -> int:
    """Run the parsed ``generator`` subcommand; returns the process exit code."""
    try:
        connect(args.ray_address, args.namespace)
    except Exception as e:  # ConnectionError and friends: say which address failed
        print(f"error: cannot connect to the Ray cluster at {args.ray_address}: {e}", file=sys.stderr)
        return 2
    return args.generator_func(args)


def _default_checkpoint() -> str | None:
    from loragen_vllm.defaults import default_generator_checkpoint

    ckpt = default_generator_checkpoint()  # $LORAGEN_GENERATOR, else the shipped checkpoint
    return None if ckpt is None else str(ckpt)


def _cmd_start(args: argparse.Namespace) -> int:
    checkpoint = args.checkpoint or _default_checkpoint()
    if checkpoint is None:
        from loragen_vllm.defaults import MISSING_GENERATOR

        print(f"error: {MISSING_GENERATOR.replace('--generator', '--checkpoint')}", file=sys.stderr)
        return 2
    config = ActorConfig(
        batch_window_s=args.batch_window_ms / 1000,
        max_batch_size=args.max_batch_size,
        cache_bytes=int(args.cache_mib * 2**20),
    )
    try:
        _, health, created = start_actor(
            checkpoint,
            name=args.name,
            namespace=args.namespace,
            num_gpus=args.num_gpus,
            num_cpus=args.num_cpus,
            resources=args.resources,
            config=config,
            max_restarts=args.max_restarts,
            max_task_retries=args.max_task_retries,
            ready_timeout_s=args.timeout,
        )
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    verb = "started" if created else "already running"
    print(
        f"{args.namespace}/{args.name} {verb}: {health['kind']} generator "
        f"{health['fingerprint'][:12]} on {health['device']} (node {health['node_id'][:12]}, pid {health['pid']})",
        file=sys.stderr,
    )
    print(json.dumps(health, indent=2))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import ray

    handle = find_actor(args.name, args.namespace)
    if handle is None:
        print(f"{args.namespace}/{args.name}: not running", file=sys.stderr)
        return 1
    try:
        health = ray.get(handle.health.remote(), timeout=args.timeout)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
        print(f"{args.namespace}/{args.name}: not answering ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    print(json.dumps(health, indent=2))
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    if stop_actor(args.name, args.namespace):
        print(f"{args.namespace}/{args.name} stopped", file=sys.stderr)
        return 0
    print(f"{args.namespace}/{args.name}: not running", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loragen-vllm generator", description=__doc__.split("\n")[0])
    add_generator_commands(parser)
    return run_generator_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
