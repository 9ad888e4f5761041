"""The bounded stand-ins for vLLM's per-name tables (``loragen-vllm serve`` installs them)."""

from __future__ import annotations

import asyncio

from loragen_vllm.vllm_patches import BoundedLoRARequests, LockTable



def test_bounded_lora_requests_is_an_lru_that_reports_what_it_drops() -> None:
    dropped: list[str] = []
    table: BoundedLoRARequests[int] = BoundedLoRARequests(3, on_evict=dropped.append)
    for i, name in enumerate("abc"):
        table[name] = i
    assert table["a"] == 0  # a read makes "a" the most recent
    table["d"] = 3
    assert dropped == ["b"] and list(table) == ["c", "a", "d"]
    for _ in table.values():  # reading while iterating is fine (snapshot)
        table.get("c")
    del table["a"]
    assert dropped == ["b", "a"] and len(table) == 2 and "a" not in table
    # names it may not evict (adapters loaded with --lora-modules) stay and do not count
    many: BoundedLoRARequests[int] = BoundedLoRARequests(10, evictable=lambda n: n != "static")
    many["static"] = -1
    for i in range(10_000):
        many[f"description {i}"] = i
    assert len(many) == 11 and many.evicted == 9_990 and "static" in many


def test_lock_table_drops_only_idle_locks() -> None:
    async def main() -> None:
        locks = LockTable(max_entries=4)
        held = locks["held"]
        await held.acquire()
        for i in range(10):
            locks[f"n{i}"]
        assert len(locks) <= 5 and locks["held"] is held
        waiter = asyncio.ensure_future(held.acquire())  # a second request for the name waits
        await asyncio.sleep(0)
        held.release()  # unlocked now, and the waiter not yet woken: the lock is still in use
        for i in range(10, 20):
            locks[f"n{i}"]
        assert locks["held"] is held
        await waiter
        assert held.locked()
        held.release()

    asyncio.run(main())
