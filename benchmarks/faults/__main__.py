"""python -m benchmarks.faults: fault and soak run against a real `loragen-vllm serve` on loopback.

Mixed load with injected faults (a client that disconnects mid-generation, a corrupted adapter
vLLM still remembers, kill -9 of the server, adapters corrupted on disk, a broken generator
checkpoint, a full disk), then a soak of distinct new descriptions with the server's memory and
table sizes sampled over time, then the generator's Ray actor killed with SIGKILL under load;
every adapter the server answered with is checked at the end.
Phases: `benchmarks.faults.run`; what "lost" means: `benchmarks.faults.ledger`; the results
(JSON, Markdown, PNG): `benchmarks.faults.report`. Every loop is bounded in count and time,
every wait has a deadline, the server is always stopped and the tmpfs unmounted.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
import traceback
from pathlib import Path

from benchmarks.faults import report
from benchmarks.faults.run import REPO, Run, run_all
from benchmarks.provenance import provenance


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--deadline-s", type=float, default=120.0, help="client deadline per request")
    ap.add_argument("--server-deadline-s", type=float, default=90.0, help="LORAGEN_GENERATE_TIMEOUT_S of the server")
    ap.add_argument("--phase-s", type=float, default=30.0, help="seconds of mixed load before the faults")
    ap.add_argument("--clients", type=int, default=3, help="clients of the mixed load")
    ap.add_argument("--push-out", type=int, default=40, help="new descriptions that push an adapter out of vLLM's CPU cache")
    ap.add_argument("--soak", type=int, default=10_000, help="distinct new descriptions of the soak")
    ap.add_argument("--soak-max-s", type=float, default=2100.0, help="time limit of the soak")
    ap.add_argument("--soak-clients", type=int, default=8)
    ap.add_argument("--soak-max-tokens", type=int, default=1)
    ap.add_argument("--soak-warmup", type=int, default=1000, help="soak descriptions before the memory baseline")
    ap.add_argument("--lost-sample", type=int, default=200, help="evicted soak adapters asked for again")
    ap.add_argument("--ray-phase-s", type=float, default=30.0, help="seconds of new descriptions around the actor kill")
    ap.add_argument("--store-max-adapters", type=int, default=200, help="LORAGEN_STORE_MAX_ADAPTERS of the server")
    ap.add_argument("--tmpfs-size", default="1g",
                    help="size of the store's tmpfs ('none': no tmpfs); ~264 pinned adapters of 1.86 MB must fit")
    ap.add_argument("--pin-lease-s", type=float, default=120.0, help="the server's LORAGEN_PIN_LEASE_S (its default)")
    ap.add_argument("--kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE of the server")
    ap.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/faults_cpu"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    errors: list[str] = []

    def on_error(r: Run, e: BaseException) -> None:
        traceback.print_exc()
        errors.append(f"{r.phase}: {e!r}"[:500])
        r.events.append((f"error in {r.phase}", r.now()))

    command = "python -m benchmarks.faults " + " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    prov = provenance(command)  # at the start: the date the run began, the tree it ran
    r = run_all(a, on_error)
    res = {**prov, "duration_s": round(time.time() - r.t0, 1), "deadline_s": a.deadline_s,
           "server_deadline_s": a.server_deadline_s, "server_env": r.server_env(), "args": vars(a),
           "events": r.events, "requests_total": r.stats.total, "requests_past_deadline": r.stats.past_deadline,
           "slowest_s": round(r.stats.slowest_s, 2), "requests_by_outcome": dict(r.stats.outcomes),
           "errors_by_kind": dict(r.stats.errors), "faults": r.faults,
           "memory": report.memory_growth(r.sampler.samples, a.soak_warmup), "error": "; ".join(errors) or None,
           "server_logs": str(r.logdir), "samples": r.sampler.samples}
    res["targets"] = report.targets(res, a.soak)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report.write_json(res, out)
    report.write_png(res, out)
    print(report.write_md(res, out))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
