"""Pins: which server processes may still (re)load a stored adapter, so eviction must spare it.

vLLM keeps a resolved ``LoRARequest`` (a folder path) and may reload the folder from disk at any
time, so the resolver plugin pins every adapter it hands to vLLM and unpins it when vLLM forgets
the name. A pin is a *lease*: a file ``<store>/pins/<key>/<holder>`` (holder: ``<pid>@<host>``,
plus a random token per process for this process's own pins) whose modification time is when it
was last renewed. A pin counts while it is younger than the lease (``lease_s``); the process
that holds pins renews all of them every third of the lease (a daemon thread touching the files:
``os.utime``, which needs no free disk space). So:

* a live holder -- on any host, in any container -- keeps its pins, and its adapters are never
  evicted;
* a dead or stopped holder's pins expire after at most ``lease_s``, wherever it ran; nothing
  depends on process ids or host names being unique or visible (containers that share a
  hostname, stores on shared file systems);
* a holder that exits normally (a server stopped with SIGTERM) removes its pins at exit
  (`PinBoard.release`), so its adapters may be evicted at once rather than one lease later.

A pin written for another process (``holder=<pid>``, e.g. by a test or a tool) is not renewed
by anyone and lasts one lease.

Pins of one key are written and removed under the store's lock of that key, so that a pin and
an eviction of the same adapter never interleave.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from loragen_vllm.errors import StoreFull
from loragen_vllm.processes import HOST

KeyLock = Callable[..., AbstractContextManager[None]]  # store.key_lock(key, timeout=...)


class Pin(msgspec.Struct, frozen=True):
    """A server process that may (re)load an adapter from disk, and until when that holds."""

    pid: int
    host: str
    created: datetime
    renewed: datetime  # the pin file's modification time (filled in when read)
    expires: datetime  # renewed + the lease; the pin no longer counts after it

    @property
    def alive(self) -> bool:
        """Whether the lease still holds (its holder renewed it within the lease)."""
        return self.expires > datetime.now(timezone.utc)


class _PinRecord(msgspec.Struct, frozen=True):
    """What a pin file holds."""

    pid: int
    host: str
    created: datetime


_TOKEN = secrets.token_hex(4)  # tells this process's pins apart from a pid reused elsewhere
_TOKEN_PID = os.getpid()


def _own_token() -> str:
    global _TOKEN, _TOKEN_PID
    if os.getpid() != _TOKEN_PID:  # forked child: a token of its own
        _TOKEN, _TOKEN_PID = secrets.token_hex(4), os.getpid()
    return _TOKEN


class PinBoard:
    """The pins of one store: ``<folder>/<key>/<holder>``; keys are checked by the store."""

    def __init__(self, folder: Path, key_lock: KeyLock, lease_s: float = 120.0) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.folder = folder
        self.lease_s = lease_s
        self._key_lock = key_lock
        self._mine: set[str] = set()  # keys this process pinned (renewed by the renewer)
        self._mine_lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def _holder_name(self, holder: int | None) -> tuple[int, str]:
        if holder is None:
            return os.getpid(), f"{os.getpid()}@{HOST}.{_own_token()}"
        return int(holder), f"{int(holder)}@{HOST}"

    def pin(self, key: str, holder: int | None = None, timeout: float | None = None) -> None:
        """Pin ``key`` for process ``holder`` (default: this process, renewed while it runs).

        Raises OSError (ENOSPC ...) if the pin cannot be written, TimeoutError if the key's
        lock stays held past ``timeout`` seconds (None: the store's lock deadline).
        """
        pid, name = self._holder_name(holder)
        record = _PinRecord(pid=pid, host=HOST, created=datetime.now(timezone.utc))
        with self._key_lock(key, timeout=timeout):
            d = self.folder / key
            d.mkdir(exist_ok=True)
            tmp = d / f".{name}.{secrets.token_hex(4)}"
            try:
                tmp.write_bytes(msgspec.json.encode(record))
                os.replace(tmp, d / name)
            except OSError:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
        if holder is None:
            with self._mine_lock:
                self._mine.add(key)
            self._start_renewer()

    def release(self) -> int:
        """Remove every pin this process holds (it will load nothing more: it is exiting);
        returns how many. Run at exit once the process pinned something. Removing a pin takes no
        key lock (it only allows an eviction, which checks the pins under the key's lock itself);
        removing the key's folder does (`_remove_if_empty`)."""
        with self._mine_lock:
            keys, self._mine = list(self._mine), set()
        _, name = self._holder_name(None)
        n = 0
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.folder / key / name)
                n += 1
            self._remove_if_empty(key)
        return n

    def unpin(self, key: str, holder: int | None = None) -> None:
        """Drop the pin of process ``holder`` (default: this process) on ``key``, if any."""
        _, name = self._holder_name(holder)
        if holder is None:
            self.stop_renewing(key)
        with self._key_lock(key):
            d = self.folder / key
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d / name)
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty

    def stop_renewing(self, key: str) -> None:
        """This process stops renewing its pin on ``key``: the pin lasts until its lease ends."""
        with self._mine_lock:
            self._mine.discard(key)

    def live(self, key: str) -> list[Pin]:
        """Pins of ``key`` whose leases hold."""
        return [p for _, p in self._all(key) if p.alive]

    def drop_all(self, key: str) -> None:
        """Remove every pin of ``key`` (the caller holds its key lock)."""
        with self._mine_lock:
            self._mine.discard(key)
        shutil.rmtree(self.folder / key, ignore_errors=True)

    def renew(self) -> int:
        """Renew this process's pins now (the renewer does it every third of the lease);
        returns how many were renewed. Needs no free disk space."""
        with self._mine_lock:
            keys = list(self._mine)
        _, name = self._holder_name(None)
        n = 0
        for key in keys:
            try:
                os.utime(self.folder / key / name)
                n += 1
            except FileNotFoundError:  # removed (rm --force): nothing to renew
                with self._mine_lock:
                    self._mine.discard(key)
            except OSError:
                pass
        return n

    def clean(self, is_key: Callable[[str], bool]) -> None:
        """Remove expired pins and pins half-written by a process killed in `pin` (older than a
        lease), then the folders of keys nobody pins any more."""
        for name in os.listdir(self.folder):
            if not is_key(name):
                continue
            for file, pin in self._all(name):
                if not pin.alive:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.folder / name / file)
            with contextlib.suppress(FileNotFoundError):
                for e in os.scandir(self.folder / name):
                    with contextlib.suppress(FileNotFoundError):
                        if e.name.startswith(".") and e.stat().st_mtime + self.lease_s < time.time():
                            os.unlink(e.path)
            self._remove_if_empty(name)

    def _remove_if_empty(self, key: str) -> None:
        """Remove ``key``'s pin folder if it is empty, under the key lock (pin() may be about to
        write into it) and only if the lock is free at once (a busy key keeps its folder)."""
        try:
            with self._key_lock(key, timeout=0), contextlib.suppress(OSError):
                (self.folder / key).rmdir()  # only if empty
        except (TimeoutError, StoreFull):
            pass

    def _all(self, key: str) -> list[tuple[str, Pin]]:
        d = self.folder / key
        out: list[tuple[str, Pin]] = []
        try:
            names = [n for n in os.listdir(d) if not n.startswith(".")]
        except FileNotFoundError:
            return out
        for name in names:
            try:
                st = os.stat(d / name)
                rec = msgspec.json.decode((d / name).read_bytes(), type=_PinRecord)
            except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                continue  # being replaced or removed
            renewed = datetime.fromtimestamp(st.st_mtime, timezone.utc)
            expires = datetime.fromtimestamp(st.st_mtime + self.lease_s, timezone.utc)
            out.append((name, Pin(rec.pid, rec.host, rec.created, renewed, expires)))
        return out

    def _start_renewer(self) -> None:
        if self._renewer is not None and self._renewer.is_alive():
            return
        ref = weakref.ref(self)
        period = self.lease_s / 3

        def loop() -> None:
            while True:
                time.sleep(period)
                board = ref()
                if board is None:
                    return
                board.renew()
                del board

        self._renewer = threading.Thread(target=loop, name="loragen-pin-renewer", daemon=True)
        self._renewer.start()
        atexit.register(_release_at_exit, ref)


def _release_at_exit(ref: weakref.ref[PinBoard]) -> None:
    board = ref()
    if board is not None:
        board.release()
