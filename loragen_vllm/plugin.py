"""vLLM LoRA resolver plugin: the ``model`` field of a request is a task description.

vLLM's OpenAI server calls ``LoRAResolver.resolve_lora(base_model_name, lora_name)`` for a model
name it does not know (with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` set; see
``OpenAIServingModels.resolve_lora``). Here ``lora_name`` is a description::

    description --validate--> normalised text --(text, fingerprint, seed)--> store key
        key in store (sha256-verified)  -> pin, LoRARequest(path)
        else generate once, publish     -> pin, LoRARequest(path)

Concurrent requests for one key share one in-flight generation in this process (it runs until
the latest of their deadlines); across server processes the store's per-key lock makes one of
them generate.

Every wait is bounded. Each request has one deadline from its arrival
(``LORAGEN_GENERATE_TIMEOUT_S``) that covers the store lookup, waiting for a miss thread, the
key's store lock (held by another process generating it, or by a stopped one) and the
generation; past it the request is a 503. At most ``LORAGEN_MAX_PENDING`` generations are
pending at once; a new one beyond that is refused at once (`Overloaded`, 503 with a retry-after).
A generation whose callers all gave up (client gone, deadline passed) is dropped before its
generator pass. Metrics of all this: ``metrics.py``. Failures are `LoragenError`s
and become HTTP errors in one place, `_raise_for_vllm` (via ``errors.to_vllm_exception``):
an invalid description is a 400 naming the problem, a failed generator a 503 for that request.

vLLM calls `register` in each of its processes (API server, engine core, workers); it only reads
the configuration (`PluginConfig.from_env`: ``LORAGEN_*`` variables, see ``envs.py``, set by
``loragen-vllm serve``) and registers the resolver. The store and backend are opened on first
use, so only the API server opens them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NoReturn

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from loragen_vllm import envs, metrics
from loragen_vllm.backends import DEFAULT_BATCH_WINDOW_S, Generated, GeneratorBackend
from loragen_vllm.descriptions import MAX_DESCRIPTION_CHARS, validate_description
from loragen_vllm.errors import (
    GeneratorUnavailable,
    InvalidDescription,
    LockTimeout,
    LoragenError,
    Overloaded,
    to_vllm_exception,
)
from loragen_vllm.store import AdapterStore, NewAdapter, StoredAdapter

logger = logging.getLogger(__name__)

RESOLVER_NAME = "loragen"


@dataclass(frozen=True)
class PluginConfig:
    """The resolver's configuration, read from the environment."""

    generator: str | None = None  # checkpoint folder (in-process backend)
    ray_address: str | None = None  # or a Ray cluster with the generator actor
    device: str = "cpu"
    seed: int = 0
    max_description_chars: int = MAX_DESCRIPTION_CHARS
    batch_window_s: float = DEFAULT_BATCH_WINDOW_S
    encode_early: bool = envs.default("LORAGEN_ENCODE_EARLY")  # encode during the window
    generate_timeout_s: float = envs.default("LORAGEN_GENERATE_TIMEOUT_S")  # a request's deadline
    max_pending: int = envs.default("LORAGEN_MAX_PENDING")  # generations pending at once

    @classmethod
    def from_env(cls) -> PluginConfig | None:
        """None when no generator is configured (the plugin then stays out of the way).

        Raises ``envs.InvalidSetting`` for a variable set to a value it cannot have.
        """
        generator, ray_address = envs.LORAGEN_GENERATOR, envs.LORAGEN_RAY_ADDRESS
        if generator is None and ray_address is None:
            return None
        return cls(
            generator=None if generator is None else str(generator),
            ray_address=ray_address,
            device=envs.LORAGEN_GENERATOR_DEVICE,
            seed=envs.LORAGEN_SEED,
            max_description_chars=envs.LORAGEN_MAX_DESCRIPTION_CHARS,
            batch_window_s=envs.LORAGEN_BATCH_WINDOW_MS / 1e3,
            encode_early=envs.LORAGEN_ENCODE_EARLY,
            generate_timeout_s=envs.LORAGEN_GENERATE_TIMEOUT_S,
            max_pending=envs.LORAGEN_MAX_PENDING,
        )

    def make_backend(self) -> GeneratorBackend:
        if self.ray_address is not None:
            from loragen_vllm.ray_backend import RayBackend, checkpoint_fingerprint

            # A local copy of the actor's checkpoint (serve --generator) gives the fingerprint up
            # front, so stored adapters are found even before the actor first answers.
            expected = checkpoint_fingerprint(self.generator) if self.generator else None
            return RayBackend(self.ray_address, expected_fingerprint=expected)
        from loragen_vllm.backends import InProcessBackend

        assert self.generator is not None
        return InProcessBackend(self.generator, self.device, batch_window_s=self.batch_window_s,
                                encode_early=self.encode_early)


