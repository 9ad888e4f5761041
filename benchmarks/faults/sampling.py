"""What the run samples from the server over time: RSS of its process tree and its table sizes.

`rss_kib` sums VmRSS over a process and all its descendants (vLLM's API server, engine core
and workers). `Sampler` runs in a thread and records, every ``interval_s``: that RSS, the
loragen_* gauges and counters of ``/metrics``, the length of ``/v1/models`` (with
``--list-descriptions``: the descriptions vLLM remembers), the adapters in the store folder,
the phase and how many soak descriptions were answered so far.
"""
from __future__ import annotations

import os
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from benchmarks.serving.server import http_get_json

_METRIC = re.compile(r"^(loragen_[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$")


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants (from /proc), KiB; 0 if it is gone."""
    total, seen, todo = 0, set(), [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for t in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(k) for k in (t / "children").read_text().split())
        except (OSError, ValueError):
            pass
    return total


def loragen_metrics(url: str, timeout: float = 5.0) -> dict[str, float]:
    """The loragen_* samples of ``/metrics`` (histogram buckets left out), name{labels} -> value."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=timeout) as r:
            text = r.read().decode(errors="replace")
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m and not m.group(1).endswith(("_bucket", "_created")):
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def store_count(store: Path) -> int:
    """Adapter folders in the store (unverified)."""
    try:
        return sum(1 for n in os.listdir(store / "adapters") if len(n) == 64)
    except OSError:
        return -1


class Sampler:
    """A thread that samples the server every ``interval_s`` seconds until `stop`."""

    def __init__(self, store: Path, t0: float, interval_s: float,
                 server_pid: Callable[[], int | None], url: Callable[[], str | None],
                 phase: Callable[[], str], soak_done: Callable[[], int]) -> None:
        self.samples: list[dict] = []
        self._store, self._t0, self._interval = store, t0, interval_s
        self._pid, self._url, self._phase, self._soak_done = server_pid, url, phase, soak_done
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faults-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def sample(self) -> dict | None:
        """One sample now (None when no server runs)."""
        pid, url = self._pid(), self._url()
        if pid is None or url is None:
            return None
        models = http_get_json(url + "/v1/models")
        m = loragen_metrics(url)
        s = {"t": round(time.time() - self._t0, 1), "phase": self._phase(), "soak_done": self._soak_done(),
             "rss_mib": round(rss_kib(pid) / 1024, 1),
             "models_listed": len(models.get("data", [])) if isinstance(models, dict) else None,
             "store_adapters_dir": store_count(self._store),
             "names_resolved": m.get("loragen_names_resolved"),
             "store_adapters_gauge": m.get("loragen_store_adapters"),
             "store_bytes_gauge": m.get("loragen_store_bytes"),
             "in_flight": m.get("loragen_generations_in_flight"),
             "queued": m.get("loragen_generations_queued"),
             "generations_ok": m.get('loragen_generations_total{outcome="ok"}'),
             "rejects": {k: v for k, v in m.items() if k.startswith("loragen_rejects_total")}}
        self.samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sample()
            except Exception as e:  # a sample is never worth the run
                self.samples.append({"t": round(time.time() - self._t0, 1), "error": repr(e)[:200]})
