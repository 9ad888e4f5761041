"""python -m benchmarks.serving [run options]     run the benchmark (see --help)
python -m benchmarks.serving plot RESULT.json    draw the plots of a result
python -m benchmarks.serving workload --sni-dir DIR   rebuild workload.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks.serving.workload import WORKLOAD_FILE
from generator.arg_types import count, number

PHASES = ("single", "evicted", "burst", "steady", "mixed")  # Bench.run_all's order


def _csv(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def _levels(s: str) -> list[int]:
    """Distinct client counts, each >= 1 (a repeated level would replace the first in the report)."""
    levels = [count(1)(v) for v in _csv(s)]
    if not levels or len(set(levels)) != len(levels):
        raise argparse.ArgumentTypeError(f"distinct integers >= 1, comma-separated, got {s!r}")
    return levels


def _phases(s: str) -> list[str]:
    names = _csv(s)
    unknown = sorted(set(names) - set(PHASES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown phase(s) {', '.join(unknown)}: choose from {', '.join(PHASES)}")
    return names


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serving",
        description="Serving latency of generated LoRA adapters against oracle adapters, through the "
        "OpenAI API of one vLLM server (base, oracle preloaded / first use / evicted, generated "
        "cold / warm / evicted, a burst of new descriptions, steady state, mixed Zipf stream).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("server")
    x = g.add_mutually_exclusive_group(required=True)
    x.add_argument("--start-server", action="store_true", help="start `loragen-vllm serve` for the run")
    x.add_argument("--server-url", help="benchmark a running server (e.g. http://127.0.0.1:8000); it must "
                   "have VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, --max-loras/--max-cpu-loras as given here and an "
                   "admin key (--admin-key)")
    g.add_argument("--admin-key", default=os.environ.get("LORAGEN_ADMIN_KEY") or None,
                   help="with --server-url: the server's admin key (sent as X-LoRAGen-Admin-Key; the oracle "
                   "rows load adapters through its admin routes; default: $LORAGEN_ADMIN_KEY). A started "
                   "server gets a fresh key of the run's")
    g.add_argument("--base-model", help="base model folder (default: generator.base_model.ensure_base_model())")
    g.add_argument("--base-name", help="served name of the base model (default: the first of /v1/models)")
    g.add_argument("--generator", help="generator checkpoint folder for the server")
    g.add_argument("--generator-device", help="torch device of the server's in-process generator "
                   "(LORAGEN_GENERATOR_DEVICE; the server's default is cpu), e.g. cuda")
    g.add_argument("--store", help="adapter store folder (default with --start-server: a fresh temporary one)")
    g.add_argument("--port", type=int, default=0, help="port for a started server (0: a free one)")
    g.add_argument("--max-loras", type=count(1), default=8, help="vLLM --max-loras (adapters in one batch)")
    g.add_argument("--max-cpu-loras", type=count(1), default=8, help="vLLM --max-cpu-loras (LRU cache of loaded adapters)")
    g.add_argument("--kv-cache-gib", type=int, default=None, help="VLLM_CPU_KVCACHE_SPACE for a CPU server")
    g.add_argument("--serve-arg", action="append", default=[],
                   help="extra option(s) for `loragen-vllm serve` (e.g. '--ray-address auto'), split on "
                   "spaces; repeatable")
    g.add_argument("--vllm-arg", action="append", default=[],
                   help="extra vLLM argument(s), passed after `--`, split on spaces; repeatable")
    g.add_argument("--start-timeout", type=number(0.0, 1e6, above=True), default=900.0)
    g.add_argument("--timeout", type=number(0.0, 1e6, above=True), default=600.0, help="per-request timeout, seconds")

    g = p.add_argument_group("adapters and inputs")
    g.add_argument("--oracle-library", help="folder of trained oracle adapters (PEFT folders); random ones "
                   "of the same shape fill in where it is missing or too small")
    g.add_argument("--workload", default=str(WORKLOAD_FILE), help="prompts and descriptions JSON")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--run-tag", help="suffix that makes this run's descriptions new (default: random)")

    g = p.add_argument_group("counts (defaults are small, for a 2-core CPU)")
    g.add_argument("--n-single", type=count(1), default=6, help="samples per single-request scenario")
    g.add_argument("--max-tokens", type=count(1), default=16, help="output tokens per request (single, evicted, burst)")
    g.add_argument("--warmup", type=count(0), default=2)
    g.add_argument("--burst-size", type=count(1), default=32, help="concurrent new descriptions in the burst")
    g.add_argument("--steady-adapters", type=count(1), default=8)
    g.add_argument("--steady-concurrency", type=count(1), default=16)
    g.add_argument("--steady-requests", type=count(1), default=32, help="requests per round and arm")
    g.add_argument("--steady-rounds", type=count(1), default=2)
    g.add_argument("--steady-max-tokens", type=count(1), default=32)
    g.add_argument("--mixed-concurrency", type=_levels, default=[1, 4, 16, 64])
    g.add_argument("--mixed-requests-per-client", type=count(1), default=2)
    g.add_argument("--mixed-min-requests", type=count(1), default=8)
    g.add_argument("--mixed-max-requests", type=count(1), default=128)
    g.add_argument("--mixed-pool", type=count(1), default=16, help="descriptions in the Zipf pool")
    g.add_argument("--mixed-new-share", type=number(0.0, 1.0), default=0.25)
    g.add_argument("--mixed-zipf-s", type=number(0.0, above=True), default=1.1)
    g.add_argument("--mixed-max-tokens", type=count(1), default=16)
    g.add_argument("--skip", type=_phases, default=[], help="phases to leave out: single,evicted,burst,steady,mixed")

    g = p.add_argument_group("output")
    g.add_argument("--machine", default="cpu", help="label in the results and the default file name")
    g.add_argument("--out", help="result JSON (default: benchmarks/results/serving_<machine>.json)")
    g.add_argument("--server-log", help="log of a started server (default: beside --out, .server.log)")
    g.add_argument("--note", action="append", default=[], help="free-text note for the results; repeatable")
    g.add_argument("--keep-scratch", action="store_true", help="keep the temporary oracle/store folder")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"]:
        p = argparse.ArgumentParser(prog="python -m benchmarks.serving plot")
        p.add_argument("result", nargs="+")
        for r in p.parse_args(argv[1:]).result:
            from benchmarks.serving.plot import plot_result

            for out in plot_result(Path(r)):
                print(f"wrote {out}")
        return 0
    if argv[:1] == ["report"]:
        p = argparse.ArgumentParser(prog="python -m benchmarks.serving report",
                                    description="Summary and targets of a result, recomputed from its phases "
                                                "(after the targets changed).")
        p.add_argument("result")
        p.add_argument("--write", action="store_true", help="write them back into the result (meta.recomputed)")
        p.add_argument("--server-log", type=Path, help="the run's server log: read the generator passes' timings "
                       "again from it (for a result whose parser missed them)")
        a = p.parse_args(argv[1:])
        from benchmarks.serving.run import recompute

        recompute(Path(a.result), write=a.write, server_log=a.server_log)
        return 0
    if argv[:1] == ["workload"]:
        p = argparse.ArgumentParser(prog="python -m benchmarks.serving workload")
        p.add_argument("--sni-dir", required=True)
        p.add_argument("--out", default=str(WORKLOAD_FILE))
        a = p.parse_args(argv[1:])
        from benchmarks.serving.workload import build_workload

        Path(a.out).write_text(json.dumps(build_workload(Path(a.sni_dir)), indent=1))
        print(f"wrote {a.out}")
        return 0
    if argv[:1] == ["run"]:
        argv = argv[1:]
    args = run_parser().parse_args(argv)
    if args.out is None:
        args.out = f"benchmarks/results/serving_{args.machine}.json"
    from benchmarks.serving.run import run

    out = run(args, argv)
    failed = json.loads(out.read_text())["meta"].get("failed_phase")
    if failed:
        print(f"error: phase {failed['phase']} failed ({failed['error']}); the phases before it are in {out}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