@dataclass(eq=False)
class _Generation:
    """One key's resolution in flight in this process, shared by the requests that wait on it."""

    task: asyncio.Future[StoredAdapter] | None = None
    waiters: int = 0
    abandoned: threading.Event = field(default_factory=threading.Event)  # every waiter gave up
    # the latest deadline of the requests that joined it (time.monotonic()): a request that joins
    # late keeps the generation going for its own time; when all have left, `abandoned` stops it
    deadline: float = 0.0


def lora_int_id(key: str) -> int:
    """A stable positive 60-bit id from a store key (vLLM may replace it with its own counter)."""
    return int(key[:15], 16) or 1


class LoRAGenResolver(LoRAResolver):
    """Resolves a description to a stored or freshly generated adapter."""

    def __init__(
        self,
        config: PluginConfig,
        store: AdapterStore | None = None,
        backend: GeneratorBackend | None = None,
    ) -> None:
        self.config = config
        self._store = store
        self._backend = backend
        # Store I/O (hashing, fsync, file locks) runs in threads, never on vLLM's event loop:
        # lookups in `_io`, misses (a thread waits on a key's lock and its generation) in
        # `_misses`, so many generations in flight never hold up lookups that hit.
        self._io = ThreadPoolExecutor(max_workers=8, thread_name_prefix="loragen-store")
        self._misses = ThreadPoolExecutor(max_workers=config.max_pending, thread_name_prefix="loragen-miss")
        self._inflight: dict[str, _Generation] = {}
        self._pending = 0  # misses admitted (waiting for a thread, a lock or the generator)
        self._names: dict[str, str] = {}  # lora_name handed to vLLM -> store key (pinned)
        self._adapters: dict[str, StoredAdapter] = {}  # store key -> the adapter as last verified
        self._holders: dict[str, int] = {}  # store key -> how many remembered names use it
        self._resolving: dict[str, int] = {}  # store key -> requests resolving it right now

    @property
    def store(self) -> AdapterStore:
        if self._store is None:
            self._store = AdapterStore.from_env()
        return self._store

    @property
    def backend(self) -> GeneratorBackend:
        if self._backend is None:
            try:
                self._backend = self.config.make_backend()
            except (OSError, ValueError) as e:  # its checkpoint went away or broke after start: next time
                raise GeneratorUnavailable(f"the generator cannot be set up ({e})") from e
        return self._backend

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        try:
            stored = await self._resolve(lora_name)
        except Exception as e:  # noqa: BLE001 -- every failure leaves through the one mapping
            _raise_for_vllm(e, lora_name)
        return LoRARequest(lora_name=lora_name, lora_int_id=lora_int_id(stored.key), lora_path=str(stored.path))

    async def _resolve(self, lora_name: str) -> StoredAdapter:
        started = time.monotonic()
        deadline = started + self.config.generate_timeout_s
        description = validate_description(lora_name, self.config.max_description_chars)
        fingerprint = await self.backend.get_fingerprint()
        key = AdapterStore.key(description, fingerprint, self.config.seed)
        self._resolving[key] = self._resolving.get(key, 0) + 1  # keeps its pin until remembered
        try:
            gen = self._inflight.get(key)
            if gen is None or gen.abandoned.is_set():  # the first request for this key does the work
                gen = _Generation(deadline=deadline)
                gen.task = asyncio.ensure_future(self._get_or_generate(key, description, gen))
                self._inflight[key] = gen
                gen.task.add_done_callback(lambda _, g=gen: self._inflight.pop(key) if self._inflight.get(key) is g else None)
            gen.deadline = max(gen.deadline, deadline)
            gen.waiters += 1
            try:
                # shield: one request that gives up does not cancel the others' generation;
                # when the last one gives up, `abandoned` stops it before its generator pass.
                stored = await asyncio.wait_for(asyncio.shield(gen.task), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise Overloaded(
                    f"no adapter within the request's deadline of {self.config.generate_timeout_s:g} s",
                    reason="deadline", retry_after_s=int(min(self.config.generate_timeout_s, 60)),
                ) from None
            finally:
                gen.waiters -= 1
                if gen.waiters == 0 and not gen.task.done():
                    gen.abandoned.set()
            self._remember(lora_name, stored)
            metrics.RESOLUTIONS.inc()
            metrics.GENERATION_SECONDS.labels("total").observe(time.monotonic() - started)
            return stored
        finally:
            n = self._resolving[key] - 1
            if n:
                self._resolving[key] = n
            else:
                del self._resolving[key]
                if key not in self._holders:  # failed, or superseded by a new fingerprint's key
                    done = self._unpin_later(key)
                    if done is not None:  # settled before the answer, unless the deadline comes first
                        # (it waits for the key's lock, which the process we timed out on may hold)
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(asyncio.shield(done), max(0.0, deadline - time.monotonic()))

    async def _get_or_generate(self, key: str, description: str, gen: _Generation) -> StoredAdapter:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        hit = await loop.run_in_executor(self._io, self._pinned_get, key)
        metrics.GENERATION_SECONDS.labels("lookup").observe(time.monotonic() - t0)
        if hit is not None:
            return hit
        if self._pending >= self.config.max_pending:
            raise Overloaded(
                f"too many adapters are being generated ({self._pending} pending, the limit is "
                f"{self.config.max_pending})", reason="queue_full", retry_after_s=5,
            )
        self._pending += 1
        metrics.IN_FLIGHT.inc()
        try:
            return await loop.run_in_executor(
                self._misses, self._locked_get_or_generate, key, description, loop, gen, time.monotonic()
            )
        finally:
            self._pending -= 1
            metrics.IN_FLIGHT.dec()

    def _pinned_get(self, key: str) -> StoredAdapter | None:
        """Store thread: the verified adapter, pinned, or None (absent; corrupt: quarantined;
        or its key lock busy: the miss path waits for it until the deadline). It never waits
        for a busy lock: another process generating keys would hold the store threads, and
        every other request's lookup behind them, for a lock deadline each."""
        if not self.store.path(key).exists():
            return None
        try:
            self.store.try_pin(key, timeout=0)  # a pin that cannot be written (disk full) is skipped
        except LockTimeout:
            return None  # being generated by another process: wait for it on the miss path
        return self.store.get(key)

    def _locked_get_or_generate(
        self,
        key: str,
        description: str,
        loop: asyncio.AbstractEventLoop,
        gen: _Generation,
        queued_at: float,
    ) -> StoredAdapter:
        """Miss thread: the store's get-or-create of ``key`` (under its cross-process lock, waited
        for until the generation's deadline: a verified hit if another process or thread was
        first, else a new adapter keyed and published by the fingerprint the generator returned
        with it).

        Pinned before it is looked up, so another process's eviction cannot remove it between
        the lookup and vLLM loading it. (Unpinned by `_resolve` if it is not used after all.)
        """
        entered = time.monotonic()
        metrics.GENERATION_SECONDS.labels("queue").observe(entered - queued_at)
        self._check_wanted(gen)
        made_at = 0.0

        def generate() -> NewAdapter:
            nonlocal made_at
            t0 = time.monotonic()
            metrics.GENERATION_SECONDS.labels("lock").observe(t0 - entered)
            self._check_wanted(gen)
            try:
                generated = self._generate_on_loop(description, loop, gen)
            except Exception:
                metrics.GENERATIONS.labels("error").inc()
                raise
            made_at = time.monotonic()
            metrics.GENERATION_SECONDS.labels("generate").observe(made_at - t0)
            return NewAdapter(
                generated.files,
                description=description,
                fingerprint=generated.fingerprint,  # as returned with the adapter
                seed=self.config.seed,
                generator_kind=generated.kind,
            )

        stored, generated = self.store.get_or_create(key, generate, pin=True, deadline=gen.deadline)
        if generated:
            metrics.GENERATIONS.labels("ok").inc()
            metrics.GENERATION_SECONDS.labels("publish").observe(time.monotonic() - made_at)
            # One line per generated adapter: the honest count of generations (tests read it).
            logger.info(
                "loragen generated adapter key=%s in %.3f s (%s generator %s): %.80r",
                stored.key, made_at - entered, stored.meta.generator_kind,
                stored.meta.fingerprint[:12], description,
            )
        return stored

    def _check_wanted(self, gen: _Generation) -> None:
        """Raise unless some caller still waits for this generation and its deadline holds."""
        if gen.abandoned.is_set():
            raise Overloaded("every request for this adapter gave up before it was generated", reason="abandoned")
        if time.monotonic() >= gen.deadline:
            raise Overloaded("the request's deadline passed before its generation started", reason="deadline")

    def _generate_on_loop(self, description: str, loop: asyncio.AbstractEventLoop, gen: _Generation) -> Generated:
        """Miss thread: the backend's adapter for ``description``, generated on vLLM's event loop
        by the generation's deadline (the latest of its callers', which may move while it runs);
        dropped (cancelled before its generator pass) when every caller gave up."""
        def submit() -> tuple[concurrent.futures.Future[Generated], float]:
            sent = gen.deadline  # the backend drops the call if this passes before its pass
            return asyncio.run_coroutine_threadsafe(
                self.backend.generate_adapter(description, self.config.seed, deadline=sent), loop
            ), sent

        pending, sent = submit()
        while True:
            left = gen.deadline - time.monotonic()
            try:
                return pending.result(timeout=max(0.0, min(left, 0.05)))
            except Overloaded as e:  # dropped at the deadline it was sent with, which a late caller moved
                if e.reason != "deadline" or gen.deadline <= sent or time.monotonic() >= gen.deadline:
                    raise
                pending, sent = submit()
            except concurrent.futures.TimeoutError:
                if gen.abandoned.is_set() or time.monotonic() >= gen.deadline:
                    pending.cancel()
                    if gen.abandoned.is_set():
                        raise Overloaded("every request for this adapter gave up during its generation",
                                         reason="abandoned") from None
                    raise Overloaded("the request's deadline passed during generation", reason="deadline") from None
            except concurrent.futures.CancelledError:
                raise GeneratorUnavailable("the generation was cancelled (the server is shutting down?)") from None

    # -- what vLLM remembers -----------------------------------------------------------------

    def _remember(self, lora_name: str, stored: StoredAdapter) -> None:
        """vLLM will remember ``lora_name``: keep its adapter pinned until `forget`."""
        key = stored.key
        self._adapters[key] = stored
        old = self._names.get(lora_name)
        if old == key:
            return
        self._names[lora_name] = key
        self._holders[key] = self._holders.get(key, 0) + 1
        metrics.NAMES_RESOLVED.set(len(self._names))
        if old is not None:
            self._release(old)

    def forget(self, lora_name: str) -> bool:
        """vLLM forgot ``lora_name`` (evicted or unloaded): unpin its adapter if nothing else uses
        it. True if the name was remembered."""
        key = self._names.pop(lora_name, None)
        if key is None:
            return False
        metrics.NAMES_RESOLVED.set(len(self._names))
        self._release(key)
        return True

    def discard(self, lora_name: str) -> bool:
        """vLLM could not load the adapter it was given for ``lora_name`` (``add_lora`` failed):
        forget the name and unpin its adapter (unless another name or request uses it), so
        nothing outlives the failure. True if the name was remembered."""
        known = self.forget(lora_name)
        if known:
            logger.warning("loragen forgot model %.60r: vLLM could not load its adapter", lora_name)
        return known

    def adapter_of(self, lora_name: str) -> tuple[str, str] | None:
        """(store key, generator fingerprint) of the adapter that answers ``lora_name``, None if
        the name is not resolved (for the ``x-loragen-adapter`` response header)."""
        key = self._names.get(lora_name)
        if key is None or (stored := self._adapters.get(key)) is None:
            return None
        return key, stored.meta.fingerprint

    def unchanged(self, lora_name: str) -> bool:
        """Whether the files of ``lora_name``'s adapter are, by their stat state, still the ones
        the store verified when the name was resolved (True for a name not resolved here).

        vLLM remembers a resolved name and reloads its adapter from disk, unverified, whenever
        it dropped the adapter from its CPU LoRA cache; a name whose files changed must therefore
        be forgotten before vLLM uses it again (``vllm_patches.recheck_on_arrival``). A few
        ``stat`` calls: cheap enough for every request.
        """
        key = self._names.get(lora_name)
        stored = None if key is None else self._adapters.get(key)
        return stored is None or self.store.unchanged(stored)

    def _release(self, key: str) -> None:
        n = self._holders.get(key, 0) - 1
        if n > 0:
            self._holders[key] = n
            return
        self._holders.pop(key, None)
        self._adapters.pop(key, None)
        if key not in self._resolving:
            self._unpin_later(key)

    def _unpin_later(self, key: str) -> asyncio.Future[None] | None:
        """Unpin ``key`` off the event loop, if no name uses it and no request resolves it by then.

        Returns the future of that unpin when a loop runs (else it is done at once).
        """

        def unpin() -> None:
            try:
                with self.store.key_lock(key):  # a concurrent resolution pins under this lock
                    if key not in self._holders and key not in self._resolving:
                        self.store.unpin(key)
            except (LockTimeout, OSError) as e:
                if key not in self._holders and key not in self._resolving:
                    self.store.stop_renewing(key)  # its lease ends
                logger.warning("adapter %s not unpinned now (%s); its pin expires with its lease", key[:12], e)

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no running loop (shutdown, tests): do it now
            unpin()
            return None
        return loop.run_in_executor(self._io, unpin)

    def resolved(self, lora_name: str) -> bool:
        """Whether ``lora_name`` was resolved here and not forgotten since."""
        return lora_name in self._names

    @property
    def remembered(self) -> int:
        """Number of names vLLM currently remembers through this resolver."""
        return len(self._names)


def _raise_for_vllm(err: Exception, lora_name: str) -> NoReturn:
    """The one place a failure becomes an HTTP error: raise what vLLM renders as its status.

    `LoragenError`s keep their message and status (400 invalid description, 503 generator
    unavailable); anything else is a bug or an I/O failure: logged with its traceback, and
    the client gets a 500 that does not leak internals.
    """
    if isinstance(err, Overloaded):
        metrics.reject(err.reason)
    elif isinstance(err, InvalidDescription):
        metrics.reject("invalid")
    elif isinstance(err, GeneratorUnavailable):
        metrics.reject("generator")
    if isinstance(err, LoragenError):
        level = logging.WARNING if isinstance(err, GeneratorUnavailable) else logging.INFO
        logger.log(level, "loragen refused model %.60r: %s (%s)", lora_name, err, err.status.value)
    else:
        logger.error("loragen failed on model %.60r", lora_name, exc_info=err)
    raise to_vllm_exception(err) from err


def _registered() -> LoRAGenResolver | None:
    if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        return None
    r = LoRAResolverRegistry.get_resolver(RESOLVER_NAME)
    return r if isinstance(r, LoRAGenResolver) else None


def discard_resolved(lora_name: str) -> bool:
    """vLLM's ``add_lora`` failed for ``lora_name``: the registered resolver forgets the name
    and unpins its adapter (`LoRAGenResolver.discard`). False if no resolver knows the name."""
    r = _registered()
    return r is not None and r.discard(lora_name)


def adapter_of(lora_name: str) -> tuple[str, str] | None:
    """(store key, generator fingerprint) of the adapter answering ``lora_name`` through the
    registered resolver, None if it is not a resolved description."""
    r = _registered()
    return None if r is None else r.adapter_of(lora_name)


def register() -> None:
    """Entry point of ``vllm.general_plugins``: register the resolver if a generator is configured.

    Idempotent: ``serve`` calls it itself (so it works where the entry point is not installed)
    and vLLM calls it again through the entry point; the configured resolver stays.
    """
    config = PluginConfig.from_env()
    if config is None:
        logger.debug("loragen resolver not registered: neither LORAGEN_GENERATOR nor LORAGEN_RAY_ADDRESS is set")
        return
    if RESOLVER_NAME in LoRAResolverRegistry.get_supported_resolvers():
        current = LoRAResolverRegistry.get_resolver(RESOLVER_NAME)
        if isinstance(current, LoRAGenResolver) and current.config == config:
            return
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, LoRAGenResolver(config))
