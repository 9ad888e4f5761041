"""Pins: which server processes may still (re)load a stored adapter, so eviction must spare it.

vLLM keeps a resolved ``LoRARequest`` (a folder path) and may reload the folder from disk at any
time, so the resolver plugin pins every adapter it hands to vLLM and unpins it when vLLM forgets
the name. A pin is a file ``<store>/pins/<key>/<pid>@<host>`` naming the process (pid, its start
time, host). Pins of processes of this host that ended (or whose pid now belongs to another
process) are ignored and cleaned up; pins from other hosts (a store on a shared file system)
are always taken as live.

Pins of one key are written and removed under the store's lock of that key, so that a pin and
an eviction of the same adapter never interleave.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from loragen_vllm.processes import HOST, pid_alive, start_ticks

KeyLock = Callable[..., AbstractContextManager[None]]  # store.key_lock(key, timeout=None)


class Pin(msgspec.Struct, frozen=True):
    """A server process that may (re)load an adapter from disk."""

    pid: int
    host: str
    start: int  # process start time in clock ticks since boot (/proc/<pid>/stat); 0 = unknown
    created: datetime

    @property
    def alive(self) -> bool:
        """Whether the process still runs (always True for a process of another host)."""
        return self.host != HOST or pid_alive(self.pid, self.start)


class PinBoard:
    """The pins of one store: ``<folder>/<key>/<pid>@<host>``; keys are checked by the store."""

    def __init__(self, folder: Path, key_lock: KeyLock) -> None:
        self.folder = folder
        self._key_lock = key_lock
        folder.mkdir(parents=True, exist_ok=True)

    def pin(self, key: str, holder: int | None = None) -> None:
        """Mark ``key`` as possibly (re)loaded by process ``holder`` (default: this process)."""
        pid = os.getpid() if holder is None else int(holder)
        pin = Pin(pid=pid, host=HOST, start=start_ticks(pid), created=datetime.now(timezone.utc))
        with self._key_lock(key):
            d = self.folder / key
            d.mkdir(exist_ok=True)
            tmp = d / f".{pid}@{HOST}.{secrets.token_hex(4)}"
            tmp.write_bytes(msgspec.json.encode(pin))
            os.replace(tmp, d / f"{pid}@{HOST}")

    def unpin(self, key: str, holder: int | None = None) -> None:
        """Drop the pin of process ``holder`` (default: this process) on ``key``, if any."""
        pid = os.getpid() if holder is None else int(holder)
        with self._key_lock(key):
            d = self.folder / key
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d / f"{pid}@{HOST}")
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty

    def live(self, key: str) -> list[Pin]:
        """Pins of ``key`` whose processes run."""
        return [p for p in self._all(key) if p.alive]

    def drop_all(self, key: str) -> None:
        """Remove every pin of ``key`` (the caller holds its key lock)."""
        shutil.rmtree(self.folder / key, ignore_errors=True)

    def clean(self, is_key: Callable[[str], bool]) -> None:
        """Remove pins of ended processes, then the folders of keys nobody pins any more."""
        for name in os.listdir(self.folder):
            if not is_key(name):
                continue
            for pin in self._all(name):
                if not pin.alive:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.folder / name / f"{pin.pid}@{pin.host}")
            try:  # under the key lock: pin() may be about to write into the folder
                with self._key_lock(name, timeout=0), contextlib.suppress(OSError):
                    (self.folder / name).rmdir()  # only if empty
            except TimeoutError:
                pass

    def _all(self, key: str) -> list[Pin]:
        d = self.folder / key
        out = []
        try:
            names = [n for n in os.listdir(d) if not n.startswith(".")]
        except FileNotFoundError:
            return out
        for name in names:
            try:
                out.append(msgspec.json.decode((d / name).read_bytes(), type=Pin))
            except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                continue  # being replaced or removed
        return out
