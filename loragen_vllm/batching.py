"""`MicroBatcher`: concurrent requests for generation share one generator pass.

A generator pass over a batch of descriptions costs about as much as a pass over one (the text
encoder and the denoiser are batched), so both generator backends -- in the API server
(`InProcessBackend`) and in the Ray actor (`GeneratorActor`) -- collect what arrives close
together and run it as one pass. They differ only in what a pass runs (``run_pass``).

How a batch forms. A request waits at most ``window_s`` from its arrival for others to join it,
less if ``max_batch`` requests of its seed are waiting. The oldest waiting request's seed is
served first; its pass takes the requests of that seed in arrival order, at most ``max_batch``
of them (one pass generates with one seed). Passes run one at a time in a worker thread of the
batcher's own, so the event loop keeps serving while the generator works; requests arriving
during a pass wait for the next one (and have usually waited out their window by then).

Work during the window. While the oldest waiting request waits out its window and no pass runs,
the pass thread would idle: ``prepare(item)``, if given, runs for that request then (once), so
that its pass finds that work done (the in-process backend encodes its description: the
encoder caches embeddings, and the pass's encode is then a cache hit). Only the window's first
request is prepared, so a burst is still encoded in one batch with its pass. A pass starts once
its window has ended *and* that preparation has finished (where it outlasts the window, as
encoding does on a CPU, requests arriving meanwhile still join the pass, and deadlines are
checked after it); a preparation not yet started when its request is dropped is cancelled.
``prepare`` is best effort: what it raises is logged, and the pass does the work.

Failure. If ``run_pass`` raises, each request of that pass fails with `GeneratorUnavailable`
(HTTP 503) whose ``__cause__`` is what ``run_pass`` raised (a `GeneratorUnavailable` is passed
on as it is); later passes run as usual.

Abandoned requests are not generated. A request whose caller is cancelled before its pass (a
client gone, a deadline that passed upstream) is left out of it, and so is one whose own
``deadline`` (``time.monotonic()`` seconds) passed while it waited: it fails with `Overloaded`
(reason ``deadline``, HTTP 503). A pass of only such requests does not run.

``submit`` must be awaited on one event loop at a time (the one the batcher's task runs on).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from loragen_vllm import metrics
from loragen_vllm.errors import GeneratorUnavailable, Overloaded

logger = logging.getLogger(__name__)

T = TypeVar("T")  # what a request asks for (a description)
R = TypeVar("R")  # what a pass returns for each (an adapter's files)

MAX_BATCH = 32  # requests per generator pass at most (both backends)


@dataclass
class BatchStats:
    """What a batcher has done, for health reports and tests."""

    passes: int = 0  # passes run (failed ones included); while a pass runs, its number
    failed: int = 0  # passes whose run_pass raised
    done: int = 0  # requests answered by passes that succeeded
    cancelled: int = 0  # requests left out because their caller gave up
    expired: int = 0  # requests left out because their deadline passed while they waited
    batch_sizes: dict[int, int] = field(default_factory=dict)  # requests in a pass -> passes of that size
    prepared: int = 0  # `prepare` calls that finished (during windows; failed ones not counted)
    prepare_s: float = 0.0  # their seconds on the pass thread, in all


@dataclass
class _Request(Generic[T, R]):
    item: T
    seed: int
    arrived: float  # loop time
    future: asyncio.Future[R]
    deadline: float | None = None  # time.monotonic() seconds
    prepared: bool = False  # `prepare` was tried for it (once)
    preparation: concurrent.futures.Future[None] | None = None  # its `prepare` on the pass thread


class MicroBatcher(Generic[T, R]):
    """Runs ``run_pass(items, seed) -> results`` (one result per item, in order) over batches of
    concurrent `submit` calls; see the module docstring for how batches form and fail."""

    def __init__(
        self,
        run_pass: Callable[[list[T], int], Sequence[R]],
        window_s: float,
        max_batch: int = MAX_BATCH,
        *,
        prepare: Callable[[T], object] | None = None,
        thread_name: str = "loragen-pass",
    ) -> None:
        if window_s < 0 or max_batch < 1:
            raise ValueError(f"window_s must be >= 0 and max_batch >= 1, got {window_s}, {max_batch}")
        self.run_pass = run_pass
        self.prepare = prepare
        self.window_s = window_s
        self.max_batch = max_batch
        self.stats = BatchStats()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._waiting: list[_Request[T, R]] = []
        self._wakeup: asyncio.Future[None] | None = None  # set when a batch fills up
        self._task: asyncio.Task[None] | None = None
        self._preparing: concurrent.futures.Future[None] | None = None  # the latest `prepare` queued

    @property
    def waiting(self) -> int:
        """Requests waiting for a pass (not counting the one running)."""
        return len(self._waiting)

    async def submit(self, item: T, seed: int = 0, *, deadline: float | None = None) -> R:
        """The result for ``item``, from the pass it joins; raises `GeneratorUnavailable`
        (`Overloaded` if ``deadline`` passes before its pass starts)."""
        return (await self.submit_many([item], seed, deadline=deadline))[0]

    async def submit_many(self, items: Sequence[T], seed: int = 0, *, deadline: float | None = None) -> list[R]:
        """Results for each of ``items`` (in order), all joining the same pass where they fit."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        requests = [_Request(item, seed, now, loop.create_future(), deadline) for item in items]
        self._waiting.extend(requests)
        metrics.QUEUED.inc(len(requests))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="loragen-microbatch")
        elif self._wakeup is not None and not self._wakeup.done() and self._full(self._waiting[0].seed):
            self._wakeup.set_result(None)
        return list(await asyncio.gather(*(r.future for r in requests)))

    def close(self) -> None:
        """Stop the worker thread (a pass in progress finishes; nothing new starts)."""
        self._thread.shutdown(wait=False, cancel_futures=True)

    # -- the batching loop (one task while anything waits) -----------------------------------

    def _full(self, seed: int) -> bool:
        return sum(1 for r in self._waiting if r.seed == seed) >= self.max_batch

    def _drop_abandoned(self) -> None:
        """Leave out requests whose callers gave up or whose deadline passed."""
        now = time.monotonic()
        keep = []
        for r in self._waiting:
            if not r.future.done() and (r.deadline is None or now < r.deadline):
                keep.append(r)
                continue
            if r.preparation is not None:
                r.preparation.cancel()  # not run if it has not started
            if r.future.done():  # cancelled by its caller
                self.stats.cancelled += 1
            else:  # its deadline passed
                self.stats.expired += 1
                r.future.set_exception(
                    Overloaded("the request's deadline passed while it waited for a generator pass",
                               reason="deadline")
                )
            metrics.QUEUED.dec()
        self._waiting = keep

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._drop_abandoned()
                if not self._waiting:
                    return
                oldest = self._waiting[0]
                wait = oldest.arrived + self.window_s - loop.time()
                if wait > 0 and not self._full(oldest.seed):
                    if self.prepare is not None and not oldest.prepared:
                        oldest.prepared = True
                        self._submit_prepare(oldest)
                    self._wakeup = loop.create_future()
                    try:
                        await asyncio.wait_for(self._wakeup, wait)
                    except asyncio.TimeoutError:
                        pass
                    finally:
                        self._wakeup = None
                    continue
                await self._run_one_pass(oldest.seed)
        except BaseException as e:  # cancelled (shutdown) or a bug: nobody may wait forever
            for r in self._waiting:
                if not r.future.done():
                    r.future.set_exception(GeneratorUnavailable(f"the generator stopped ({type(e).__name__})"))
            metrics.QUEUED.dec(len(self._waiting))
            self._waiting.clear()
            raise

    def _submit_prepare(self, r: _Request[T, R]) -> None:
        """Queue ``prepare`` for `r` on the pass thread (straight to the thread: an asyncio
        wrapper would wake the event loop when it ends, and the loop would then overshoot the
        window's timer); nothing after `close`."""
        try:
            r.preparation = self._preparing = self._thread.submit(self._prepare, r.item)
        except RuntimeError:  # closed: the pass reports it
            pass

    def _prepare(self, item: T) -> None:
        """Pass thread: ``prepare(item)``, best effort; timed into `stats`."""
        t0 = time.perf_counter()
        try:
            assert self.prepare is not None
            self.prepare(item)
        except Exception as e:  # the pass does the work (and reports what fails there)
            logger.warning("preparing a request during its batching window failed: %r", e)
            return
        seconds = time.perf_counter() - t0
        self.stats.prepared += 1
        self.stats.prepare_s += seconds
        logger.debug("prepared a request during its batching window in %.1f ms", seconds * 1e3)

    async def _run_one_pass(self, seed: int) -> None:
        if self._preparing is not None and not self._preparing.done():
            await asyncio.wait({asyncio.wrap_future(self._preparing)})  # never raises
        self._preparing = None
        self._drop_abandoned()
        batch = [r for r in self._waiting if r.seed == seed][: self.max_batch]
        if not batch:
            return
        taken = {id(r) for r in batch}
        self._waiting = [r for r in self._waiting if id(r) not in taken]
        metrics.QUEUED.dec(len(batch))
        self.stats.passes += 1
        n = len(batch)
        self.stats.batch_sizes[n] = self.stats.batch_sizes.get(n, 0) + 1
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._thread, self.run_pass, [r.item for r in batch], seed)
            if len(results) != n:
                raise RuntimeError(f"run_pass returned {len(results)} results for {n} requests")
        except BaseException as e:
            if not isinstance(e, Exception):  # cancelled (shutdown) mid-pass: its requests are no longer waiting
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(GeneratorUnavailable(f"the generator stopped ({type(e).__name__})"))
                raise
            # the pass failed: fail its requests, keep serving
            self.stats.failed += 1
            err = e if isinstance(e, GeneratorUnavailable) else GeneratorUnavailable(
                f"adapter generation failed ({type(e).__name__}: {e})"
            )
            if err is not e:
                err.__cause__ = e
            logger.error("generator pass %d of %d request(s) failed: %s", self.stats.passes, n, err)
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(err)
            return
        self.stats.done += n
        for r, result in zip(batch, results):
            if not r.future.done():
                r.future.set_result(result)
