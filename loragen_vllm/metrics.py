"""loragen's Prometheus metrics, served by vLLM's own ``/metrics``.

vLLM's OpenAI server mounts ``prometheus_client.make_asgi_app(registry=get_prometheus_registry())``
at ``/metrics`` (``vllm/entrypoints/serve/instrumentator/metrics.py``). With one API server (what
``loragen-vllm serve`` runs) that registry is prometheus_client's default ``REGISTRY``, so the
metrics below -- created in the default registry when this module is imported, i.e. in the API
server process, where the resolver plugin runs -- appear there next to vLLM's ``vllm:*``. With
several API servers (``--api-server-count``), vLLM sets ``PROMETHEUS_MULTIPROC_DIR`` and serves a
``MultiProcessCollector`` over every process's files; prometheus_client then backs these metrics
by files as well, and the gauges say how processes combine (``livesum``: summed over running
processes; ``livemax`` for the store's size, which every process sees alike).

What each metric means is in the README ("Metrics"). Names: ``loragen_*``. Label values are
small fixed sets (stages, outcomes, reasons), never descriptions or keys.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Seconds buckets from a store hit (ms) to a long generation queue (minutes).
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

STAGES = ("lookup", "queue", "lock", "generate", "publish", "total")
REJECT_REASONS = ("queue_full", "lock_timeout", "deadline", "disk_full", "generator", "invalid", "abandoned")

GENERATIONS = Counter(
    "loragen_generations",
    "Adapters this server generated (outcome=ok) or failed to generate (outcome=error).",
    ["outcome"],
)
GENERATION_SECONDS = Histogram(
    "loragen_generation_seconds",
    "Seconds a miss spent in each stage: lookup (store check), queue (waiting for a miss thread), "
    "lock (waiting for the key's store lock), generate (generator backend), publish (into the "
    "store), total (the request's resolution, end to end).",
    ["stage"],
    buckets=_BUCKETS,
)
STORE_LOOKUPS = Counter(
    "loragen_store_lookups",
    "Store lookups by result: hit (verified adapter served), miss (absent), corrupt (failed its "
    "sha256 check: quarantined and regenerated), changed (the files of an adapter vLLM remembers "
    "changed on disk since they were verified: the name is forgotten and resolves again).",
    ["result"],
)
IN_FLIGHT = Gauge(
    "loragen_generations_in_flight",
    "Distinct adapters being resolved through a miss right now (admitted: queued, waiting on "
    "a lock, or generating).",
    multiprocess_mode="livesum",
)
QUEUED = Gauge(
    "loragen_generations_queued",
    "Generation requests waiting for a generator pass in this process's micro-batcher.",
    multiprocess_mode="livesum",
)
REJECTS = Counter(
    "loragen_rejects",
    "Requests refused by reason: queue_full (LORAGEN_MAX_PENDING reached), lock_timeout (the "
    "key's store lock held elsewhere past the deadline), deadline (the request's deadline "
    "passed), disk_full (no space to publish), generator (the generator failed or is "
    "unreachable), invalid (not a usable description), abandoned (every caller gave up).",
    ["reason"],
)
STORE_ADAPTERS = Gauge(
    "loragen_store_adapters",
    "Adapters in the store (as of the last store gc, which runs after each publish).",
    multiprocess_mode="livemax",
)
STORE_BYTES = Gauge(
    "loragen_store_bytes",
    "Bytes of adapter files in the store (as of the last store gc).",
    multiprocess_mode="livemax",
)
NAMES_RESOLVED = Gauge(
    "loragen_names_resolved",
    "Model names (descriptions) vLLM currently remembers through the resolver (each pins its "
    "adapter).",
    multiprocess_mode="livesum",
)
RESOLUTIONS = Counter(
    "loragen_resolutions",
    "Names resolved by the resolver (a store hit, a shared generation or a new one).",
)

for _stage in STAGES:  # every series exists from the start (0), so rates work at once
    GENERATION_SECONDS.labels(_stage)
for _reason in REJECT_REASONS:
    REJECTS.labels(_reason)
for _result in ("hit", "miss", "corrupt"):
    STORE_LOOKUPS.labels(_result)
for _outcome in ("ok", "error"):
    GENERATIONS.labels(_outcome)


def reject(reason: str) -> None:
    """Count a refused request (``reason`` one of `REJECT_REASONS`)."""
    REJECTS.labels(reason if reason in REJECT_REASONS else "generator").inc()
