"""The hot-swap adapter store: content-addressed PEFT folders on disk, shared by processes.

An adapter is stored under the key ``sha256(normalised description, generator fingerprint,
seed)`` (`AdapterStore.key`), so the description is never a path. All state is on disk, so a
store survives restarts and several server processes can share one::

    <root>/adapters/<key>/              the PEFT folder vLLM loads, plus loragen_meta.json
    <root>/usage/<key>                  hit log: one byte appended per hit (hits = size,
                                        last used = mtime); the hot path never rewrites a file
    <root>/pins/<key>/<holder>          a server process may (re)load this adapter (a lease)
    <root>/locks/store.lock             serialises gc; locks/<key>.lock: the lock of one key
                                        (flock; unrelated keys never wait on each other); gc
                                        removes those of keys with no adapter and no pins
    <root>/tmp/ trash/ quarantine/      publishing, being deleted, failed its integrity check

Publish is atomic: files are written to ``tmp/`` and the folder is renamed into
``adapters/``; a rename onto an existing adapter fails, so exactly one of several concurrent
publishers wins and the others return the winner. Removal renames the folder into ``trash/``
before deleting it. Readers therefore see a whole adapter or none, and a process killed at any
point (kill -9) leaves either the whole adapter or an unfinished ``tmp/`` folder (gc removes it).

Nothing a cold request does not need runs before `publish` returns: fsync and eviction run
after it, in a background thread of the store (`_settle`; ``sync="inline"``,
``$LORAGEN_STORE_SYNC=inline``, runs them before it returns, as this store once did). An
adapter is deterministic in (description, seed, generator), so durability only saves a
regeneration: a power loss before its fsync leaves at worst a folder that is missing, empty or
torn, which the sha256 check below finds, and the adapter is made again. `drain` waits for the
background work (and runs at exit, bounded).

`get` verifies the size and sha256 of every file against the metadata before returning; a
corrupt adapter is moved to ``quarantine/`` (under its key lock, only if it is still the folder
that failed) and reported as a miss, so the caller regenerates it. It is never served. The
adapter it returns carries the folder's stat state from before the check, so a holder can ask
`unchanged` (a few ``stat`` calls, no reading) whether the files are still the ones verified.

Eviction (`gc`, also run after each `publish`, in the background) removes least recently used adapters until the
count and byte limits hold, but never a pinned one: vLLM may reload an adapter's folder at any
time, so the plugin `pin`s every adapter it hands to vLLM and `unpin`s it when vLLM forgets it
(``pins.py``: who pins, and when a pin no longer counts).

Every lock wait is bounded. `key_lock` waits at most its ``timeout`` (default: the store's
``lock_timeout_s``, ``$LORAGEN_LOCK_TIMEOUT_S``) and then raises `LockTimeout` (HTTP 503, with a
retry-after), so a key lock held by a stopped or slow process is a clear error, never a hang;
`get_or_create` waits for the key's lock until the caller's ``deadline`` at most.

A full disk: lookups never need a write to succeed (recording a hit or a pin that cannot be
written is skipped, logged), so stored adapters are still served; `publish` answers `StoreFull`
(503) after a gc that frees at least the adapter's size where it can (least recently used
adapters first, pins respected).

`get_or_create(key, make)` is the one way to generate an adapter into the store: under the key's
cross-process and cross-thread lock (`key_lock`, re-entrant in one thread) it returns the
verified adapter, or calls ``make()`` and publishes what it returns. Of several threads or server
processes asking for one key, one generates and the others find its adapter::

    stored, generated = store.get_or_create(key, lambda: NewAdapter(files, ...), pin=True)
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import msgspec
from filelock import FileLock, Timeout

from loragen_vllm import envs, metrics
from loragen_vllm.adapter_files import AdapterFiles, check_adapter_files
from loragen_vllm.descriptions import validate_description
from loragen_vllm.errors import (
    AdapterPinned,
    LockTimeout,
    StoreCorrupt,
    StoreFull,
    UnknownAdapter,
)
from loragen_vllm.pins import Pin, PinBoard
from loragen_vllm.processes import PID_SPACE, pid_alive
from loragen_vllm.store_meta import (
    META_FILE,
    FolderState,
    StoredAdapterMeta,
    file_infos,
    folder_state,
    read_meta,
    verify_folder,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_ADAPTERS: int | None = envs.default("LORAGEN_STORE_MAX_ADAPTERS")  # 1000
DEFAULT_MAX_BYTES: int | None = envs.default("LORAGEN_STORE_MAX_BYTES")  # 4 GiB
STALE_TMP_SECONDS = 24 * 3600  # unfinished publishes of unknown owners older than this go
QUARANTINE_SECONDS = 24 * 3600  # corrupt folders are kept this long for inspection

SYNC_MODES = ("background", "inline")
ADAPTERS_DIR = "adapters"  # under a store's root: one folder per published adapter
SETTLE_IDLE_S = 5.0  # the background settler thread ends after this long without work
DRAIN_AT_EXIT_S = 10.0  # at exit, wait at most this long for adapters still to be settled

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

StepTimer = Callable[[str, float], None]  # (step name, seconds): see `AdapterStore.step_timer`
_KEY_RE = re.compile(r"[0-9a-f]{64}\Z")  # with .match: the whole name
_KEY_VERSION = "loragen-vllm adapter key v1"


# ----------------------------------------------------------------------------------------------
# What the store hands out and takes in (the metadata file's format: store_meta.py)


@dataclass(frozen=True)
class StoredAdapter:
    """A verified adapter in the store: its key, folder (give this to vLLM) and metadata, and
    the folder's stat state taken before it was verified (`AdapterStore.unchanged`)."""

    key: str
    path: Path
    meta: StoredAdapterMeta
    state: FolderState = ()


