"""The hot-swap adapter store: content-addressed PEFT folders on disk, shared by processes.

An adapter is stored under the key ``sha256(normalised description, generator fingerprint,
seed)`` (`AdapterStore.key`), so the description is never a path. All state is on disk, so a
store survives restarts and several server processes can share one::

    <root>/adapters/<key>/              the PEFT folder vLLM loads, plus loragen_meta.json
    <root>/usage/<key>                  hit log: one byte appended per hit (hits = size,
                                        last used = mtime); the hot path never rewrites a file
    <root>/pins/<key>/<pid>@<host>      a live server process may (re)load this adapter
    <root>/locks/store.lock             serialises gc; locks/k<abc>.lock: per-key locks,
                                        striped over the first 3 hex digits (4096 files at most)
    <root>/tmp/ trash/ quarantine/      publishing, being deleted, failed its integrity check

Publish is atomic: files are written to ``tmp/``, fsynced, and the folder is renamed into
``adapters/``; a rename onto an existing adapter fails, so exactly one of several concurrent
publishers wins and the others return the winner. Removal renames the folder into ``trash/``
before deleting it. Readers therefore see a whole adapter or none.

`get` verifies the size and sha256 of every file against the metadata before returning; a
corrupt adapter is moved to ``quarantine/`` (under its key lock, only if it is still the folder
that failed) and reported as a miss, so the caller regenerates it. It is never served.

Eviction (`gc`, also run after each `publish`) removes least recently used adapters until the
count and byte limits hold, but never a pinned one: vLLM keeps a resolved ``LoRARequest`` (a
path) and may reload the folder from disk at any time, so the plugin `pin`s every adapter it
hands to vLLM and `unpin`s it when it forgets it. A pin names a process (pid, its start time,
host); pins of dead processes on this host are ignored and cleaned up. Pins from other hosts
(a store on a shared file system) are always treated as live.

`key_lock(key)` is a cross-process and cross-thread lock (re-entrant in one thread) for making
generation of one key happen once::

    with store.key_lock(key):
        store.pin(key)
        hit = store.get(key)
        if hit is None:
            hit = store.publish(generate(...), description=..., fingerprint=..., seed=..., ...)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import msgspec
from filelock import FileLock, Timeout

from loragen_vllm.descriptions import validate_description
from loragen_vllm.errors import AdapterPinned, StoreCorrupt, UnknownAdapter

logger = logging.getLogger(__name__)

AdapterFiles = dict[str, bytes]  # file name -> content of a PEFT adapter folder

META_FILE = "loragen_meta.json"
DEFAULT_MAX_ADAPTERS = 1000
DEFAULT_MAX_BYTES = 4 << 30  # 4 GiB
STALE_TMP_SECONDS = 24 * 3600  # unfinished publishes of unknown owners older than this go
QUARANTINE_SECONDS = 24 * 3600  # corrupt folders are kept this long for inspection

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HOST = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "localhost"
_KEY_VERSION = "loragen-vllm adapter key v1"


def default_store_dir() -> Path:
    """$LORAGEN_STORE, else ~/.cache/loragen-vllm/store."""
    env = os.environ.get("LORAGEN_STORE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loragen-vllm" / "store"


# ----------------------------------------------------------------------------------------------
# Metadata


class FileInfo(msgspec.Struct, frozen=True):
    """Integrity record of one adapter file."""

    sha256: str
    size: int


class AdapterMeta(msgspec.Struct, frozen=True, kw_only=True):
    """Metadata of one stored adapter (``loragen_meta.json`` in its folder).

    Written once at publish with ``hits=0, last_used=created``; the live values of ``hits``
    and ``last_used`` come from the usage log and are filled in when the store reads it.
    """

    key: str
    description: str  # normalised
    generator_kind: str  # "loragen" | "t2l" | ...
    fingerprint: str  # generator fingerprint (hex sha256 of config + weights)
    seed: int
    created: datetime
    last_used: datetime
    hits: int
    files: dict[str, FileInfo]
    size: int  # total bytes of the adapter files
    format: int = 1


class Pin(msgspec.Struct, frozen=True):
    """A server process that may (re)load an adapter from disk."""

    pid: int
    host: str
    start: int  # process start time in clock ticks since boot (/proc/<pid>/stat); 0 = unknown
    created: datetime


@dataclass(frozen=True)
class StoredAdapter:
    """A verified adapter in the store: its key, folder (give this to vLLM) and metadata."""

    key: str
    path: Path
    meta: AdapterMeta


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
# Small file-system and process helpers


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _from_ns(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, timezone.utc)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_durable(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` and fsync it (fails if it exists)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in ticks) of a process on this host from /proc, or None if unknown."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 onwards
    return fields[0], int(fields[19])  # state (field 3), starttime (field 22)


def _pid_alive(pid: int, start: int = 0) -> bool:
    """Whether process ``pid`` on this host runs (and, if ``start`` is known, is the same one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: trust kill(0)
    state, started = stat
    if state in ("Z", "X"):
        return False  # exited, not yet reaped
    return not start or started == start


def _pin_alive(pin: Pin) -> bool:
    return pin.host != _HOST or _pid_alive(pin.pid, pin.start)


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise UnknownAdapter(f"not an adapter key (64 lowercase hex digits): {str(key)[:80]!r}")
    return key


def _check_files(files: Mapping[str, bytes]) -> AdapterFiles:
    """Plain-name, bytes-valued PEFT files with an adapter_config.json; else ValueError."""
    if not files:
        raise ValueError("an adapter needs at least one file")
    out: AdapterFiles = {}
    for name, data in files.items():
        if not isinstance(name, str) or not _FILE_RE.match(name) or name == META_FILE:
            raise ValueError(f"not an allowed adapter file name: {name!r}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"adapter file {name!r} must be bytes, got {type(data).__name__}")
        out[name] = bytes(data)
    if "adapter_config.json" not in out:
        raise ValueError("a PEFT adapter needs adapter_config.json")
    return out


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
    ) -> None:
        self.root = Path(root if root is not None else default_store_dir()).expanduser()
        self.root = self.root.resolve()  # vLLM needs absolute adapter paths
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self._adapters = self.root / "adapters"
        self._usage = self.root / "usage"
        self._pins = self.root / "pins"
        self._locks = self.root / "locks"
        self._tmp = self.root / "tmp"
        self._trash = self.root / "trash"
        self._quarantine = self.root / "quarantine"
        for d in (self._adapters, self._usage, self._pins, self._locks, self._tmp, self._trash,
                  self._quarantine):
            d.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_env(cls, root: str | os.PathLike[str] | None = None) -> AdapterStore:
        """A store configured by $LORAGEN_STORE, $LORAGEN_STORE_MAX_ADAPTERS and
        $LORAGEN_STORE_MAX_BYTES ("none" disables a limit)."""

        def limit(name: str, default: int) -> int | None:
            raw = os.environ.get(name, "").strip().lower()
            if not raw:
                return default
            return None if raw == "none" else int(raw)

        return cls(
            root,
            max_adapters=limit("LORAGEN_STORE_MAX_ADAPTERS", DEFAULT_MAX_ADAPTERS),
            max_bytes=limit("LORAGEN_STORE_MAX_BYTES", DEFAULT_MAX_BYTES),
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
        return _sha256(payload)

    def path(self, key: str) -> Path:
        """Folder of adapter ``key`` (it may not exist)."""
        return self._adapters / _check_key(key)

    @contextlib.contextmanager
    def key_lock(self, key: str, timeout: float | None = None) -> Iterator[None]:
        """Hold the lock of ``key`` across processes and threads; re-entrant in one thread.

        ``timeout`` in seconds (None: wait as long as it takes) raises ``TimeoutError``.
        """
        lock = FileLock(self._locks / f"k{_check_key(key)[:3]}.lock", is_singleton=True)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout as e:
            raise TimeoutError(f"adapter {key[:12]} is locked by another process") from e
        try:
            yield
        finally:
            lock.release()

    def _gc_lock(self) -> FileLock:
        return FileLock(self._locks / "store.lock", is_singleton=True)

    # -- reading -----------------------------------------------------------------------------

    def get(self, key: str, *, record_hit: bool = True) -> StoredAdapter | None:
        """The verified adapter ``key``, or None if absent or corrupt (then it is quarantined).

        Every file's size and sha256 is checked against the metadata. A hit costs one
        appended byte in the usage log.
        """
        path = self.path(key)
        try:
            inode = os.stat(path).st_ino
            meta = self._verify(key, path)
        except FileNotFoundError:
            return None  # absent, or removed while we read it
        except StoreCorrupt as e:
            logger.warning("%s; quarantined, it will be regenerated", e)
            self._quarantine_if_same(key, inode, e.reason)
            return None
        if record_hit:
            self._record_hit(key)
        return StoredAdapter(key, path, self._with_usage(meta))

    def _read_meta(self, key: str, path: Path) -> AdapterMeta:
        try:
            raw = (path / META_FILE).read_bytes()
        except FileNotFoundError:
            if not path.exists():
                raise
            raise StoreCorrupt(key, f"{META_FILE} is missing") from None
        try:
            meta = msgspec.json.decode(raw, type=AdapterMeta)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise StoreCorrupt(key, f"{META_FILE} is unreadable ({e})") from None
        if meta.key != key:
            raise StoreCorrupt(key, f"{META_FILE} belongs to key {meta.key[:12]}")
        return meta

    def _verify(self, key: str, path: Path) -> AdapterMeta:
        """Metadata of the adapter at ``path`` after checking every file; raises StoreCorrupt."""
        meta = self._read_meta(key, path)
        present = set(os.listdir(path)) - {META_FILE}
        if present != set(meta.files):
            missing = sorted(set(meta.files) - present)
            extra = sorted(present - set(meta.files))
            raise StoreCorrupt(key, f"files missing {missing}, unexpected {extra}")
        for name, info in meta.files.items():
            data = (path / name).read_bytes()
            if len(data) != info.size:
                raise StoreCorrupt(key, f"{name} has {len(data)} bytes, expected {info.size}")
            if _sha256(data) != info.sha256:
                raise StoreCorrupt(key, f"{name} fails its sha256 check")
        return meta

    def _record_hit(self, key: str) -> None:
        # O_APPEND writes of one byte are atomic across processes: hits = file size.
        fd = os.open(self._usage / key, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, b".")
        finally:
            os.close(fd)

    def _with_usage(self, meta: AdapterMeta) -> AdapterMeta:
        try:
            st = os.stat(self._usage / meta.key)
        except FileNotFoundError:
            return meta
        return msgspec.structs.replace(meta, hits=st.st_size, last_used=_from_ns(st.st_mtime_ns))

    def _last_used_ns(self, key: str, path: Path) -> int:
        for p in (self._usage / key, path):
            try:
                return os.stat(p).st_mtime_ns
            except FileNotFoundError:
                continue
        return 0

    def keys(self) -> list[str]:
        """Keys of the adapters in the store (unverified)."""
        return sorted(k for k in os.listdir(self._adapters) if _KEY_RE.match(k))

    def show(self, key: str) -> AdapterMeta | None:
        """Metadata (with live hits and last use) of ``key`` without verifying its files."""
        path = self.path(key)
        try:
            return self._with_usage(self._read_meta(key, path))
        except FileNotFoundError:
            return None

    def ls(self) -> list[AdapterMeta]:
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

        Runs `gc` afterwards when limits are set (never evicting the adapter just published).
        """
        files = _check_files(files)
        text = validate_description(description, max_chars=None)
        key = self.key(text, fingerprint, seed)
        for _ in range(3):  # a concurrent winner may itself turn out corrupt: try again
            existing = self.get(key, record_hit=False)
            if existing is not None:
                return existing
            now = _now()
            meta = AdapterMeta(
                key=key,
                description=text,
                generator_kind=generator_kind,
                fingerprint=fingerprint,
                seed=seed,
                created=now,
                last_used=now,
                hits=0,
                files={n: FileInfo(_sha256(d), len(d)) for n, d in files.items()},
                size=sum(len(d) for d in files.values()),
            )
            if self._publish_folder(key, files, meta):
                # Fresh usage log: last used = now, no hits yet.
                os.close(os.open(self._usage / key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
                if self.max_adapters is not None or self.max_bytes is not None:
                    self.gc(keep=(key,), wait=False)
                return StoredAdapter(key, self.path(key), meta)
        raise StoreCorrupt(key, "concurrent publishes keep producing corrupt adapters")

    def _publish_folder(self, key: str, files: AdapterFiles, meta: AdapterMeta) -> bool:
        """Write, fsync and rename into place; False if another publisher got there first."""
        tmp = self._tmp / f"{key}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            for name, data in files.items():
                _write_durable(tmp / name, data)
            _write_durable(tmp / META_FILE, msgspec.json.encode(meta))
            _fsync_dir(tmp)
            try:
                os.rename(tmp, self._adapters / key)  # fails if the key exists (non-empty dir)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    return False
                raise
            _fsync_dir(self._adapters)
            return True
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

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
        with self.key_lock(key):
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
                shutil.rmtree(self._pins / key, ignore_errors=True)
        if dest is not None:
            shutil.rmtree(dest, ignore_errors=True)
        return dest is not None

    # -- pins ---------------------------------------------------------------------------------

    def pin(self, key: str, holder: int | None = None) -> None:
        """Mark ``key`` as possibly (re)loaded by process ``holder`` (default: this process)."""
        pid = os.getpid() if holder is None else int(holder)
        stat = _proc_stat(pid)
        pin = Pin(pid=pid, host=_HOST, start=stat[1] if stat else 0, created=_now())
        with self.key_lock(key):
            d = self._pins / key
            d.mkdir(exist_ok=True)
            tmp = d / f".{pid}@{_HOST}.{secrets.token_hex(4)}"
            tmp.write_bytes(msgspec.json.encode(pin))
            os.replace(tmp, d / f"{pid}@{_HOST}")

    def unpin(self, key: str, holder: int | None = None) -> None:
        """Drop the pin of process ``holder`` (default: this process) on ``key``, if any."""
        pid = os.getpid() if holder is None else int(holder)
        with self.key_lock(key):
            d = self._pins / key
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d / f"{pid}@{_HOST}")
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty

    def pins(self, key: str) -> list[Pin]:
        """Live pins of ``key`` (pins of dead processes on this host are left out)."""
        return [p for p in self._all_pins(key) if _pin_alive(p)]

    def _all_pins(self, key: str) -> list[Pin]:
        d = self._pins / _check_key(key)
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

    # -- eviction ----------------------------------------------------------------------------

    def gc(self, *, keep: tuple[str, ...] = (), wait: bool = True) -> GCReport:
        """Evict least recently used, unpinned adapters until the limits hold; clean up
        unfinished publishes, trash, old quarantine, dead pins and orphan usage logs.

        ``keep``: keys never evicted in this pass. ``wait=False`` returns at once (empty
        report) if another process is collecting already.
        """
        lock = self._gc_lock()
        try:
            lock.acquire(timeout=-1 if wait else 0)
        except Timeout:
            return GCReport()
        try:
            self._clean_aside()
            return self._evict(set(keep))
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
            # name: <key>.<host>.<pid>.<rand>; the owner's liveness decides on this host
            parts = entry.name.split(".")
            owner_dead = (
                len(parts) >= 4
                and ".".join(parts[1:-2]) == _HOST
                and parts[-2].isdigit()
                and not _pid_alive(int(parts[-2]))
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
        for name in os.listdir(self._pins):
            if not _KEY_RE.match(name):
                continue
            for pin in self._all_pins(name):
                if not _pin_alive(pin):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._pins / name / f"{pin.pid}@{pin.host}")
            try:  # under the key lock: pin() may be about to write into the folder
                with self.key_lock(name, timeout=0), contextlib.suppress(OSError):
                    (self._pins / name).rmdir()  # only if empty
            except TimeoutError:
                pass

    def _evict(self, keep: set[str]) -> GCReport:
        sizes: dict[str, int] = {}
        last_used: dict[str, int] = {}
        for key in self.keys():
            path = self._adapters / key
            try:
                sizes[key] = self._read_meta(key, path).size
            except FileNotFoundError:
                continue
            except StoreCorrupt:  # count what is on disk; gc may evict it like any other
                sizes[key] = sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
            last_used[key] = self._last_used_ns(key, path)
        report = GCReport(count=len(sizes), bytes=sum(sizes.values()))

        def over() -> bool:
            return (self.max_adapters is not None and report.count > self.max_adapters) or (
                self.max_bytes is not None and report.bytes > self.max_bytes
            )

        for key in sorted(sizes, key=lambda k: last_used[k]):  # least recently used first
            if not over():
                break
            if key in keep or self.pins(key):
                continue
            try:
                with self.key_lock(key, timeout=0):  # busy (being generated/pinned): skip
                    if self.pins(key):
                        continue
                    dest = self._move_away(key, self._trash, secrets.token_hex(4))
            except TimeoutError:
                continue
            if dest is None:
                continue
            shutil.rmtree(dest, ignore_errors=True)
            report.evicted.append(key)
            report.freed_bytes += sizes[key]
            report.count -= 1
            report.bytes -= sizes[key]
        report.over_limit = over()
        report.pinned = sum(1 for k in sizes if k not in report.evicted and self.pins(k))
        if report.evicted:
            logger.info("store gc: evicted %d adapters (%d bytes)", len(report.evicted),
                        report.freed_bytes)
        return report
