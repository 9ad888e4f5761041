"""Adapters lost: every adapter the server answered with, and whether it is still there.

Definition used by the run. An adapter is *answered* when a 200 response carries
``x-loragen-adapter: <key>; generator=<fingerprint>``. Right after that answer the ledger reads
the adapter's ``loragen_meta.json`` from the store and keeps the sha256 of each of its files
(``recorded``; an adapter whose metadata could not be read at that moment is ``unrecorded``).
At the end an answered adapter counts as

* ``in_store_verified``: its folder is in the store, passes `verify_folder`, and its files have
  the recorded sha256s;
* ``regenerated_identical``: it was gone (evicted, quarantined) and asking for its description
  again answered with the same key, and the store's new folder has the recorded sha256s;
* ``*_equivalent`` (in the store or regenerated): other bytes, but the same key and the same
  numbers up to float rounding (`same_numbers`: per tensor its L2 norm and sum within a relative
  1e-5, and 32 strided elements within 1e-6). The generator is not bit-deterministic across
  batch compositions (one description alone vs in a batch of several differs by ~2e-7 in
  float32), so a regenerated adapter is byte-identical only when its batch matched;
* lost: anything else -- in the store but corrupt or different (``in_store_corrupt``,
  ``in_store_different``), or asked again and answered by another key, with other files, or
  not at all (``regenerated_different``, ``regenerated_failed``).

Adapters that were gone and were not asked again (the run re-asks a sample of the soak's
evicted adapters: regenerating all would take as long as the soak) are counted as
``gone_not_rechecked``, neither kept nor lost.
"""
from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from benchmarks.faults.client import Answer, parse_adapter_header
from loragen_vllm.store_meta import verify_folder


@dataclass
class Entry:
    """One answered adapter."""

    key: str
    fingerprint: str
    description: str
    phase: str
    files: dict[str, str] | None  # file name -> sha256 when answered; None: unrecorded
    numbers: dict[str, list[float]] | None = None  # `summary` of its tensors when answered


WEIGHTS = "adapter_model.safetensors"