@dataclass(frozen=True)
class NewAdapter:
    """A freshly generated adapter and what it was generated from: what `publish` stores."""

    files: AdapterFiles
    description: str  # the key is made of description, fingerprint and seed
    fingerprint: str
    seed: int
    generator_kind: str


@dataclass
class GCReport:
    """What one `AdapterStore.gc` did and what remains."""

    evicted: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    count: int = 0  # adapters left
    bytes: int = 0  # their total size
    pinned: int = 0  # adapters left that are pinned by live processes
    over_limit: bool = False  # limits still exceeded (everything left is pinned or busy)


# ----------------------------------------------------------------------------------------------
# Small file-system helpers


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _from_ns(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, timezone.utc)


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` (fails if it exists); not fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _fsync_path(path: Path, flags: int) -> None:
    """fsync the file or folder at ``path`` (opened with ``flags``)."""
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise UnknownAdapter(f"not an adapter key (64 lowercase hex digits): {str(key)[:80]!r}")
    return key


# ----------------------------------------------------------------------------------------------
# The store


class AdapterStore:
    """Content-addressed, process-safe adapter folders with LRU eviction and pins."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        max_adapters: int | None = DEFAULT_MAX_ADAPTERS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        lock_timeout_s: float = envs.default("LORAGEN_LOCK_TIMEOUT_S"),
        pin_lease_s: float = envs.default("LORAGEN_PIN_LEASE_S"),
        sync: str = envs.default("LORAGEN_STORE_SYNC"),
    ) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        self.root = Path(root if root is not None else envs.LORAGEN_STORE).expanduser()
        self.root = self.root.resolve()  # vLLM needs absolute adapter paths
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self.lock_timeout_s = lock_timeout_s
        self.sync = sync  # when a new adapter is fsynced and gc runs: "background" | "inline"
        self._settler: _Settler | None = None
        self._settler_lock = threading.Lock()
        self._unwritten_pins: set[str] = set()  # pins this process could not write (disk full)
        self._held = threading.local()  # key -> [fd, depth] of the key locks this thread holds
        self._adapters = self.root / ADAPTERS_DIR
        self._usage = self.root / "usage"
        self._locks = self.root / "locks"
        self._tmp = self.root / "tmp"
        self._trash = self.root / "trash"
        self._quarantine = self.root / "quarantine"
        for d in (self._adapters, self._usage, self._locks, self._tmp, self._trash, self._quarantine):
            d.mkdir(parents=True, exist_ok=True)
        self._pins = PinBoard(self.root / "pins", self.key_lock, lease_s=pin_lease_s)
        # Called after each step of the publish path with its name and duration (benchmarks;
        # tests stop a process at a step with it). None: not timed.
        self.step_timer: StepTimer | None = None

    @classmethod
    def from_env(cls, root: str | os.PathLike[str] | None = None) -> AdapterStore:
        """A store configured by $LORAGEN_STORE (unless ``root`` is given),
        $LORAGEN_STORE_MAX_ADAPTERS, $LORAGEN_STORE_MAX_BYTES, $LORAGEN_LOCK_TIMEOUT_S,
        $LORAGEN_PIN_LEASE_S and $LORAGEN_STORE_SYNC (see `envs`)."""
        return cls(
            root,
            max_adapters=envs.LORAGEN_STORE_MAX_ADAPTERS,
            max_bytes=envs.LORAGEN_STORE_MAX_BYTES,
            lock_timeout_s=envs.LORAGEN_LOCK_TIMEOUT_S,
            pin_lease_s=envs.LORAGEN_PIN_LEASE_S,
            sync=envs.LORAGEN_STORE_SYNC,
        )

    # -- keys and locks --------------------------------------------------------------------

    @staticmethod
    def key(description: str, fingerprint: str, seed: int) -> str:
        """Hex sha256 of (normalised description, generator fingerprint, seed).

        Raises `InvalidDescription` for text that is not a valid description (length is not
        checked here: that is a serving limit, not part of the identity).
        """
        text = validate_description(description, max_chars=None)
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError("the generator fingerprint must be a non-empty string")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        payload = msgspec.json.encode([_KEY_VERSION, text, fingerprint, str(seed)])
        return hashlib.sha256(payload).hexdigest()

    def path(self, key: str) -> Path:
        """Folder of adapter ``key`` (it may not exist)."""
        return self._adapters / _check_key(key)

    @contextlib.contextmanager
    def key_lock(self, key: str, timeout: float | None = None) -> Iterator[None]:
        """Hold the lock of ``key`` (one lock file per key) across processes and threads;
        re-entrant in one thread.

        Waits at most ``timeout`` seconds (None: the store's ``lock_timeout_s``), then raises
        `LockTimeout` (a ``TimeoutError``; HTTP 503 with a retry-after).
        """
        wait = self.lock_timeout_s if timeout is None else max(0.0, timeout)
        held = self._held_locks()
        entry = held.get(_check_key(key))
        if entry is None:
            entry = held[key] = [self._acquire_key_file(key, wait), 0]
        entry[1] += 1
        try:
            yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del held[key]
                # unlock before closing: a child forked meanwhile shares the open file (and the flock)
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                os.close(entry[0])

    def _held_locks(self) -> dict[str, list[int]]:
        if getattr(self._held, "pid", None) != os.getpid():  # new thread, or a forked child
            self._held.pid, self._held.locks = os.getpid(), {}
        return self._held.locks

    def _acquire_key_file(self, key: str, wait: float) -> int:
        """An fd holding the flock of ``<locks>/<key>.lock`` -- the file now at that path (gc
        may remove a lock file nobody holds; a lock taken on a removed file is let go and taken
        again) -- within ``wait`` seconds, else `LockTimeout`."""
        path = self._locks / f"{key}.lock"
        deadline = time.monotonic() + wait
        delay = 0.001
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:  # the lock file of a new key cannot be created
                if e.errno in _NO_SPACE:
                    raise StoreFull(f"no space left in the adapter store for adapter {key[:12]}'s lock file",
                                    retry_after_s=30) from e
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LockTimeout(
                        f"adapter {key[:12]} is locked by another server process or thread (held past "
                        f"the {wait:g} s deadline)", retry_after_s=int(min(max(wait, 1), 60)),
                    ) from None
                time.sleep(min(delay, left))
                delay = min(delay * 2, 0.05)
                continue
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # gc removed the file we locked: lock the one at the path now

    def _remove_lock_file(self, key: str) -> None:
        """gc: remove ``key``'s lock file if nobody holds it and the key has no adapter and no
        pins (checked under the lock: publishing and pinning happen under it)."""
        path = self._locks / f"{key}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                return
            if (self._adapters / key).exists() or (self._pins.folder / key).exists():
                return
            os.unlink(path)
        except (BlockingIOError, FileNotFoundError):
            return  # held (in use), or already gone
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)  # before closing, as key_lock does
            os.close(fd)

    @contextlib.contextmanager
    def _step(self, name: str) -> Iterator[None]:
        """Time one step of the publish path for `step_timer` (nothing when it is None)."""
        timer = self.step_timer
        if timer is None:
            yield
            return
        t0 = time.perf_counter()
        yield
        timer(name, time.perf_counter() - t0)

    def _gc_lock(self) -> FileLock:
        return FileLock(self._locks / "store.lock", is_singleton=True)

    # -- reading -----------------------------------------------------------------------------

    def get(self, key: str, *, record_hit: bool = True) -> StoredAdapter | None:
        """The verified adapter ``key``, or None if absent or corrupt (then it is quarantined).

        Every file's size and sha256 is checked against the metadata. A hit costs one
        appended byte in the usage log.
        """
        path = self.path(key)
        inode = None
        try:
            state = folder_state(path)  # before reading: a write during the check changes it
            inode = state[0][1]
            meta = verify_folder(path, key)
        except FileNotFoundError:
            metrics.STORE_LOOKUPS.labels("miss").inc()
            return None  # absent, or removed while we read it
        except OSError as e:  # its folder cannot be read: as corrupt (served by nobody)
            unreadable = StoreCorrupt(key, f"its folder cannot be read ({e.strerror or e})")
            metrics.STORE_LOOKUPS.labels("corrupt").inc()
            logger.warning("%s; it will be regenerated if it can be moved aside", unreadable)
            if inode is not None:
                with contextlib.suppress(TimeoutError, OSError):
                    self._quarantine_if_same(key, inode, unreadable.reason)
            return None
        except StoreCorrupt as e:
            metrics.STORE_LOOKUPS.labels("corrupt").inc()
            logger.warning("%s; quarantined, it will be regenerated", e)
            with contextlib.suppress(TimeoutError, OSError):  # busy or disk trouble: next time
                self._quarantine_if_same(key, inode, e.reason)
            return None
        metrics.STORE_LOOKUPS.labels("hit").inc()
        if record_hit:
            self._record_hit(key)
        return StoredAdapter(key, path, self._with_usage(meta), state)

    def unchanged(self, stored: StoredAdapter) -> bool:
        """Whether ``stored``'s folder and files are, by their stat state, exactly as when they
        were verified (nothing written, replaced, added or removed since). False if it is gone."""
        try:
            return bool(stored.state) and folder_state(stored.path) == stored.state
        except OSError:
            return False

    def _record_hit(self, key: str) -> None:
        """Append one byte to the usage log; a lookup never fails for it (disk full: skipped)."""
        # O_APPEND writes of one byte are atomic across processes: hits = file size.
        try:
            fd = os.open(self._usage / key, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, b".")
                _stamp(fd)
            finally:
                os.close(fd)
        except OSError as e:
            logger.debug("hit of %s not recorded: %s", key[:12], e)

    def _with_usage(self, meta: StoredAdapterMeta) -> StoredAdapterMeta:
        try:
            st = os.stat(self._usage / meta.key)
        except FileNotFoundError:
            return meta
        return msgspec.structs.replace(meta, hits=st.st_size, last_used=_from_ns(st.st_mtime_ns))

    def _last_used_ns(self, key: str, path: Path, created: datetime | None = None) -> int:
        """When ``key`` was last used: its usage log's mtime (nanosecond stamps, `_stamp`); without
        one, its creation time from its metadata, else its folder's mtime. A publish renames the
        folder into place before it writes the usage log, and a gc running in between must not
        take the folder's coarse-clock mtime, which can fall before the stamps of adapters
        published just before it (it would evict the newest adapter first)."""
        try:
            return os.stat(self._usage / key).st_mtime_ns
        except FileNotFoundError:
            pass
        if created is not None:
            return int(created.timestamp() * 1_000_000) * 1000
        try:
            return os.stat(path).st_mtime_ns
        except FileNotFoundError:
            return 0

    def keys(self) -> list[str]:
        """Keys of the adapters in the store (unverified)."""
        return sorted(k for k in os.listdir(self._adapters) if _KEY_RE.match(k))

    def show(self, key: str) -> StoredAdapterMeta | None:
        """Metadata (with live hits and last use) of ``key`` without verifying its files."""
        path = self.path(key)
        try:
            return self._with_usage(read_meta(path, key))
        except FileNotFoundError:
            return None

    def ls(self) -> list[StoredAdapterMeta]:
        """Metadata of all stored adapters, most recently used first (unreadable ones skipped)."""
        out = []
        for key in self.keys():
            try:
                meta = self.show(key)
            except StoreCorrupt as e:
                logger.warning("%s", e)
                continue
            if meta is not None:
                out.append(meta)
        return sorted(out, key=lambda m: m.last_used, reverse=True)

    def resolve_key(self, prefix: str) -> str:
        """The one stored key starting with ``prefix`` (at least 4 hex digits)."""
        p = prefix.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{4,64}", p):
            raise UnknownAdapter(f"not an adapter key or key prefix (4-64 hex digits): {prefix!r}")
        matches = [k for k in self.keys() if k.startswith(p)]
        if not matches:
            raise UnknownAdapter(f"no stored adapter has a key starting with {p}")
        if len(matches) > 1:
            raise UnknownAdapter(f"key prefix {p} is ambiguous ({len(matches)} adapters)")
        return matches[0]

    # -- publishing --------------------------------------------------------------------------

    def publish(
        self,
        files: Mapping[str, bytes],
        *,
        description: str,
        fingerprint: str,
        seed: int,
        generator_kind: str,
    ) -> StoredAdapter:
        """Store an adapter atomically under its key; if a valid one exists, return that one.

        Returns once the adapter is in place; fsync and `gc` (when limits are set; never evicting
        the adapter just published) follow in the background (`sync="background"`) or before
        it returns (``"inline"``).
        """
        with self._step("check"):
            files = check_adapter_files(files, reserved=(META_FILE,))
            text = validate_description(description, max_chars=None)
            key = self.key(text, fingerprint, seed)
        with self.key_lock(key):  # re-entrant; also creates the key's lock file while space lasts
            return self._publish_locked(key, files, text, fingerprint, seed, generator_kind)

    def _publish_locked(
        self, key: str, files: AdapterFiles, text: str, fingerprint: str, seed: int, generator_kind: str
    ) -> StoredAdapter:
        for _ in range(3):  # a concurrent winner may itself turn out corrupt: try again
            existing = self.get(key, record_hit=False)
            if existing is not None:
                return existing
            now = _now()
            with self._step("hash"):
                meta = StoredAdapterMeta(
                    key=key,
                    description=text,
                    generator_kind=generator_kind,
                    fingerprint=fingerprint,
                    seed=seed,
                    created=now,
                    last_used=now,
                    hits=0,
                    files=file_infos(files),
                    size=sum(len(d) for d in files.values()),
                )
            try:
                published = self._publish_folder(key, files, meta)
            except OSError as e:
                if e.errno not in _NO_SPACE:
                    raise
                report = self.gc(keep=(key,), wait=False, free_bytes=meta.size * 2)
                raise StoreFull(
                    f"no space left in the adapter store to publish a new adapter (gc freed "
                    f"{report.freed_bytes} bytes); stored adapters are still served",
                    retry_after_s=30,
                ) from e
            if published:
                # Fresh usage log: last used = now, no hits yet.
                with self._step("usage"), contextlib.suppress(OSError):
                    fd = os.open(self._usage / key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    try:
                        _stamp(fd)
                    finally:
                        os.close(fd)
                try:
                    state = folder_state(self.path(key))  # as written: its content is `meta`'s
                except FileNotFoundError:
                    state = ()  # removed already (rm): never `unchanged`
                self._settle_later(key)
                return StoredAdapter(key, self.path(key), meta, state)
        raise StoreCorrupt(key, "concurrent publishes keep producing corrupt adapters")

    def get_or_create(
        self,
        key: str,
        make: Callable[[], NewAdapter],
        *,
        pin: bool = False,
        record_hit: bool = True,
        deadline: float | None = None,
    ) -> tuple[StoredAdapter, bool]:
        """The adapter ``key``: verified from the store, else ``make()`` published. Returns
        (adapter, whether ``make`` ran).

        Lock, look up, generate, publish: all under the key's lock, so one of several threads
        or processes asking for ``key`` makes it and the others find it. With ``pin``, this
        process pins ``key`` before the lookup, so that no other process's `gc` evicts it before
        the caller uses it, and pins the published adapter too if ``make`` returned one of
        another key (its generator changed meanwhile). Exceptions of ``make`` propagate;
        nothing is published then.

        ``deadline`` (``time.monotonic()`` seconds): the longest wait for the key's lock (held by
        another process generating it, or by a stopped one) before `LockTimeout`; None waits
        ``lock_timeout_s``. A pin that cannot be written (disk full) is skipped, logged.
        """
        wait = None if deadline is None else deadline - time.monotonic()
        with contextlib.ExitStack() as locked:
            with self._step("lock"):
                locked.enter_context(self.key_lock(key, timeout=wait))
            if pin:
                with self._step("pin"):
                    self.try_pin(key)
            with self._step("lookup"):
                hit = self.get(key, record_hit=record_hit)
            if hit is not None:
                return hit, False
            new = make()
            stored = self.publish(
                new.files,
                description=new.description,
                fingerprint=new.fingerprint,
                seed=new.seed,
                generator_kind=new.generator_kind,
            )
        if pin and stored.key != key:
            self.try_pin(stored.key)
        return stored, True

    def _publish_folder(self, key: str, files: AdapterFiles, meta: StoredAdapterMeta) -> bool:
        """Write into ``tmp/`` and rename into place (no fsync: `_settle` makes it durable);
        False if another publisher got there first."""
        tmp = self._tmp / f"{key}.{PID_SPACE}.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            with self._step("write"):
                for name, data in {**files, META_FILE: msgspec.json.encode(meta)}.items():
                    _write_new(tmp / name, data)
            with self._step("rename"):
                try:
                    os.rename(tmp, self._adapters / key)  # fails if the key exists (non-empty dir)
                except OSError as e:
                    if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        return False
                    raise
            return True
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    # -- after a publish: durability and eviction ---------------------------------------------

    def _settle_later(self, key: str) -> None:
        """Settle a new adapter: in this thread (``sync="inline"``) or, by default, in the
        store's background thread once the caller has its answer."""
        if self.sync == "inline":
            self._settle([key])
            return
        with self._settler_lock:
            if self._settler is None or self._settler.pid != os.getpid():  # first use, or a forked child
                self._settler = _Settler(self)
            settler = self._settler
        settler.put(key)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until the adapters this process published are settled (fsynced, gc run);
        False if ``timeout`` seconds passed first. (At exit it is called with a few seconds.)"""
        settler = self._settler
        if settler is None or settler.pid != os.getpid():
            return True
        return settler.drain(timeout)

    def _settle(self, keys: list[str]) -> None:
        """Make new adapters durable (fsync their files, folders and ``adapters/``), then
        evict down to the limits (sparing them).

        Not needed for correctness: until it ran, a kill -9 loses nothing (the kernel holds
        the data) and a power loss at worst leaves a folder that fails its sha256 check, which
        is then quarantined and regenerated like any corrupt adapter. An fsync that fails is
        logged; the adapter stays (the same check guards every later read).
        """
        with self._step("fsync"):
            for key in keys:
                folder = self._adapters / key
                try:
                    for name in os.listdir(folder):
                        _fsync_path(folder / name, os.O_RDONLY)
                    _fsync_path(folder, os.O_RDONLY | os.O_DIRECTORY)
                except FileNotFoundError:
                    continue  # removed meanwhile (rm, gc, quarantine): nothing to keep
                except OSError as e:
                    logger.warning("adapter %s not made durable (%s); the sha256 check guards its reads", key[:12], e)
            with contextlib.suppress(OSError):
                _fsync_path(self._adapters, os.O_RDONLY | os.O_DIRECTORY)
        if self.max_adapters is not None or self.max_bytes is not None:
            # Spare the newest adapter this process published (also one queued for the next pass);
            # the others go in least-recently-used order like any adapter.
            settler = self._settler
            newest = ([*keys, *settler.queued()] if settler is not None else keys)[-1:]
            with self._step("gc"):
                self.gc(keep=tuple(newest), wait=False)

    # -- removal -----------------------------------------------------------------------------

    def _move_away(self, key: str, into: Path, suffix: str) -> Path | None:
        """Rename adapter ``key`` out of adapters/ (atomic); None if it is not there."""
        dest = into / f"{key}.{suffix}"
        try:
            os.rename(self._adapters / key, dest)
        except FileNotFoundError:
            return None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._usage / key)
        return dest

    def _quarantine_if_same(self, key: str, inode: int, reason: str) -> None:
        with self.key_lock(key):  # bounded: LockTimeout if busy (the caller skips it)
            try:
                if os.stat(self._adapters / key).st_ino != inode:
                    return  # replaced by a fresh publish meanwhile
            except FileNotFoundError:
                return
            dest = self._move_away(key, self._quarantine, f"{time.time_ns()}")
            if dest is not None:
                with contextlib.suppress(OSError):
                    (dest / "QUARANTINE_REASON").write_text(reason + "\n")

    def rm(self, key: str, *, force: bool = False) -> bool:
        """Remove adapter ``key``; False if absent. Raises `AdapterPinned` if a live process
        pinned it, unless ``force`` (then its pins go too)."""
        with self.key_lock(key):
            if not self.path(key).exists():
                return False
            live = self.pins(key)
            if live and not force:
                holders = ", ".join(f"pid {p.pid}@{p.host}" for p in live)
                raise AdapterPinned(
                    f"adapter {key[:12]} is pinned by a running server ({holders}); "
                    "use --force to remove it anyway"
                )
            dest = self._move_away(key, self._trash, secrets.token_hex(4))
            if force:
                self._pins.drop_all(key)
        if dest is not None:
            shutil.rmtree(dest, ignore_errors=True)
        return dest is not None

    # -- pins ---------------------------------------------------------------------------------

    def pin(self, key: str, holder: int | None = None, timeout: float | None = None) -> None:
        """Mark ``key`` as possibly (re)loaded by process ``holder`` (default: this process,
        renewed while it runs; another holder's pin lasts one lease). Raises OSError if it
        cannot be written, `LockTimeout` if the key's lock stays busy past ``timeout`` seconds
        (None: ``lock_timeout_s``)."""
        self._pins.pin(_check_key(key), holder, timeout)

    def try_pin(self, key: str, timeout: float | None = None) -> bool:
        """`pin` for this process, but a pin that cannot be written (disk full, read-only
        store) is logged and skipped: serving a stored adapter never needs a write."""
        try:
            self.pin(key, timeout=timeout)
        except (OSError, StoreFull) as e:
            if isinstance(e, TimeoutError):
                raise
            # This process's gc still spares it; other processes cannot see the pin.
            self._unwritten_pins.add(key)
            logger.warning("adapter %s served without a pin file: it cannot be written (%s)", key[:12], e)
            return False
        self._unwritten_pins.discard(key)
        return True

    def renew_pins(self) -> int:
        """Renew this process's pins now (a background thread does it every third of the lease)."""
        return self._pins.renew()

    @property
    def pin_lease_s(self) -> float:
        return self._pins.lease_s

    def unpin(self, key: str, holder: int | None = None) -> None:
        """Drop the pin of process ``holder`` (default: this process) on ``key``, if any."""
        if holder is None:
            self._unwritten_pins.discard(key)
        self._pins.unpin(_check_key(key), holder)

    def stop_renewing(self, key: str) -> None:
        """Let this process's pin on ``key`` end with its lease (for when `unpin` cannot take
        the key's lock now): no longer renewed, nor spared by this process's gc."""
        self._unwritten_pins.discard(key)
        self._pins.stop_renewing(_check_key(key))

    def pins(self, key: str) -> list[Pin]:
        """Pins of ``key`` whose leases hold (expired ones are left out)."""
        return self._pins.live(_check_key(key))

    # -- eviction ----------------------------------------------------------------------------

    def gc(self, *, keep: tuple[str, ...] = (), wait: bool = True, free_bytes: int = 0) -> GCReport:
        """Evict least recently used, unpinned adapters until the limits hold; clean up
        unfinished publishes, trash, old quarantine, expired pins and orphan usage logs.

        ``keep``: keys never evicted in this pass. ``wait=False`` returns at once (empty
        report) if another process is collecting already; ``wait=True`` waits at most
        ``lock_timeout_s`` (then `LockTimeout`). ``free_bytes``: also evict until at least
        this many bytes of adapters were freed (the disk is full). Needs no free disk space.
        """
        lock = self._gc_lock()
        try:
            lock.acquire(timeout=self.lock_timeout_s if wait else 0)
        except Timeout:
            if wait:
                raise LockTimeout(f"the store's gc lock stayed held past {self.lock_timeout_s:g} s") from None
            return GCReport()
        try:
            self._clean_aside()
            return self._evict(set(keep), free_bytes)
        finally:
            lock.release()

    def _clean_aside(self) -> None:
        now = time.time()

        def age(entry: os.DirEntry[str]) -> float:
            # a concurrent publish or cleaner may rename/remove the entry under us
            try:
                return now - entry.stat().st_mtime
            except FileNotFoundError:
                return 0.0

        for entry in os.scandir(self._tmp):
            # name: <key>.<PID_SPACE>.<pid>.<rand>; the owner's liveness decides where its pid is
            # ours to check (this host, boot and PID namespace); elsewhere its age alone
            parts = entry.name.split(".")
            owner_dead = (
                len(parts) >= 4
                and ".".join(parts[1:-2]) == PID_SPACE  # its pid means a process we can see
                and parts[-2].isdigit()
                and not pid_alive(int(parts[-2]))
            )
            if owner_dead or age(entry) > STALE_TMP_SECONDS:
                shutil.rmtree(entry.path, ignore_errors=True)
        for entry in os.scandir(self._trash):
            shutil.rmtree(entry.path, ignore_errors=True)
        for entry in os.scandir(self._quarantine):
            if age(entry) > QUARANTINE_SECONDS:
                shutil.rmtree(entry.path, ignore_errors=True)
        present = set(self.keys())
        for name in os.listdir(self._usage):
            if _KEY_RE.match(name) and name not in present:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._usage / name)
        self._pins.clean(is_key=lambda name: _KEY_RE.match(name) is not None)
        present = set(self.keys())
        for name in os.listdir(self._locks):
            key = name.removesuffix(".lock")
            if name.endswith(".lock") and _KEY_RE.match(key) and key not in present:
                self._remove_lock_file(key)

    def _evict(self, keep: set[str], free_bytes: int = 0) -> GCReport:
        sizes: dict[str, int] = {}
        last_used: dict[str, int] = {}
        for key in self.keys():
            path = self._adapters / key
            created = None
            try:
                meta = read_meta(path, key)
                sizes[key], created = meta.size, meta.created
            except FileNotFoundError:
                continue
            except StoreCorrupt:  # count what is on disk; gc may evict it like any other
                try:
                    sizes[key] = sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
                except OSError as e:  # quarantined meanwhile by another process, or unreadable
                    if not isinstance(e, FileNotFoundError):
                        logger.warning("stored adapter %s cannot be read (%s); gc leaves it", key[:12], e)
                    continue
            last_used[key] = self._last_used_ns(key, path, created)
        report = GCReport(count=len(sizes), bytes=sum(sizes.values()))

        def over() -> bool:
            return (
                (self.max_adapters is not None and report.count > self.max_adapters)
                or (self.max_bytes is not None and report.bytes > self.max_bytes)
                or report.freed_bytes < free_bytes
            )

        for key in sorted(sizes, key=lambda k: last_used[k]):  # least recently used first
            if not over():
                break
            if key in keep or key in self._unwritten_pins or self.pins(key):
                continue
            try:
                with self.key_lock(key, timeout=0):  # busy (being generated/pinned): skip
                    if self.pins(key):
                        continue
                    dest = self._move_away(key, self._trash, secrets.token_hex(4))
            except (TimeoutError, StoreFull):  # busy, or no lock file and no space for one
                continue
            if dest is None:
                continue
            shutil.rmtree(dest, ignore_errors=True)
            report.evicted.append(key)
            report.freed_bytes += sizes[key]
            report.count -= 1
            report.bytes -= sizes[key]
        report.over_limit = over()
        metrics.STORE_ADAPTERS.set(report.count)
        metrics.STORE_BYTES.set(report.bytes)
        report.pinned = sum(1 for k in sizes if k not in report.evicted and self.pins(k))
        if report.evicted:
            logger.info("store gc: evicted %d adapters (%d bytes)", len(report.evicted),
                        report.freed_bytes)
        return report


def _stamp(fd: int) -> None:
    """Set a usage log's mtime (= last use) from the nanosecond clock: the kernel's file times
    come from a coarse clock, and adapters published in one burst would tie in LRU order."""
    now = time.time_ns()
    os.utime(fd, ns=(now, now))


class _Settler:
    """The background thread of one store in one process: settles published adapters
    (`AdapterStore._settle`: fsync, then gc) after the caller has its answer, several at once
    when they queue up. Started on demand, it ends when idle; at exit it is drained (bounded),
    so a short-lived process (``loragen-vllm generate``) still leaves its adapter durable."""

    def __init__(self, store: AdapterStore) -> None:
        self.pid = os.getpid()
        self._store = weakref.ref(store)
        self._pending: list[str] = []
        self._busy = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        atexit.register(self.drain, DRAIN_AT_EXIT_S)

    def put(self, key: str) -> None:
        with self._cond:
            self._pending.append(key)
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="loragen-store-settle", daemon=True)
                self._thread.start()

    def queued(self) -> list[str]:
        """Keys published and waiting for the next pass."""
        with self._cond:
            return list(self._pending)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending or being settled; False if ``timeout`` passed first."""
        if os.getpid() != self.pid:
            return True
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._pending, SETTLE_IDLE_S):
                    self._thread = None  # idle: the next put starts a new thread
                    return
                keys, self._pending, self._busy = self._pending, [], True
            try:
                store = self._store()
                if store is not None:
                    store._settle(keys)
                del store
            except Exception:  # a failed settle costs durability or a gc pass, never the store
                logger.exception("settling adapters %s failed", ", ".join(k[:12] for k in keys))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
