"""The run's results: JSON (everything), Markdown (what to read), PNG (RSS and tables over time).

`memory_growth` defines the soak's memory target: RSS of the server's process tree at the first
sample after ``warmup_n`` soak descriptions were answered, against the last sample of the soak.
"""
from __future__ import annotations

import json
from pathlib import Path


def memory_growth(samples: list[dict], warmup_n: int) -> dict:
    """RSS and table sizes after warm-up and at the end of the soak, and the growth in %."""
    soak = [s for s in samples if s.get("phase") == "soak" and "rss_mib" in s]
    if not soak:
        return {"note": "no soak samples"}
    warm = next((s for s in soak if s["soak_done"] >= warmup_n), None)
    end = soak[-1]
    keys = ("t", "soak_done", "rss_mib", "names_resolved", "models_listed", "store_adapters_dir", "store_adapters_gauge")
    out = {"warmup_descriptions": warmup_n, "end": {k: end.get(k) for k in keys},
           "rss_max_in_soak_mib": max(s["rss_mib"] for s in soak), "samples_in_soak": len(soak)}
    if warm is None or warm is end:
        out["note"] = f"fewer than {warmup_n} soak descriptions answered before the last sample: no growth computed"
        return out
    out["after_warmup"] = {k: warm.get(k) for k in keys}
    out["growth_pct"] = round(100 * (end["rss_mib"] - warm["rss_mib"]) / warm["rss_mib"], 2)
    after = [s["rss_mib"] for s in soak if s["soak_done"] >= warmup_n]
    out["rss_max_after_warmup_mib"] = max(after)
    out["max_growth_pct"] = round(100 * (max(after) - warm["rss_mib"]) / warm["rss_mib"], 2)
    return out


def targets(res: dict, goal_n: int) -> dict[str, str]:
    ad, final, mem = res["faults"].get("adapters", {}), res["faults"].get("store_final", {}), res["memory"]
    lost = ad.get("lost")
    corrupt = len(final.get("corrupt", [])) + len(final.get("partial_dirs", []))
    t1 = "not measured (the run stopped early)" if lost is None else (
        "met" if lost == 0 and corrupt == 0 else f"missed ({lost} lost, {corrupt} corrupt or partial in the store)")
    t2 = "met" if res["requests_past_deadline"] == 0 else f"missed ({res['requests_past_deadline']})"
    g = mem.get("growth_pct")
    done = res["faults"].get("soak", {}).get("answered", 0)
    failed = res["faults"].get("soak", {}).get("failed", 0)
    if g is None:
        t3 = "not measured"
    else:
        verdict = "met" if g < 10 else "missed"
        short = "" if done >= goal_n else f"; the run reached {done}, not {goal_n}"
        short += f"; {failed} soak requests failed" if failed else ""
        t3 = f"{verdict} over {done} descriptions answered ({g:+.2f} %){short}"
    return {"0 adapters lost or corrupt": t1, "0 requests past their deadline": t2,
            f"memory growth under 10% over {goal_n:,} distinct descriptions after warm-up": t3}


def write_json(res: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")


def write_md(res: dict, out: Path) -> str:
    f, mem, ad = res["faults"], res["memory"], res["faults"].get("adapters", {})
    lines = [f"# Fault and soak run (CPU) — {res['date']}", "",
             f"Command: `{res['command']}`  ", f"Commit: `{res['commit']}`  ", f"Machine: {res['machine']}  ",
             f"Duration: {res['duration_s']} s; client deadline {res['deadline_s']} s, server deadline "
             f"(LORAGEN_GENERATE_TIMEOUT_S) {res['server_deadline_s']} s; server env {res['server_env']}", "",
             "## Targets", *[f"- {k}: **{v}**" for k, v in res["targets"].items()], "",
             f"## Requests: {res['requests_total']} (past the client's deadline: {res['requests_past_deadline']}, "
             f"slowest {res['slowest_s']} s)", "",
             "| phase/kind:status | count |", "| --- | ---: |",
             *[f"| {k} | {v} |" for k, v in sorted(res["requests_by_outcome"].items())], "",
             "## Errors by kind", *([f"- {k}: {v}" for k, v in sorted(res["errors_by_kind"].items())] or ["- none"]), "",
             "## Adapters answered, kept, regenerated, lost",
             "(definition: `benchmarks/faults/ledger.py`)", "", "```json", json.dumps(ad, indent=1, default=str), "```", "",
             "## Soak: memory and table sizes", "", "```json", json.dumps({"soak": f.get("soak"), **mem}, indent=1), "```", "",
             "![RSS over time](faults_cpu.png)", "",
             "## Faults", "", "```json",
             json.dumps({k: v for k, v in f.items() if k not in ("adapters", "soak")}, indent=1, default=str), "```", "",
             "Phases (start, s): " + ", ".join(f"{n} {t}" for n, t in res["events"]), ""]
    if res.get("error"):
        lines += [f"**The run stopped early:** `{res['error']}`", ""]
    text = "\n".join(lines)
    out.with_suffix(".md").write_text(text)
    return text


def write_png(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [x for x in res["samples"] if "rss_mib" in x]
    if not s:
        return
    t = [x["t"] / 60 for x in s]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax1.plot(t, [x["rss_mib"] for x in s], ".-", ms=2, lw=1, label="server RSS (process tree)")
    ax1.set_ylabel("RSS, MiB")
    for ax in (ax1, ax2):
        for name, at in res["events"]:
            if not name.startswith("server"):
                ax.axvline(at / 60, color="grey", lw=0.6, ls=":")
    for name, at in res["events"]:
        if not name.startswith("server") and name not in ("end",):
            ax1.text(at / 60, ax1.get_ylim()[1], name, rotation=90, va="top", ha="right", fontsize=7, color="dimgrey")
    w = res["memory"].get("after_warmup")
    if w:
        ax1.axhline(w["rss_mib"] * 1.10, color="red", lw=0.8, ls="--", label="+10 % of RSS after soak warm-up")
    ax1.legend(loc="lower right", fontsize=8)
    for key, label in (("names_resolved", "names vLLM remembers"), ("models_listed", "/v1/models entries"),
                       ("store_adapters_dir", "adapters in the store")):
        ax2.plot(t, [x.get(key) if x.get(key) is not None else float("nan") for x in s], lw=1, label=label)
    ax2.set_ylabel("count")
    ax2.set_xlabel("minutes since start")
    ax3 = ax2.twinx()
    ax3.plot(t, [x.get("soak_done", 0) for x in s], color="black", lw=0.8, ls="--", label="soak descriptions answered")
    ax3.set_ylabel("soak descriptions")
    h1, l1 = ax2.get_legend_handles_labels()
    h3, l3 = ax3.get_legend_handles_labels()
    ax2.legend(h1 + h3, l1 + l3, loc="upper left", fontsize=8)
    fig.suptitle(f"loragen-vllm fault and soak run, CPU ({res['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