def summary(folder: Path) -> dict[str, list[float]] | None:
    """Per tensor of the adapter's safetensors: L2 norm, sum and 32 strided elements (float64);
    None if it cannot be read."""
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except Exception:  # missing, truncated, garbage header
        return None
    out = {}
    for name, t in tensors.items():
        flat = t.astype(np.float64).ravel()
        step = max(1, flat.size // 32)
        out[name] = [float(np.linalg.norm(flat)), float(flat.sum()), *map(float, flat[::step][:32])]
    return out


def same_numbers(a: dict[str, list[float]] | None, b: dict[str, list[float]] | None) -> bool:
    """Whether two `summary`s agree up to float rounding."""
    if a is None or b is None or a.keys() != b.keys():
        return False
    for name, x in a.items():
        y = b[name]
        if len(x) != len(y):
            return False
        scale = max(abs(x[0]), 1e-12)
        if abs(x[0] - y[0]) > 1e-5 * scale or abs(x[1] - y[1]) > 1e-5 * scale * 10:
            return False
        if any(abs(p - q) > 1e-6 for p, q in zip(x[2:], y[2:])):
            return False
    return True


class Ledger:
    """Every adapter the server answered with, by key (thread-safe)."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.entries: dict[str, Entry] = {}
        self.description_mismatch = 0  # answered key whose stored description is another one
        self.no_header = 0  # 200 for a description without the adapter header
        self._lock = threading.Lock()

    def _read_files(self, key: str) -> tuple[dict[str, str] | None, str | None]:
        try:
            meta = json.loads((self.store / "adapters" / key / "loragen_meta.json").read_text())
            return {n: f["sha256"] for n, f in meta["files"].items()}, meta.get("description")
        except (OSError, ValueError, KeyError, TypeError):
            return None, None

    def record(self, description: str, phase: str, a: Answer) -> None:
        """Note the adapter a 200 answer for ``description`` names."""
        if not a.ok:
            return
        parsed = parse_adapter_header(a.adapter)
        if parsed is None:
            with self._lock:
                self.no_header += 1
            return
        key, fp = parsed
        with self._lock:
            if key in self.entries and self.entries[key].files is not None:
                return
        files, stored_desc = self._read_files(key)
        numbers = summary(self.store / "adapters" / key) if files is not None else None
        with self._lock:
            if stored_desc is not None and stored_desc != description:
                self.description_mismatch += 1
            self.entries[key] = Entry(key, fp, description, phase, files if numbers is not None else None, numbers)

    def compare(self, key: str) -> str:
        """The store's adapter ``key`` now against the answered one: ``identical``, ``equivalent``
        (same numbers up to rounding), ``different``, ``absent`` or ``unrecorded``."""
        e = self.entries.get(key)
        if e is None or e.files is None:
            return "unrecorded"
        files, _ = self._read_files(key)
        if files is None:
            return "absent"
        if files == e.files:
            return "identical"
        return "equivalent" if same_numbers(summary(self.store / "adapters" / key), e.numbers) else "different"

    def check(self, ask: Callable[[str], Answer], sample_gone: int, seed: int = 0,
              always_phases: tuple[str, ...] = ()) -> dict:
        """Classify every entry (see the module docstring); re-ask every gone adapter of
        ``always_phases`` and a seeded random sample of ``sample_gone`` of the other gone ones."""
        counts: dict[str, int] = {k: 0 for k in ("in_store_verified", "in_store_equivalent", "in_store_corrupt",
                                                 "in_store_different", "regenerated_identical",
                                                 "regenerated_equivalent", "regenerated_different",
                                                 "regenerated_failed", "gone_not_rechecked", "unrecorded")}
        lost: list[dict] = []
        gone: list[Entry] = []
        for e in list(self.entries.values()):
            if e.files is None:
                counts["unrecorded"] += 1
                continue
            folder = self.store / "adapters" / e.key
            if not folder.exists():
                gone.append(e)
                continue
            try:
                meta = verify_folder(folder, e.key)
            except Exception as err:  # StoreCorrupt, or removed while read
                if not folder.exists():
                    gone.append(e)
                    continue
                counts["in_store_corrupt"] += 1
                lost.append({"key": e.key, "why": f"corrupt: {err}"[:200], "phase": e.phase})
                continue
            if {n: f.sha256 for n, f in meta.files.items()} == e.files:
                counts["in_store_verified"] += 1
            elif same_numbers(summary(folder), e.numbers):
                counts["in_store_equivalent"] += 1
            else:
                counts["in_store_different"] += 1
                lost.append({"key": e.key, "why": "stored files differ from the answered ones", "phase": e.phase})
        must = [e for e in gone if e.phase in always_phases]
        rest = [e for e in gone if e.phase not in always_phases]
        random.Random(seed).shuffle(rest)
        for e in must + rest[:sample_gone]:
            a = ask(e.description)
            parsed = parse_adapter_header(a.adapter) if a.ok else None
            same = self.compare(e.key) if parsed and parsed[0] == e.key else "other key"
            if not a.ok or parsed is None:
                counts["regenerated_failed"] += 1
                lost.append({"key": e.key, "why": f"asked again: {a.status} {a.message or ''}"[:200], "phase": e.phase})
            elif same in ("identical", "equivalent"):
                counts[f"regenerated_{same}"] += 1
            else:
                counts["regenerated_different"] += 1
                lost.append({"key": e.key, "why": f"asked again: key {parsed[0][:12]}, {same}", "phase": e.phase})
        counts["gone_not_rechecked"] = max(0, len(rest) - sample_gone)
        return {"answered": len(self.entries), **counts, "lost": len(lost), "lost_examples": lost[:20],
                "gone": len(gone), "rechecked": len(must) + min(sample_gone, len(rest)),
                "description_mismatch": self.description_mismatch, "no_header": self.no_header}


def verify_store(store: Path) -> dict:
    """Every adapter folder checked against its loragen_meta.json; unfinished publishes and
    quarantined folders listed."""
    ok, bad, partial = 0, [], []
    adir = store / "adapters"
    for d in sorted(adir.iterdir()) if adir.exists() else []:
        if not d.is_dir():
            continue
        if len(d.name) != 64:
            partial.append(d.name)
            continue
        try:
            verify_folder(d, d.name)
            ok += 1
        except Exception as e:  # StoreCorrupt or unreadable meta
            bad.append({"key": d.name, "why": f"{type(e).__name__}: {e}"[:300]})
    tmp = store / "tmp"
    partial += [f"tmp/{p.name}" for p in tmp.iterdir()] if tmp.exists() else []
    q = store / "quarantine"
    quarantined = sorted(p.name for p in q.iterdir()) if q.exists() else []
    return {"ok": ok, "corrupt": bad, "partial_dirs": partial, "quarantined": quarantined}
