"""A new description's resolution in the resolver plugin, and what the batching window costs it.

A cold request waits in the resolver for: validation and the store lookup, the micro-batching
window (``LORAGEN_BATCH_WINDOW_MS``, 5 ms: a lone request waits it out in case others join),
the generator pass (encode, sample, decode, serialise) and publishing to the store. Since the
window's first description is encoded while the window waits (``InProcessBackend(...,
encode_early=True)``, `MicroBatcher`'s ``prepare``), part of the window is no longer idle.

This times ``LoRAGenResolver.resolve_lora`` for ``--n`` new descriptions one at a time (a pause
between them, so each opens its own window), the real in-process backend on ``--device`` with
the shipped generator and a real store in a fresh folder (``/dev/shm`` where it exists), with
early encoding on and off, alternating sample by sample. Per request: ``wait`` (from the call
to its pass starting), ``pass`` (the generator pass as the backend runs it), ``after`` (from
the pass's end to the call returning: publishing, thread hops) and ``total``. ``--level
backend`` times the backend alone (``InProcessBackend.generate``: no resolver, no store, no
vLLM needed: what runs on a GPU machine without vLLM).

    python -m benchmarks.resolve_latency                       # CPU
    python -m benchmarks.resolve_latency --device cuda --level backend --tag h100_backend

Writes benchmarks/results/resolve_latency_<tag>.{json,md} (tag: the device by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance  # noqa: E402
from loragen_vllm.backends import CheckpointInfo, InProcessBackend  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CHECKPOINT = ROOT / "generator" / "checkpoints" / "default"
PHASES = ("wait", "pass", "after", "total")
ARMS = {"encode_early": True, "encode_in_pass": False}


class Arm:
    """One resolver + backend + store, and the start/end of each generator pass it ran."""

    def __init__(self, checkpoint: Path, device: str, window_s: float, encode_early: bool,
                 store_dir: Path | None) -> None:
        """`store_dir` None: the backend alone (no resolver, no store)."""
        self.backend = InProcessBackend(checkpoint, device, batch_window_s=window_s, encode_early=encode_early)
        self.resolver = None
        if store_dir is not None:
            from loragen_vllm.plugin import LoRAGenResolver, PluginConfig  # imports vLLM
            from loragen_vllm.store import AdapterStore

            config = PluginConfig(generator=str(checkpoint), device=device, batch_window_s=window_s)
            self.resolver = LoRAGenResolver(config, store=AdapterStore(store_dir), backend=self.backend)
        self.passes: list[tuple[float, float]] = []
        run_pass = self.backend._batcher.run_pass

        def timed_pass(items: list[str], seed: int):
            t0 = time.monotonic()
            try:
                return run_pass(items, seed)
            finally:
                self.passes.append((t0, time.monotonic()))

        self.backend._batcher.run_pass = timed_pass

    async def resolve(self, description: str) -> dict[str, float]:
        """Milliseconds of each phase of one new description's resolution."""
        t0 = time.monotonic()
        if self.resolver is not None:
            await self.resolver.resolve_lora("base", description)
        else:
            await self.backend.generate(description)
        t1 = time.monotonic()
        start, end = self.passes[-1]
        return {"wait": (start - t0) * 1e3, "pass": (end - start) * 1e3, "after": (t1 - end) * 1e3,
                "total": (t1 - t0) * 1e3}


def summary(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for phase in PHASES:
        v = sorted(s[phase] for s in samples)
        out[phase] = {"p50": statistics.median(v), "p95": v[min(len(v) - 1, round(0.95 * (len(v) - 1)))],
                      "mean": statistics.fmean(v)}
    return out


async def run(args: argparse.Namespace, root: Path) -> dict[str, list[dict[str, float]]]:
    arms = {name: Arm(args.checkpoint, args.device, args.window_ms / 1e3, early,
                      root / name if args.level == "resolver" else None)
            for name, early in ARMS.items()}
    for name, arm in arms.items():  # load the generator, warm the encoder and the store
        for i in range(args.warmup):
            await arm.resolve(f"Warm-up description {i} for {name}: say hello.")
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    for i in range(args.n):
        for name, arm in (arms.items() if i % 2 == 0 else reversed(arms.items())):
            # new to both arms' encoders (they share the process's encoder and its cache)
            samples[name].append(await arm.resolve(f"Request {i} ({name}): classify the review as positive or negative."))
            await asyncio.sleep(args.pause_ms / 1e3)
    for arm in arms.values():
        arm.backend.close()
    return samples


def write_md(result: dict[str, Any], path: Path) -> None:
    p, s = result["provenance"], result["summary"]
    resolver = result.get("level", "resolver") == "resolver"
    what = "resolution in the resolver" if resolver else "adapter from the generator backend"
    where = f"store in {result['store']}" if resolver else "the backend alone (no resolver, no store)"
    lines = [
        f"# A new description's {what} ({result['device']})", "",
        f"`{p['command']}` at commit `{p['commit']}` on {p['machine']}, {p['date']}; generator "
        f"{result['generator']} on {result['device']}, batching window {result['window_ms']:g} ms, {result['n']} new "
        f"descriptions per arm, one at a time, arms alternating; {where}.", "",
        "Milliseconds, p50 / p95 (mean): *wait* = the call to its generator pass starting ("
        + ("validation, store lookup, " if resolver else "") + "the window; with early encoding also the "
        "encoder's run where it outlasts the window), *pass* = the generator pass, *after* = the pass's end to "
        "the call returning (" + ("publishing, thread hops" if resolver else "thread hops") + ").", "",
        "| arm | " + " | ".join(PHASES) + " |", "|---|" + "---|" * len(PHASES),
    ]
    for arm, phases in s.items():
        lines.append(f"| {arm} | " + " | ".join(
            f"{phases[ph]['p50']:.1f} / {phases[ph]['p95']:.1f} ({phases[ph]['mean']:.1f})" for ph in PHASES) + " |")
    early, late = s["encode_early"]["total"]["p50"], s["encode_in_pass"]["total"]["p50"]
    lines += ["", f"Early encoding takes {late - early:.1f} ms off the p50 total ({late:.1f} -> {early:.1f} ms)."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--level", choices=("resolver", "backend"), default="resolver",
                    help="time the resolver (store included) or the generator backend alone")
    ap.add_argument("--window-ms", type=float, default=5.0, help="batching window (serve's default: 5)")
    ap.add_argument("--n", type=int, default=40, help="new descriptions per arm")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pause-ms", type=float, default=30.0, help="pause after each request")
    ap.add_argument("--tag", help="results file tag (default: the device)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.n < 1 or args.window_ms < 0:
        raise SystemExit("error: --n must be >= 1 and --window-ms >= 0")
    if args.device == "cpu":
        import torch

        torch.set_num_threads(1)  # as `serve` runs the generator beside vLLM on a CPU
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="loragen-resolve-", dir=shm if shm.is_dir() else None))  # the stores
    try:
        samples = asyncio.run(run(args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    store = None if args.level == "backend" else "/dev/shm" if shm.is_dir() else "a temporary folder"
    result = {"provenance": provenance(), "device": args.device, "level": args.level, "window_ms": args.window_ms,
              "n": args.n,
              "generator": CheckpointInfo.read(args.checkpoint).fingerprint[:12],
              "store": store,
              "summary": {name: summary(v) for name, v in samples.items()}, "samples": samples}
    tag = args.tag or args.device
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"resolve_latency_{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    write_md(result, args.out / f"resolve_latency_{tag}.md")
    print((args.out / f"resolve_latency_{tag}.md").read_text())


if __name__ == "__main__":
    main()
