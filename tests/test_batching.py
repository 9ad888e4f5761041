"""MicroBatcher with real threads and a real event loop: which requests share a pass, in which
order, what a failed pass does to its callers, and that passes run off the loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from loragen_vllm.batching import MicroBatcher
from loragen_vllm.errors import GeneratorUnavailable, Overloaded


class Recorder:
    """A ``run_pass`` that records each pass (items, seed, thread) and answers item -> (item, seed)."""

    def __init__(self, seconds: float = 0.0, fail_first: int = 0) -> None:
        self.seconds = seconds  # how long each pass takes
        self.fail_first = fail_first  # this many first passes raise
        self.passes: list[tuple[list[str], int]] = []
        self.threads: set[int] = set()
        self.started = threading.Event()

    def __call__(self, items: list[str], seed: int) -> list[tuple[str, int]]:
        self.passes.append((list(items), seed))
        self.threads.add(threading.get_ident())
        self.started.set()
        time.sleep(self.seconds)
        if len(self.passes) <= self.fail_first:
            raise ValueError(f"pass {len(self.passes)} broke")
        return [(item, seed) for item in items]


def test_concurrent_submissions_within_the_window_share_one_pass() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, window_s=0.2, max_batch=32)
    items = [f"d{i}" for i in range(10)]

    async def main() -> list[tuple[str, int]]:
        return list(await asyncio.gather(*(batcher.submit(d, 3) for d in items)))

    results = asyncio.run(main())
    assert results == [(d, 3) for d in items]  # each caller gets its own item's result
    assert run.passes == [(items, 3)]  # exactly one pass, all ten, in arrival order
    assert batcher.stats.passes == 1 and batcher.stats.batch_sizes == {10: 1} and batcher.stats.done == 10
    batcher.close()


def test_different_seeds_go_to_different_passes() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, window_s=0.2)

    async def main() -> list[tuple[str, int]]:
        jobs = [("a", 0), ("b", 1), ("c", 0), ("d", 1), ("e", 2)]
        return list(await asyncio.gather(*(batcher.submit(d, s) for d, s in jobs)))

    results = asyncio.run(main())
    assert results == [("a", 0), ("b", 1), ("c", 0), ("d", 1), ("e", 2)]
    assert run.passes == [(["a", "c"], 0), (["b", "d"], 1), (["e"], 2)]  # oldest seed first
    batcher.close()


def test_a_pass_holds_at_most_max_batch_and_a_full_batch_does_not_wait() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, window_s=30.0, max_batch=4)  # a window nobody should wait out
    items = [f"d{i}" for i in range(8)]

    async def main() -> float:
        t0 = time.monotonic()
        await asyncio.gather(*(batcher.submit(d) for d in items))
        return time.monotonic() - t0

    seconds = asyncio.run(main())
    assert run.passes == [(items[:4], 0), (items[4:], 0)]
    assert seconds < 5, seconds
    batcher.close()


def test_a_lone_request_waits_out_the_window_then_runs() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, window_s=0.3)

    async def main() -> float:
        t0 = time.monotonic()
        assert await batcher.submit("alone") == ("alone", 0)
        return time.monotonic() - t0

    seconds = asyncio.run(main())
    assert 0.25 <= seconds < 5, seconds
    assert run.passes == [(["alone"], 0)]
    batcher.close()


def test_a_window_prepares_its_first_request_on_the_pass_thread_before_its_pass() -> None:
    run = Recorder()
    events: list[tuple[str, str, int]] = []  # (what, item, thread)
    original = run.__call__

    def recording_pass(items: list[str], seed: int) -> list[tuple[str, int]]:
        events.append(("pass", ",".join(items), threading.get_ident()))
        return original(items, seed)

    def prepare(item: str) -> None:
        events.append(("prepare", item, threading.get_ident()))

    batcher = MicroBatcher(recording_pass, window_s=0.2, prepare=prepare)

    async def main() -> None:
        assert await batcher.submit("alone") == ("alone", 0)
        burst = [batcher.submit(f"b{i}") for i in range(4)]  # a burst: only its first is prepared
        assert await asyncio.gather(*burst) == [(f"b{i}", 0) for i in range(4)]

    asyncio.run(main())
    assert [e[:2] for e in events] == [("prepare", "alone"), ("pass", "alone"), ("prepare", "b0"),
                                       ("pass", "b0,b1,b2,b3")]
    assert len({e[2] for e in events}) == 1 and events[0][2] != threading.get_ident()  # the pass thread
    assert batcher.stats.prepared == 2 and batcher.stats.prepare_s > 0  # timed, for health reports
    batcher.close()


def test_a_failing_prepare_costs_nothing_and_no_window_prepares_nothing(caplog: pytest.LogCaptureFixture) -> None:
    def prepare(item: str) -> None:
        raise RuntimeError(f"cannot prepare {item}")

    run = Recorder()
    batcher = MicroBatcher(run, window_s=0.05, prepare=prepare)
    assert asyncio.run(batcher.submit("x")) == ("x", 0)  # the pass did the work
    ours = [r for r in caplog.records if r.name == "loragen_vllm.batching"]
    assert [(r.levelname, "cannot prepare x" in r.getMessage()) for r in ours] == [("WARNING", True)]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert batcher.stats.prepared == 0 and batcher.stats.prepare_s == 0  # a failed one is not counted
    batcher.close()
    prepared: list[str] = []
    batcher = MicroBatcher(Recorder(), window_s=0.0, prepare=prepared.append)
    assert asyncio.run(batcher.submit("y")) == ("y", 0)
    assert prepared == []  # no window to use
    batcher.close()


def test_a_pass_waits_for_a_long_prepare_and_takes_what_arrived_meanwhile() -> None:
    """Preparing outlasts the window (encoding on a CPU): the pass starts after it, with the
    requests that arrived meanwhile, and deadlines are checked then."""
    run = Recorder()
    batcher = MicroBatcher(run, window_s=0.05, prepare=lambda item: time.sleep(0.4))

    async def main() -> list[object]:
        first = asyncio.ensure_future(batcher.submit("first"))
        await asyncio.sleep(0.15)  # the window is over; the preparation still runs
        soon = time.monotonic() + 0.1
        later = [asyncio.ensure_future(batcher.submit("later")),
                 asyncio.ensure_future(batcher.submit("expires", deadline=soon))]
        return list(await asyncio.gather(first, *later, return_exceptions=True))

    first, later, expired = asyncio.run(main())
    assert (first, later) == (("first", 0), ("later", 0)) and run.passes == [(["first", "later"], 0)]
    assert isinstance(expired, Overloaded) and expired.reason == "deadline"  # not generated
    batcher.close()


def test_a_dropped_request_does_not_keep_its_preparation() -> None:
    """A request dropped before its preparation started (queued behind another one): that
    preparation is cancelled, never run, so the next request's does not wait behind it."""
    prepared: list[str] = []

    def prepare(item: str) -> None:
        prepared.append(item)
        time.sleep(0.3)

    run = Recorder()
    batcher = MicroBatcher(run, window_s=0.2, prepare=prepare)

    async def main() -> tuple[object, object]:
        a = asyncio.ensure_future(batcher.submit("a"))
        await asyncio.sleep(0.02)  # a's preparation runs until ~0.3 s
        b = asyncio.ensure_future(batcher.submit("b"))
        a.cancel()
        await asyncio.sleep(0.2)  # at a's window end (0.2 s) a was dropped; b's preparation queued
        b_preparation = batcher._waiting[0].preparation
        b.cancel()
        c = await batcher.submit("c")
        return b_preparation, c

    b_preparation, c = asyncio.run(main())
    assert c == ("c", 0) and run.passes == [(["c"], 0)]
    assert b_preparation is not None and b_preparation.cancelled() and prepared == ["a", "c"]
    batcher.close()


