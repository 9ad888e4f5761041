"""`RayBackend`: generate adapters by asking the cluster's `GeneratorActor` (``serve --ray-address``).

The resolver plugin awaits `generate`, which sends one call to the named actor and awaits the
returned ObjectRef on vLLM's event loop (``asyncio.wrap_future(ref.future())``): nothing blocks
the loop. Calls that talk to the GCS synchronously (``ray.init``, ``ray.get_actor``) run in a
worker thread. Every call has one deadline (``timeout_s``) covering connecting, finding the actor
and generating; past it, or when the actor is gone, the caller gets `GeneratorUnavailable`
(HTTP 503) with a message saying what failed. Adapters already in the store never reach this
backend, so they keep working while the actor is away.

Recovery needs no restart of the server: a handle whose actor died for good (``generator stop``,
then ``start`` again) is dropped and the actor is looked up by name again on the next call; a
handle to an actor that Ray is restarting stays valid (Ray queues and retries the calls; a call
answered "actor unavailable" meanwhile is sent again until its deadline). A call that timed out
is not cancelled: if it had not reached a generator pass by its deadline the actor drops it;
if it had, the actor finishes it and keeps the result in its cache, so the client's retry is
answered at once.

The fingerprint (part of every store key) is the actor's; it is learnt on first contact and from
every answer, and kept, so store lookups work while the actor is unreachable. A server that
starts while the actor is down can be given the fingerprint up front (`expected_fingerprint`).
Each adapter is keyed by the fingerprint returned *with it* (`generate_adapter` -> `Generated`),
never by the cached one, and the cached one is re-asked in the background every
``$LORAGEN_RAY_FINGERPRINT_TTL_S`` (default 30 s): an actor that Ray restarted with another
checkpoint is noticed even while every request is a store hit.

Deadlines: `generate_adapter` sends the caller's deadline (as wall-clock time) with the call; the
actor drops a call still waiting for its generator pass at that time (`Overloaded`, 503).

Losing the Ray head: Ray ends a driver process whose GCS has been unreachable for 60 s
(``RAY_gcs_rpc_server_reconnect_timeout_s``). A vLLM server must not die with the head, so the
backend raises that limit for its process (unless it is set already) before connecting. Without
the head, stored adapters are served and new descriptions get 503 after the bounded wait; a
restarted head (without GCS fault tolerance) is a new cluster, and the server must be restarted
to join it.

``$LORAGEN_RAY_TIMEOUT_S`` (default 60) is the bound on one call when `timeout_s` is not given
(the plugin does not give it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from loragen_vllm import envs
from loragen_vllm.adapter_files import AdapterFiles
from loragen_vllm.backends import Generated
from loragen_vllm.errors import GeneratorUnavailable, InvalidDescription, Overloaded
from loragen_vllm.ray_actor import ACTOR_NAME, NAMESPACE, GeneratedAdapterMeta, connect, decode_meta

logger = logging.getLogger(__name__)

HEAD_LOSS_TOLERANCE_S = 10**9  # RAY_gcs_rpc_server_reconnect_timeout_s of a server process


class RayBackend:
    """Adapters from the named generator actor on the Ray cluster at `address`."""

    name = "ray"

    def __init__(
        self,
        address: str,
        *,
        actor_name: str = ACTOR_NAME,
        namespace: str = NAMESPACE,
        timeout_s: float | None = None,
        expected_fingerprint: str | None = None,
        fingerprint_ttl_s: float | None = None,
    ) -> None:
        if timeout_s is None:
            timeout_s = envs.LORAGEN_RAY_TIMEOUT_S
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.address = address
        self.actor_name = actor_name
        self.namespace = namespace
        self.timeout_s = timeout_s
        self._fingerprint = expected_fingerprint
        self._fingerprint_at = time.monotonic() if expected_fingerprint else 0.0  # when learnt
        self.fingerprint_ttl_s = envs.LORAGEN_RAY_FINGERPRINT_TTL_S if fingerprint_ttl_s is None else fingerprint_ttl_s
        self._refreshing: asyncio.Future[Any] | None = None
        self._kind: str | None = None
        self._handle: Any = None
        # ray.init and get_actor block on the GCS: they run on this thread, one at a time.
        self._lookup_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loragen-ray")
        self._lookup_future: Future[Any] | None = None
        self.last_meta: GeneratedAdapterMeta | None = None

    # ------------------------------------------------------------------------------------------
    # What the resolver needs besides adapters

    @property
    def fingerprint(self) -> str | None:
        """The actor's generator fingerprint, once known (None before first contact)."""
        return self._fingerprint

    @property
    def kind(self) -> str | None:
        return self._kind

    @property
    def where(self) -> str:
        return f"generator actor {self.namespace}/{self.actor_name} on the Ray cluster at {self.address}"

    async def get_fingerprint(self) -> str:
        """The fingerprint, asking the actor if it is not known yet (bounded wait). A known one
        older than ``fingerprint_ttl_s`` is returned at once and re-asked in the background."""
        if self._fingerprint is None:
            await self.refresh()
        elif time.monotonic() - self._fingerprint_at > self.fingerprint_ttl_s and (
            self._refreshing is None or self._refreshing.done()
        ):
            self._refreshing = asyncio.ensure_future(self._refresh_quietly())
        assert self._fingerprint is not None
        return self._fingerprint

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except GeneratorUnavailable as e:  # unreachable: keep serving by the known fingerprint
            logger.debug("fingerprint refresh failed: %s", e)

    async def refresh(self) -> dict[str, Any]:
        """Ask the actor for its health (fingerprint, kind, statistics); bounded wait."""
        deadline = time.monotonic() + self.timeout_s
        health = await self._call("health", (), deadline, "health check")
        self._learn(health["fingerprint"], health["kind"])
        return health

    def _learn(self, fingerprint: str, kind: str) -> None:
        if self._fingerprint not in (None, fingerprint):
            logger.warning(
                "%s now runs generator %s (was %s): adapters are keyed by the new fingerprint",
                self.where, fingerprint[:12], self._fingerprint[:12],
            )
        self._fingerprint, self._kind, self._fingerprint_at = fingerprint, kind, time.monotonic()

    # ------------------------------------------------------------------------------------------
    # Generation

    async def generate(self, description: str, seed: int = 0) -> AdapterFiles:
        """The adapter's PEFT files for a normalised description; `fingerprint`/`kind` updated."""
        files, _ = await self.generate_with_meta(description, seed)
        return files

    async def generate_adapter(self, description: str, seed: int = 0, *, deadline: float | None = None) -> Generated:
        """The adapter with the fingerprint and kind the actor returned with it. ``deadline``
        (``time.monotonic()``): the actor drops the call if it has not reached a pass by then."""
        files, meta = await self.generate_with_meta(description, seed, deadline=deadline)
        return Generated(files, meta.fingerprint, meta.kind)

    async def generate_with_meta(
        self, description: str, seed: int = 0, *, deadline: float | None = None
    ) -> tuple[AdapterFiles, GeneratedAdapterMeta]:
        call_deadline = time.monotonic() + self.timeout_s
        if deadline is not None:
            call_deadline = min(call_deadline, deadline)
        wall_deadline = time.time() + (call_deadline - time.monotonic())  # the actor's clock
        files, meta_bytes = await self._call(
            "generate", (description, seed, wall_deadline), call_deadline, "generation"
        )
        meta = decode_meta(meta_bytes)
        self._learn(meta.fingerprint, meta.kind)
        self.last_meta = meta
        return files, meta

    def close(self) -> None:
        """Forget the handle (the Ray connection stays: it belongs to the process)."""
        self._handle = None
        self._lookup_thread.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------
    # Connection and error mapping

    async def _call(self, method: str, args: tuple, deadline: float, what: str) -> Any:
        """Call an actor method; if the cached handle's actor died for good, look it up by
        name once more (it may have been stopped and started again) before giving up; while
        Ray is restarting the actor, call again until the deadline."""
        looked_up = False
        while True:
            handle = await self._get_handle(deadline)
            try:
                return await self._await(getattr(handle, method).remote(*args), deadline, what)
            except GeneratorUnavailable as e:
                died, restarting = _actor_died_types(), _actor_restarting_types()
                if isinstance(e.__cause__, died) and not looked_up:
                    looked_up = True
                    continue
                if isinstance(e.__cause__, restarting) and deadline - time.monotonic() > 0.5:
                    await asyncio.sleep(0.25)
                    continue
                raise

    async def _get_handle(self, deadline: float) -> Any:
        handle = self._handle
        if handle is not None:
            return handle
        # One lookup at a time, shared by every caller: a lookup that hangs (the GCS is gone)
        # holds one thread of our own, never the loop's default executor.
        lookup = self._lookup_future
        if lookup is None or lookup.done():
            lookup = self._lookup_future = self._lookup_thread.submit(self._lookup)
        try:
            handle = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(lookup)), self._left(deadline))
        except asyncio.TimeoutError:
            raise GeneratorUnavailable(
                f"{self.where} could not be reached within {self.timeout_s:g} s; "
                "stored adapters still work; retry later"
            ) from None
        self._handle = handle
        return handle

    def _lookup(self) -> Any:
        """Connect to Ray (once per process) and find the actor by name. Runs in our thread."""
        import ray

        if not ray.is_initialized():
            # Ray ends a driver process that has lost the GCS (head node) for 60 s; this process
            # is a vLLM server, which must outlive the head and keep serving stored adapters.
            os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(HEAD_LOSS_TOLERANCE_S))
            try:
                connect(self.address, self.namespace)
            except Exception as e:
                raise GeneratorUnavailable(
                    f"cannot connect to the Ray cluster at {self.address} ({_first_line(e)}): "
                    "new descriptions cannot be generated; retry later"
                ) from e
        try:
            return ray.get_actor(self.actor_name, namespace=self.namespace)
        except ValueError:
            raise GeneratorUnavailable(
                f"no {self.where} (start it with `loragen-vllm generator start "
                f"--ray-address {self.address}`); new descriptions cannot be generated"
            ) from None
        except Exception as e:  # the cluster failing under the lookup (GCS errors): as unreachable
            raise GeneratorUnavailable(
                f"{self.where} could not be looked up ({_first_line(e)}); stored adapters still work; retry later"
            ) from e

    async def _await(self, ref: Any, deadline: float, what: str) -> Any:
        """Await an ObjectRef on the running loop, mapping every failure to our errors."""
        import ray

        try:
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), self._left(deadline))
        except asyncio.TimeoutError:
            # Not cancelled on purpose: the actor caches the result for the retry.
            raise GeneratorUnavailable(
                f"{what} by the {self.where} did not finish within {self.timeout_s:g} s "
                "(the actor is busy or restarting); retry later"
            ) from None
        except ray.exceptions.ActorUnavailableError as e:  # restarting: keep the handle
            raise GeneratorUnavailable(f"the {self.where} is restarting ({what} failed): retry later") from e
        except ray.exceptions.RayActorError as e:  # died for good: look it up again next time
            self._handle = None
            raise GeneratorUnavailable(
                f"the {self.where} is gone ({what} failed: {_first_line(e)}); retry later"
            ) from e
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(e.cause, BaseException) else None
            if isinstance(cause, InvalidDescription):
                raise InvalidDescription(cause.message) from e
            if isinstance(cause, Overloaded):
                raise Overloaded(
                    f"the {self.where} dropped the call: {cause.reason} before its generator pass",
                    reason=cause.reason,
                ) from e
            raise GeneratorUnavailable(
                f"the {self.where} failed ({what}): {_first_line(cause or e)}"
            ) from e
        except ray.exceptions.RayError as e:  # object lost, node died, ...
            raise GeneratorUnavailable(f"{what} by the {self.where} failed: {_first_line(e)}") from e

    def _left(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise GeneratorUnavailable(f"{self.where} did not answer within {self.timeout_s:g} s; retry later")
        return left


def checkpoint_fingerprint(ckpt_dir: str) -> str | None:
    """The fingerprint in a checkpoint's ``config.json``, or None if it cannot be read."""
    from loragen_vllm.backends import CheckpointInfo

    try:
        return CheckpointInfo.read(ckpt_dir).fingerprint
    except (OSError, ValueError) as e:
        logger.warning("cannot read the generator fingerprint from %s: %s", ckpt_dir, e)
        return None


def _actor_died_types() -> tuple[type[BaseException], ...]:
    import ray

    return (ray.exceptions.ActorDiedError,)


def _actor_restarting_types() -> tuple[type[BaseException], ...]:
    import ray

    return (ray.exceptions.ActorUnavailableError,)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
