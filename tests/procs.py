"""Real processes for the tests, and one that holds store keys' locks.

They fork from a clean single-threaded server (multiprocessing's forkserver) that has the store's
modules imported, so they start in milliseconds. Forking the pytest process itself is unsafe
once the vLLM, torch and Ray tests have run: it has threads then, and a child forked while one of
them held malloc's lock died in malloc (`unaligned fastbin chunk detected`, a clean-clone CI run,
2026-12-07). A worker is a module-level function (pickled by name); its module is imported in
the child, cheaply, since its imports are preloaded.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from loragen_vllm.store import AdapterStore

PROCS = mp.get_context("forkserver")
PROCS.set_forkserver_preload(["pytest", "msgspec", "loragen_vllm.store", "loragen_vllm.errors", __name__])


def hold_key_locks(root: str, keys: list[str], ready) -> None:
    """Hold the locks of ``keys`` in store ``root`` and wait (a test may SIGSTOP it: a hung server)."""
    store = AdapterStore(root, max_adapters=None, max_bytes=None)
    with contextlib.ExitStack() as held:
        for key in keys:
            held.enter_context(store.key_lock(key))
        ready.set()
        time.sleep(120)


@contextlib.contextmanager
def key_lock_held_elsewhere(root: Path, *keys: str) -> Iterator:
    """Another process holding the locks of ``keys`` in store ``root`` while the block runs (it
    yields that process); killed after, stopped or not."""
    ready = PROCS.Event()
    holder = PROCS.Process(target=hold_key_locks, args=(str(root), list(keys), ready), daemon=True)
    holder.start()
    try:
        assert ready.wait(30), "the lock holder did not start"
        yield holder
    finally:
        os.kill(holder.pid, signal.SIGCONT)  # if the block stopped it
        holder.kill()
        holder.join()
