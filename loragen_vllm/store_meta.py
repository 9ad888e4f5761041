"""``loragen_meta.json``: what the store records beside each adapter, and checking a folder by it.

Every stored adapter folder holds its PEFT files plus this metadata: the key, what the adapter
was generated from (description, generator kind and fingerprint, seed), when it was made, and
each file's size and sha256. `verify_folder` checks a folder against it before the store serves
the adapter; any mismatch is `StoreCorrupt` (the store quarantines the folder and regenerates).

`folder_state` is what the file system says of a folder (inode, size, times of it and of each
file): taken before a folder is verified, it tells later, for the cost of a few ``stat`` calls,
whether anything was written, replaced, added or removed since. A changed ctime cannot be undone
from user space, so an unchanged state means no write reached the files since they were checked
(only corruption below the file system, which no stat sees, escapes it).
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime
from pathlib import Path

import msgspec

from loragen_vllm.adapter_files import AdapterFiles
from loragen_vllm.errors import StoreCorrupt

META_FILE = "loragen_meta.json"


class FileInfo(msgspec.Struct, frozen=True):
    """Integrity record of one adapter file."""

    sha256: str
    size: int


class StoredAdapterMeta(msgspec.Struct, frozen=True, kw_only=True):
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


FolderState = tuple[tuple[str, int, int, int, int], ...]  # (name, inode, size, mtime_ns, ctime_ns)


def folder_state(path: Path) -> FolderState:
    """The stat state of folder ``path`` (first, named ``"."``) and of its entries (sorted by
    name); FileNotFoundError if the folder is gone."""
    st = os.stat(path)
    with os.scandir(path) as entries:
        files = sorted(
            (e.name, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)
            for e in entries
            for s in (e.stat(follow_symlinks=False),)
        )
    return ((".", st.st_ino, 0, st.st_mtime_ns, st.st_ctime_ns), *files)


def file_infos(files: AdapterFiles) -> dict[str, FileInfo]:
    """The integrity record of each file."""
    return {name: FileInfo(hashlib.sha256(data).hexdigest(), len(data)) for name, data in files.items()}


def read_meta(path: Path, key: str) -> StoredAdapterMeta:
    """The metadata in folder ``path`` of adapter ``key``, files unchecked.

    FileNotFoundError if the folder is gone; `StoreCorrupt` if the metadata is missing,
    cannot be read (permissions, a folder in its place, an I/O error), is malformed or is of
    another key.
    """
    try:
        raw = (path / META_FILE).read_bytes()
    except FileNotFoundError:
        if not path.exists():
            raise
        raise StoreCorrupt(key, f"{META_FILE} is missing") from None
    except OSError as e:
        raise StoreCorrupt(key, f"{META_FILE} cannot be read ({e.strerror or e})") from None
    try:
        meta = msgspec.json.decode(raw, type=StoredAdapterMeta)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise StoreCorrupt(key, f"{META_FILE} is unreadable ({e})") from None
    if meta.key != key:
        raise StoreCorrupt(key, f"{META_FILE} belongs to key {meta.key[:12]}")
    return meta


def verify_folder(path: Path, key: str) -> StoredAdapterMeta:
    """The metadata of adapter ``key`` in ``path`` after checking the size and sha256 of every
    file against it (and that no file is missing or extra); raises `StoreCorrupt` (also for a
    file that cannot be read), FileNotFoundError if the folder or a file went away meanwhile."""
    meta = read_meta(path, key)
    try:
        present = set(os.listdir(path)) - {META_FILE}
    except FileNotFoundError:
        raise
    except OSError as e:
        raise StoreCorrupt(key, f"its folder cannot be listed ({e.strerror or e})") from None
    if present != set(meta.files):
        missing = sorted(set(meta.files) - present)
        extra = sorted(present - set(meta.files))
        raise StoreCorrupt(key, f"files missing {missing}, unexpected {extra}")
    for name, info in meta.files.items():
        try:
            data = (path / name).read_bytes()
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StoreCorrupt(key, f"{name} cannot be read ({e.strerror or e})") from None
        if len(data) != info.size:
            raise StoreCorrupt(key, f"{name} has {len(data)} bytes, expected {info.size}")
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise StoreCorrupt(key, f"{name} fails its sha256 check")
    return meta