def test_requests_arriving_during_a_pass_join_the_next_one() -> None:
    run = Recorder(seconds=0.5)
    batcher = MicroBatcher(run, window_s=0.01)

    async def main() -> None:
        first = asyncio.ensure_future(batcher.submit("first"))
        while not run.started.is_set():  # the first pass is running (0.5 s)
            await asyncio.sleep(0.01)
        later = [batcher.submit(f"later{i}") for i in range(5)]
        await asyncio.gather(first, *later)

    asyncio.run(main())
    assert run.passes == [(["first"], 0), ([f"later{i}" for i in range(5)], 0)]
    batcher.close()


def test_passes_run_off_the_event_loop() -> None:
    run = Recorder(seconds=0.5)
    batcher = MicroBatcher(run, window_s=0.0)

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        await batcher.submit("slow")
        task.cancel()
        return ticks

    ticks = asyncio.run(main())
    assert threading.get_ident() not in run.threads and len(run.threads) == 1
    assert ticks >= 10, ticks  # the loop kept running during the 0.5 s pass
    batcher.close()


def test_a_failed_pass_fails_each_of_its_callers_and_the_next_pass_works() -> None:
    run = Recorder(fail_first=1)
    batcher = MicroBatcher(run, window_s=0.1)

    async def main() -> tuple[list[BaseException | tuple[str, int]], tuple[str, int]]:
        failed = await asyncio.gather(*(batcher.submit(d) for d in "abc"), return_exceptions=True)
        return list(failed), await batcher.submit("d")

    failed, after = asyncio.run(main())
    assert len(run.passes) == 2
    for err in failed:
        assert isinstance(err, GeneratorUnavailable), err
        assert isinstance(err.__cause__, ValueError) and "pass 1 broke" in str(err)
    assert after == ("d", 0)
    assert batcher.stats.passes == 2 and batcher.stats.failed == 1 and batcher.stats.done == 1


