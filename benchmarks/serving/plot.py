"""Plots from a result JSON (matplotlib, optional: the benchmark runs without it).

`python -m benchmarks.serving plot RESULT.json` writes, beside the JSON:
  <stem>_ttft.png   TTFT per scenario (p50 bars, p95 whiskers) and, where the server reported
                    it, the generation breakdown of the cold and burst scenarios;
  <stem>_mixed.png  the mixed stream: TTFT p50/p95 and output tokens/s against concurrency,
                    generated arm vs oracle arm.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.serving.report import PARTS, SINGLE


def plot_result(result_path: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result_path = Path(result_path)
    res = json.loads(result_path.read_text())
    meta, summ = res["meta"], res["summary"]
    title = f"{meta.get('machine')} · {meta.get('device', '')[:60]} · vLLM {meta.get('vllm_version')}"
    out: list[Path] = []

    # -- TTFT per scenario -----------------------------------------------------------------
    sc = summ["scenarios"]
    names = [n for n in SINGLE if n in sc and sc[n]["ttft"]["p50"] is not None]
    bd_names = [n for n in ("generated_cold", "generated_burst") if sc.get(n, {}).get("breakdown")]
    fig, axes = plt.subplots(1, 2 if bd_names else 1, figsize=(13 if bd_names else 9, 4.8),
                             gridspec_kw={"width_ratios": [3, 1]} if bd_names else None, squeeze=False)
    ax = axes[0][0]
    p50 = [1e3 * sc[n]["ttft"]["p50"] for n in names]
    p95 = [1e3 * sc[n]["ttft"]["p95"] for n in names]
    colors = ["#888888" if n == "base" else "#4C72B0" if n.startswith("oracle") else "#DD8452" for n in names]
    ax.bar(range(len(names)), p50, color=colors, label="p50")
    ax.scatter(range(len(names)), p95, marker="_", s=400, color="black", zorder=3, label="p95")
    for i, (a, b) in enumerate(zip(p50, p95)):  # p50 value above the p95 mark
        ax.text(i, max(a, b) * 1.04, f"p50 {a:.0f}" if a >= 10 else f"p50 {a:.1f}", ha="center", va="bottom",
                fontsize=7)
    ax.set_xticks(range(len(names)), [n.replace("_", "\n", 1) for n in names], fontsize=8)
    ax.set_ylabel("time to first token (ms)")
    if p50 and max(p95) / max(min(p50), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_title(f"TTFT per scenario (n per bar: {min(sc[n]['ttft']['n'] for n in names) if names else 0}+)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.margins(y=0.1)
    if bd_names:
        ax = axes[0][1]
        parts = [k for k in PARTS if any(k in sc[n]["breakdown"] for n in bd_names)]
        bottom = [0.0] * len(bd_names)
        for k in parts:
            vals = [1e3 * (sc[n]["breakdown"].get(k, {}).get("mean") or 0.0) for n in bd_names]
            ax.bar(range(len(bd_names)), vals, bottom=bottom, label=k)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(bd_names)), [n.replace("generated_", "") for n in bd_names])
        ax.set_ylabel("mean ms")
        ax.set_title("generated: where the time goes", fontsize=10)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    p = result_path.with_name(result_path.stem + "_ttft.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    out.append(p)

    # -- mixed stream ----------------------------------------------------------------------
    mx = summ.get("mixed", {})
    if mx:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
        style = {"generated": "#DD8452", "oracle": "#4C72B0"}
        for arm, levels in mx.items():
            cs = sorted(levels, key=int)
            x = [int(c) for c in cs]
            for q, ls in (("p50", "-"), ("p95", "--")):
                y = [1e3 * (levels[c]["ttft"][q] or float("nan")) for c in cs]
                a1.plot(x, y, ls, marker="o", color=style.get(arm), label=f"{arm} TTFT {q}")
            e = [1e3 * (levels[c]["e2e"]["p50"] or float("nan")) for c in cs]
            a1.plot(x, e, ":", marker="s", color=style.get(arm), alpha=0.6, label=f"{arm} E2E p50")
            a2.plot(x, [levels[c].get("output_tok_s") or float("nan") for c in cs], marker="o",
                    color=style.get(arm), label=arm)
        any_level = next(iter(next(iter(mx.values())).values()))["params"]
        all_c = sorted({int(c) for levels in mx.values() for c in levels})
        for a in (a1, a2):
            a.set_xscale("log", base=2)
            a.set_xticks(all_c, [str(c) for c in all_c])
            a.set_xlabel("concurrent clients")
            a.legend(fontsize=8)
        a1.set_yscale("log")
        a1.set_ylabel("latency (ms)")
        a1.set_title(f"mixed stream: Zipf s={any_level.get('zipf_s')}, pool {any_level.get('pool')}, "
                     f"{100 * any_level.get('new_share', 0):.0f}% new", fontsize=10)
        a2.set_ylabel("output tokens / s")
        a2.set_title("throughput", fontsize=10)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        p = result_path.with_name(result_path.stem + "_mixed.png")
        fig.savefig(p, dpi=120)
        plt.close(fig)
        out.append(p)
    return out
