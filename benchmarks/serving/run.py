"""One benchmark run: set up oracles and the server, run the scenarios, write JSON and plots."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path

import openai

from benchmarks.serving import meta as meta_mod
from benchmarks.serving import server as server_mod
from benchmarks.serving.client import load_adapter, make_client
from benchmarks.serving.oracles import oracle_set
from benchmarks.serving.report import check_targets, ratios, summarize_phases
from benchmarks.serving.scenarios import Bench, BenchConfig, stop_on_sigint
from benchmarks.serving.server_timings import attach_server_timings
from benchmarks.serving.stats import summarize
from benchmarks.serving.workload import Workload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(args: argparse.Namespace, base_model: str, port: int, preloaded_name: str,
                  preloaded_path: str, store_dir: Path, admin_key: str) -> tuple[list[str], dict[str, str]]:
    """`loragen-vllm serve` with the preloaded oracle, vLLM's adapter slots set for the run and
    the admin routes open to `admin_key` (the oracle rows load adapters through them)."""
    cmd = server_mod.loragen_serve_prefix() + [
        "serve", "--base-model", base_model, "--store", str(store_dir), "--port", str(port),
    ]
    if args.generator:
        cmd += ["--generator", str(args.generator)]
    for extra in args.serve_arg:
        cmd += extra.split()
    cmd += ["--", "--max-loras", str(args.max_loras), "--max-cpu-loras", str(args.max_cpu_loras),
            "--lora-modules", f"{preloaded_name}={preloaded_path}"]
    for extra in args.vllm_arg:
        cmd += extra.split()
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "LORAGEN_ADMIN_KEY": admin_key}
    if args.generator_device:
        env["LORAGEN_GENERATOR_DEVICE"] = args.generator_device
    if args.kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    return cmd, env


async def _bench(args: argparse.Namespace, server: server_mod.Server, oracles: list, cfg: BenchConfig,
                 run_tag: str, admin_key: str | None, started: list[Bench], stop: asyncio.Event | None = None) -> None:
    """Run the scenarios; the Bench goes into `started` before they run, so that the phases it
    finished survive an interrupt. A SIGINT sets `stop` (default: a new event): the running phase
    is cancelled and no other starts."""
    stop = stop or asyncio.Event()
    stop_on_sigint(stop)
    models = server.served_models()  # the base model (`serve` lists no adapters)
    base_name = args.base_name or (models[0] if models else None)
    if base_name is None:
        raise RuntimeError("cannot tell the base model's served name; pass --base-name")
    preloaded, rest = oracles[0], oracles[1:]
    if not args.start_server:
        # An attached server: load "our" preloaded oracle before any timing (400: loaded already).
        async with make_client(server.api_url, args.timeout, admin_key) as c:
            try:
                await load_adapter(c, preloaded.name, preloaded.path)
            except openai.BadRequestError:
                pass
    async with make_client(server.api_url, args.timeout, admin_key) as client:
        bench = Bench(client, base_name, preloaded, rest, Workload.load(args.workload), cfg, run_tag)
        started.append(bench)
        await bench.run_all(stop)


def run(args: argparse.Namespace, argv: list[str]) -> Path:
    cfg = BenchConfig(
        n_single=args.n_single, max_tokens=args.max_tokens, warmup=args.warmup, burst_size=args.burst_size,
        steady_adapters=args.steady_adapters, steady_concurrency=args.steady_concurrency,
        steady_requests=args.steady_requests, steady_rounds=args.steady_rounds,
        steady_max_tokens=args.steady_max_tokens, mixed_concurrency=tuple(args.mixed_concurrency),
        mixed_requests_per_client=args.mixed_requests_per_client, mixed_min_requests=args.mixed_min_requests,
        mixed_max_requests=args.mixed_max_requests, mixed_pool=args.mixed_pool,
        mixed_new_share=args.mixed_new_share, mixed_zipf_s=args.mixed_zipf_s,
        mixed_max_tokens=args.mixed_max_tokens, max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
        seed=args.seed, skip=tuple(args.skip),
    )
    if cfg.steady_adapters > cfg.max_loras:
        raise SystemExit(f"--steady-adapters {cfg.steady_adapters} > --max-loras {cfg.max_loras}: "
                         "they could not be active in one batch")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    run_tag = args.run_tag or secrets.token_hex(3)
    meta = meta_mod.run_meta(args.machine, argv)
    meta["run_tag"] = run_tag
    meta["config"] = cfg.to_dict()
    meta["notes"] = list(args.note)

    scratch = Path(tempfile.mkdtemp(prefix="loragen-bench-"))
    server = None
    try:
        base_model = args.base_model
        if args.start_server and base_model is None:
            from generator.base_model import ensure_base_model

            base_model = str(ensure_base_model())
        oracles, oracle_info = oracle_set(
            Path(args.oracle_library) if args.oracle_library else None, cfg.oracles_needed(),
            scratch / "oracles", Path(args.generator) if args.generator else None, base_model, args.seed)
        meta["oracles"] = oracle_info
        if oracle_info["random_same_shape"]:
            meta["notes"].append(oracle_info["note"])

        if args.start_server:
            store_dir = Path(args.store) if args.store else scratch / "store"
            port = args.port or free_port()
            admin_key = secrets.token_urlsafe(24)  # this run's; never written to the results
            cmd, env = serve_command(args, base_model, port, oracles[0].name, oracles[0].path, store_dir, admin_key)
            log_path = Path(args.server_log) if args.server_log else out.with_suffix(".server.log")
            print(f"starting the server (log: {log_path})\n  {' '.join(cmd)}", flush=True)
            t = time.perf_counter()
            server = server_mod.start(cmd, env, port, log_path, timeout_s=args.start_timeout)
            # What the server saw: this benchmark's settings and the LORAGEN_* ones it inherited.
            inherited = {k: v for k, v in os.environ.items() if k.startswith("LORAGEN_") and k not in env}
            meta["server"] = {"started_by_benchmark": True, "command": cmd,
                              "env": {k: v for k, v in {**inherited, **env}.items() if k != "LORAGEN_ADMIN_KEY"},
                              "store": str(store_dir), "startup_s": time.perf_counter() - t,
                              "log": str(log_path)}
        else:
            admin_key = args.admin_key
            server = server_mod.attach(args.server_url)
            store_dir = Path(args.store) if args.store else None
            meta["server"] = {"started_by_benchmark": False, "url": server.url,
                              "store": str(store_dir) if store_dir else None}
        meta["vllm_version"] = server.vllm_version()
        meta["generator"] = generator_info(args.generator)

        t = time.perf_counter()
        started: list[Bench] = []
        stop = asyncio.Event()
        try:
            asyncio.run(_bench(args, server, oracles, cfg, run_tag, admin_key, started, stop))
        except KeyboardInterrupt:  # a second SIGINT, or one before the handler was in place
            if not started or not started[0].phases:
                raise
            stop.set()
        failed = started[0].failed_phases if started else []
        if stop.is_set():  # `timeout -s INT` at a GPU call's deadline, or a phase failed: keep what finished
            if not started or not started[0].phases:
                raise SystemExit(f"{'phase ' + failed[0]['phase'] + ' failed' if failed else 'interrupted'} before "
                                 f"any phase recorded a request: nothing written ({failed[0]['error'] if failed else ''})")
            if failed:
                meta["failed_phase"] = failed[0]
                print(f"phase {failed[0]['phase']} failed: writing the phases before it", flush=True)
            else:
                meta["interrupted"] = "stopped by SIGINT before every phase ran: the phases here are those that finished"
                print("interrupted: writing the phases that finished", flush=True)
        bench = started[0]
        meta["bench_wall_s"] = time.perf_counter() - t
        meta["setup_errors"] = bench.setup_errors
        meta["load_endpoint_rtt_s"] = summarize(bench.load_rtt)
        meta["load_average_end"] = os.getloadavg()

        phases = [{"name": p.name, "params": p.params, "wall_s": p.wall_s,
                   "records": [r.to_dict() for r in p.records]} for p in bench.phases]
        meta["server_timings"] = attach_server_timings(phases, server.log_text(), store_dir)
    finally:
        if server is not None:
            server.stop()
        if not args.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    result = build_result(meta, phases)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")
    print_summary(result)
    try:
        from benchmarks.serving.plot import plot_result

        for p in plot_result(out):
            print(f"wrote {p}")
    except ImportError:
        print("matplotlib is not installed: draw the plots later with `python -m benchmarks.serving plot`")
    return out


def build_result(meta: dict, phases: list[dict]) -> dict:
    summary = summarize_phases(phases)
    by_name: dict[str, list[dict]] = {}
    for p in phases:
        by_name.setdefault(p["name"], []).extend(p["records"])
    return {"meta": meta, "summary": summary, "ratios": ratios(summary),
            "targets": {"note": "the serving targets are for the H100; on other machines they are shown for reference",
                        "checks": check_targets(summary, by_name,
                                                (meta.get("load_endpoint_rtt_s") or {}).get("p50"))},
            "phases": phases}


def recompute(path: Path, write: bool = False, server_log: Path | None = None) -> dict:
    """A result's summary, ratios and targets made again from its phases and printed; with
    `server_log` (the run's server log), the generator passes' timings read again from it first
    (`reattach_pass_lines`); with `write`, stored back with when and by which commit
    (meta.recomputed)."""
    result = json.loads(path.read_text())
    reattached = None
    if server_log is not None:
        from benchmarks.serving.server_timings import reattach_pass_lines

        gen, env = result["meta"].get("generator") or {}, (result["meta"].get("server") or {}).get("env") or {}
        if not gen.get("fingerprint"):
            raise SystemExit(f"error: {path} names no generator fingerprint (meta.generator)")
        reattached = reattach_pass_lines(result["phases"], server_log.read_text(errors="replace"),
                                         gen["fingerprint"], int(env.get("LORAGEN_SEED", 0)))
        print(f"pass timings re-read from {server_log} for {reattached} request(s)")
    new = build_result(result["meta"], result["phases"])
    if write:
        new["meta"]["recomputed"] = {"commit": meta_mod.git_state()["commit"],
                                     "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if reattached is not None:
            new["meta"]["recomputed"]["pass_timings_from"] = {"server_log": server_log.name, "requests": reattached}
        path.write_text(json.dumps(new, indent=1, default=str))
        print(f"wrote {path}")
    print_summary(new)
    return new


def generator_info(ckpt: str | None) -> dict | None:
    if not ckpt:
        return None
    try:
        cfg = json.loads((Path(ckpt) / "config.json").read_text())
    except (OSError, ValueError):
        return {"path": str(ckpt)}
    return {"path": str(ckpt), "kind": cfg.get("kind"), "fingerprint": cfg.get("fingerprint"),
            "sampler": cfg.get("sampler")}


def print_summary(result: dict) -> None:
    sc = result["summary"]["scenarios"]
    print(f"\n{'scenario':<20} {'n':>4} {'err':>4} {'TTFT p50':>10} {'p95':>10} {'p99':>10} {'E2E p50':>10} {'tok/s':>8}")
    for name, s in sc.items():
        t, e = s["ttft"], s["e2e"]
        f = lambda v: f"{1e3 * v:9.1f}ms" if v is not None else f"{'-':>11}"  # noqa: E731
        tok = s["decode_tok_s"]["p50"]
        print(f"{name:<20} {s['n']:>4} {s['errors']:>4} {f(t['p50'])}{f(t['p95'])}{f(t['p99'])}{f(e['p50'])} "
              f"{tok if tok is None else round(tok, 1)!s:>8}")
    for arm, s in result["summary"].get("steady", {}).items():
        print(f"steady {arm:<13} output tok/s {s['output_tok_s']} (rounds {s['output_tok_s_rounds']})")
    for arm, levels in result["summary"].get("mixed", {}).items():
        for c, s in levels.items():
            t = s["ttft"]
            print(f"mixed {arm:<9} c={c:<3} TTFT p50 {t['p50']} p95 {t['p95']} tok/s {s.get('output_tok_s')} "
                  f"errors {s['errors']}")
    print("\ntargets:")
    for v in result["targets"]["checks"]:
        m = v["measured"]
        state = ("VOID" if v.get("void") else "n/a") if v["met"] is None else ("MET" if v["met"] else "MISSED")
        print(f"  [{state}] {v['target']}: measured {m if m is None else round(m, 3)} "
              f"(limit {v['limit']}, margin {v['margin_pct'] if v['margin_pct'] is None else round(v['margin_pct'], 1)}%)"
              f" — {v.get('void') or v.get('dominated_by', '')}")