def test_generator_unavailable_from_a_pass_is_passed_on_as_it_is() -> None:
    def run_pass(items: list[str], seed: int) -> list[str]:
        raise GeneratorUnavailable("the generator checkpoint could not be loaded")

    batcher = MicroBatcher(run_pass, window_s=0.0)
    with pytest.raises(GeneratorUnavailable, match="could not be loaded"):
        asyncio.run(batcher.submit("x"))
    batcher.close()


def test_a_cancelled_caller_is_left_out_of_its_pass() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, window_s=0.3)

    async def main() -> list[tuple[str, int]]:
        gone = asyncio.ensure_future(batcher.submit("gone"))
        kept = [asyncio.ensure_future(batcher.submit(d)) for d in ("x", "y")]
        await asyncio.sleep(0.05)
        gone.cancel()
        return list(await asyncio.gather(*kept))

    assert asyncio.run(main()) == [("x", 0), ("y", 0)]
    assert run.passes == [(["x", "y"], 0)]
    batcher.close()


def test_submit_many_keeps_order_and_shares_the_pass() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, window_s=0.05)
    assert asyncio.run(batcher.submit_many(["p", "q", "r"], 5)) == [("p", 5), ("q", 5), ("r", 5)]
    assert run.passes == [(["p", "q", "r"], 5)]
    # a later event loop (a new asyncio.run) works with the same batcher
    assert asyncio.run(batcher.submit("s", 5)) == ("s", 5)
    batcher.close()


def test_closed_batcher_fails_callers_instead_of_hanging() -> None:
    for window_s, prepare in ((0.0, None), (0.05, lambda item: None)):
        batcher = MicroBatcher(Recorder(), window_s=window_s, prepare=prepare)
        batcher.close()
        with pytest.raises(GeneratorUnavailable, match="adapter generation failed"):
            asyncio.run(asyncio.wait_for(batcher.submit("x"), 10))


def test_a_batcher_stopped_mid_pass_answers_that_pass_callers() -> None:
    """Cancelling the batcher's task while a pass runs (a shutdown) fails the pass's callers with
    GeneratorUnavailable instead of leaving them waiting for good."""
    async def main() -> None:
        recorder = Recorder(seconds=0.5)
        batcher = MicroBatcher(recorder, window_s=0.0)
        caller = asyncio.ensure_future(batcher.submit("a"))
        while not recorder.started.is_set():
            await asyncio.sleep(0.01)
        batcher._task.cancel()  # what a shutdown does to it
        with pytest.raises(GeneratorUnavailable, match="the generator stopped"):
            await asyncio.wait_for(caller, 5)

    asyncio.run(main())


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(Recorder(), window_s=-1.0)
    with pytest.raises(ValueError):
        MicroBatcher(Recorder(), window_s=0.0, max_batch=0)


def test_requests_past_their_deadline_are_not_generated() -> None:
    run = Recorder(seconds=0.3)
    batcher = MicroBatcher(run, window_s=0.0)

    async def main() -> tuple[object, list[object]]:
        first = asyncio.ensure_future(batcher.submit("first"))  # runs at once, for 0.3 s
        while not run.started.is_set():
            await asyncio.sleep(0.01)
        soon = time.monotonic() + 0.1  # passes while "first" runs
        late = [asyncio.ensure_future(batcher.submit(d, deadline=soon)) for d in ("late1", "late2")]
        kept = asyncio.ensure_future(batcher.submit("kept", deadline=time.monotonic() + 30))
        results = await asyncio.gather(*late, return_exceptions=True)
        return (await first, await kept), results

    (first, kept), late = asyncio.run(main())
    assert first == ("first", 0) and kept == ("kept", 0)
    assert all(isinstance(e, Overloaded) and e.reason == "deadline" for e in late)
    assert run.passes == [(["first"], 0), (["kept"], 0)]  # the expired two never reached a pass
    assert batcher.stats.expired == 2
    batcher.close()


def test_a_pass_whose_callers_all_gave_up_does_not_run() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, window_s=0.2)

    async def main() -> None:
        gone = [asyncio.ensure_future(batcher.submit(d)) for d in ("a", "b")]
        await asyncio.sleep(0.05)
        for g in gone:
            g.cancel()
        await asyncio.sleep(0.4)

    asyncio.run(main())
    assert run.passes == [] and batcher.stats.passes == 0 and batcher.stats.cancelled == 2
    batcher.close()
