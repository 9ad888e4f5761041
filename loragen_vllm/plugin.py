"""vLLM LoRA resolver plugin: the ``model`` field of a request is a task description.

vLLM's OpenAI server calls ``LoRAResolver.resolve_lora(base_model_name, lora_name)`` for a model
name it does not know (with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` set; see
``OpenAIServingModels.resolve_lora``). Here ``lora_name`` is a description::

    description --validate--> normalised text --(text, fingerprint, seed)--> store key
        key in store (sha256-verified)  -> pin, LoRARequest(path)
        else generate once, publish     -> pin, LoRARequest(path)

Concurrent requests for one key share one in-flight generation in this process; across server
processes the store's per-key lock makes one of them generate. Failures are `LoragenError`s
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
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NoReturn

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from loragen_vllm import envs
from loragen_vllm.adapter_files import AdapterFiles
from loragen_vllm.backends import DEFAULT_BATCH_WINDOW_S, GeneratorBackend
from loragen_vllm.descriptions import MAX_DESCRIPTION_CHARS, validate_description
from loragen_vllm.errors import GeneratorUnavailable, LoragenError, to_vllm_exception
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
    generate_timeout_s: float = envs.default("LORAGEN_GENERATE_TIMEOUT_S")  # longer is a 503

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
            generate_timeout_s=envs.LORAGEN_GENERATE_TIMEOUT_S,
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
        return InProcessBackend(self.generator, self.device, batch_window_s=self.batch_window_s)


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
        self._misses = ThreadPoolExecutor(max_workers=64, thread_name_prefix="loragen-miss")
        self._inflight: dict[str, asyncio.Future[StoredAdapter]] = {}
        self._names: dict[str, str] = {}  # lora_name handed to vLLM -> store key (pinned)
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
            self._backend = self.config.make_backend()
        return self._backend

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        try:
            stored = await self._resolve(lora_name)
        except Exception as e:  # noqa: BLE001 -- every failure leaves through the one mapping
            _raise_for_vllm(e, lora_name)
        return LoRARequest(lora_name=lora_name, lora_int_id=lora_int_id(stored.key), lora_path=str(stored.path))

    async def _resolve(self, lora_name: str) -> StoredAdapter:
        description = validate_description(lora_name, self.config.max_description_chars)
        fingerprint = await self.backend.get_fingerprint()
        key = AdapterStore.key(description, fingerprint, self.config.seed)
        self._resolving[key] = self._resolving.get(key, 0) + 1  # keeps its pin until remembered
        try:
            task = self._inflight.get(key)
            if task is None:  # the first request for this key in this process does the work
                task = asyncio.ensure_future(self._get_or_generate(key, description, fingerprint))
                self._inflight[key] = task
                task.add_done_callback(lambda _: self._inflight.pop(key, None))
            # shield: a client that disconnects does not cancel the others' generation
            stored = await asyncio.shield(task)
            self._remember(lora_name, stored.key)
            return stored
        finally:
            n = self._resolving[key] - 1
            if n:
                self._resolving[key] = n
            else:
                del self._resolving[key]
                if key not in self._holders:  # failed, or superseded by a new fingerprint's key
                    done = self._unpin_later(key)
                    if done is not None:
                        await done

    async def _get_or_generate(self, key: str, description: str, fingerprint: str) -> StoredAdapter:
        loop = asyncio.get_running_loop()
        hit = await loop.run_in_executor(self._io, self._pinned_get, key)
        if hit is not None:
            return hit
        return await loop.run_in_executor(
            self._misses, self._locked_get_or_generate, key, description, fingerprint, loop
        )

    def _pinned_get(self, key: str) -> StoredAdapter | None:
        """Store thread: pin, then the verified adapter or None (absent, or corrupt: quarantined)."""
        self.store.pin(key)
        return self.store.get(key)

    def _locked_get_or_generate(
        self, key: str, description: str, fingerprint: str, loop: asyncio.AbstractEventLoop
    ) -> StoredAdapter:
        """Miss thread: the store's get-or-create of ``key`` (under its cross-process lock: a
        verified hit if another process or thread was first, else a new adapter).

        Pinned before it is looked up, so another process's eviction cannot remove it between
        the lookup and vLLM loading it. (Unpinned by `_resolve` if it is not used after all.)
        """
        started = 0.0

        def generate() -> NewAdapter:
            nonlocal started
            started = time.perf_counter()
            files = self._generate_on_loop(description, loop)
            return NewAdapter(
                files,
                description=description,
                fingerprint=self.backend.fingerprint or fingerprint,  # the Ray actor may have changed
                seed=self.config.seed,
                generator_kind=self.backend.kind or "unknown",
            )

        stored, generated = self.store.get_or_create(key, generate, pin=True)
        if generated:
            # One line per generated adapter: the honest count of generations (tests read it).
            logger.info(
                "loragen generated adapter key=%s in %.3f s (%s generator %s): %.80r",
                stored.key, time.perf_counter() - started, stored.meta.generator_kind,
                stored.meta.fingerprint[:12], description,
            )
        return stored

    def _generate_on_loop(self, description: str, loop: asyncio.AbstractEventLoop) -> AdapterFiles:
        """Miss thread: the backend's adapter for ``description``, generated on vLLM's event loop;
        a generation longer than ``generate_timeout_s`` is `GeneratorUnavailable`."""
        pending = asyncio.run_coroutine_threadsafe(self.backend.generate(description, self.config.seed), loop)
        try:
            return pending.result(timeout=self.config.generate_timeout_s)
        except concurrent.futures.TimeoutError:
            pending.cancel()
            raise GeneratorUnavailable(
                f"adapter generation took longer than {self.config.generate_timeout_s:.0f} s"
            ) from None

    # -- what vLLM remembers -----------------------------------------------------------------

    def _remember(self, lora_name: str, key: str) -> None:
        """vLLM will remember ``lora_name``: keep its adapter pinned until `forget`."""
        old = self._names.get(lora_name)
        if old == key:
            return
        self._names[lora_name] = key
        self._holders[key] = self._holders.get(key, 0) + 1
        if old is not None:
            self._release(old)

    def forget(self, lora_name: str) -> None:
        """vLLM forgot ``lora_name`` (evicted or unloaded): unpin its adapter if nothing else uses it."""
        key = self._names.pop(lora_name, None)
        if key is not None:
            self._release(key)

    def _release(self, key: str) -> None:
        n = self._holders.get(key, 0) - 1
        if n > 0:
            self._holders[key] = n
            return
        self._holders.pop(key, None)
        if key not in self._resolving:
            self._unpin_later(key)

    def _unpin_later(self, key: str) -> asyncio.Future[None] | None:
        """Unpin ``key`` off the event loop, if no name uses it and no request resolves it by then.

        Returns the future of that unpin when a loop runs (else it is done at once).
        """

        def unpin() -> None:
            with self.store.key_lock(key):  # a concurrent resolution pins under this lock
                if key not in self._holders and key not in self._resolving:
                    self.store.unpin(key)

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
    if isinstance(err, LoragenError):
        level = logging.WARNING if isinstance(err, GeneratorUnavailable) else logging.INFO
        logger.log(level, "loragen refused model %.60r: %s (%s)", lora_name, err, err.status.value)
    else:
        logger.error("loragen failed on model %.60r", lora_name, exc_info=err)
    raise to_vllm_exception(err) from err


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
