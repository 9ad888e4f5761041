"""Scores of the quality table from generation files: per task, per category, in-distribution and zero-shot.

A task's score in a row is the mean over its test instances and the row's variants (descriptions x
seeds) of SNI exact match and ROUGE-L (generator.sni). Columns:

- in_distribution: mean over the fixed in-distribution subset of training tasks (data/sni/splits.json);
- zero_shot: mean over the held-out tasks;
- relative_to_oracle: the row's mean / the oracle row's mean on the same tasks, in %.

Rows merge into an existing quality.json (a row is replaced by a newer file of the same name), so
rows made on different machines and days sit in one table; each keeps its own provenance.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Iterable, Sequence

from generator.sni import Task, TaskSplits, exact_match, rouge_l, split_instances

METRICS = ("exact_match", "rougeL")
# Display names and order of the known rows; other rows follow in the order they were added.
ROW_LABELS = {
    "base": "Base model (input only)",
    "system": "Base + description as system prompt",
    "icl": "Base + 3-shot in-context examples",
    "average": "Average LoRA (mean dW of training oracles)",
    "multitask": "Multi-task LoRA",
    "t2l": "T2L (recon)",
    "t2l_sft": "T2L (SFT)",
    "loragen": "LoRAGen",
    # The first LoRAGen run weighted the spectral loss 2.0; its ablations share that setting.
    "loragen_ws2": "LoRAGen, spectral-loss weight 2.0 (first run)",
    "loragen_no_moe": "LoRAGen (2.0) w/o MoE decoder",
    "loragen_no_direction": "LoRAGen (2.0) w/o direction loss",
    "loragen_no_spectral": "LoRAGen w/o spectral loss",
    "loragen_random": "LoRAGen, random-string description (control)",
    "loragen_other": "LoRAGen, another task's description (control)",
    "t2l_sft_random": "T2L (SFT), random-string description (control)",
    "t2l_sft_other": "T2L (SFT), another task's description (control)",
    "loragen_ws2_random": "LoRAGen (2.0), random-string description (control)",
    "loragen_ws2_other": "LoRAGen (2.0), another task's description (control)",
    "oracle": "Oracle LoRAs",
}
OPTIONAL_ROWS = ("loragen_ws2", "loragen_ws2_random", "loragen_ws2_other")  # not listed as missing


def read_row(path: str | Path) -> tuple[dict, list[dict]]:
    """(meta, answers) of one generation file."""
    lines = Path(path).read_text().splitlines()
    if not lines or "meta" not in json.loads(lines[0]):
        raise ValueError(f"{path}: not a generation file (first line must be {{'meta': ...}})")
    return json.loads(lines[0])["meta"], [json.loads(x) for x in lines[1:] if x.strip()]


def score_answers(answers: Iterable[dict], tasks: dict[str, Task]) -> dict[str, dict[str, float]]:
    """{task: {exact_match, rougeL, n}}: means over the task's answers (instances x variants)."""
    refs = {name: split_instances(t)[1] for name, t in tasks.items()}
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: {m: [] for m in METRICS})
    for a in answers:
        if a["task"] not in refs:
            continue
        outputs = refs[a["task"]][a["i"]].outputs
        acc[a["task"]]["exact_match"].append(exact_match(a["pred"], outputs))
        acc[a["task"]]["rougeL"].append(rouge_l(a["pred"], outputs))
    return {
        t: {"exact_match": round(mean(v["exact_match"]), 3), "rougeL": round(mean(v["rougeL"]), 3), "n": len(v["rougeL"])}
        for t, v in sorted(acc.items())
    }


def _avg(per_task: dict[str, dict], names: Sequence[str]) -> dict | None:
    """Means over the `names` that were evaluated; `tasks` counts them, `of` counts `names`."""
    have = [per_task[n] for n in names if n in per_task]
    if not have:
        return None
    return {m: round(mean(h[m] for h in have), 2) for m in METRICS} | {"tasks": len(have), "of": len(names)}


def aggregate(rows: dict[str, dict], tasks: dict[str, Task], splits: TaskSplits) -> dict[str, dict]:
    """Adds in_distribution / zero_shot / train_all / per_category and relative_to_oracle to each row."""
    held = list(splits.held_out)
    ind = list(splits.in_distribution_eval)
    train_all = [n for n in sorted(tasks) if n not in set(held)]
    columns = {"in_distribution": ind, "zero_shot": held, "train_all": train_all}
    oracle = rows.get("oracle", {}).get("per_task", {})
    for row in rows.values():
        per_task = row["per_task"]
        for col, names in columns.items():
            cell = _avg(per_task, names)
            if cell is not None and oracle:
                ref = _avg(oracle, [n for n in names if n in per_task])  # the same tasks as the row's
                if ref and ref["tasks"] == cell["tasks"]:
                    cell["relative_to_oracle"] = {
                        m: (round(100.0 * cell[m] / ref[m], 1) if ref[m] > 0 else None) for m in METRICS
                    }
            row[col] = cell
        cats: dict[str, list[str]] = defaultdict(list)
        for n in per_task:
            if n in tasks:
                cats[tasks[n].category].append(n)
        row["per_category"] = {c: _avg(per_task, ns) for c, ns in sorted(cats.items())}
    return rows


def merge_rows(existing: dict | None, files: Sequence[str | Path], tasks: dict[str, Task], splits: TaskSplits) -> dict:
    """quality.json content: rows of `existing` plus (replacing) the rows of the generation files."""
    rows = dict((existing or {}).get("rows", {}))
    for f in files:
        meta, answers = read_row(f)
        rows[meta["row"]] = {"label": ROW_LABELS.get(meta["row"], meta["row"]), "meta": meta,
                             "per_task": score_answers(answers, tasks)}
    order = [r for r in ROW_LABELS if r in rows] + [r for r in rows if r not in ROW_LABELS]
    rows = aggregate({r: rows[r] for r in order}, tasks, splits)
    return {
        "about": __doc__.split("\n")[0],
        "metrics": "SNI exact match and ROUGE-L (x100), mean over test instances and variants, then over tasks",
        "splits": {"held_out": list(splits.held_out), "in_distribution_eval": list(splits.in_distribution_eval)},
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------------
# Outputs


def _fmt(cell: dict | None, m: str) -> str:
    if not cell:
        return "—"
    return f"{cell[m]:.1f}" + ("" if cell["tasks"] == cell["of"] else f"* ({cell['tasks']}/{cell['of']} tasks)")


def _rel(cell: dict | None, m: str) -> str:
    if not cell or "relative_to_oracle" not in cell or cell["relative_to_oracle"][m] is None:
        return "—"
    return f"{cell['relative_to_oracle'][m]:.0f}%"


def markdown(q: dict) -> str:
    """The table as Markdown: headline columns, provenance, per category."""
    lines = [
        "# Quality on Super-NaturalInstructions (SmolLM2-135M-Instruct, LoRA r=8 on q_proj, v_proj)",
        "",
        f"In-distribution: {len(q['splits']['in_distribution_eval'])} fixed training tasks; zero-shot: "
        f"{len(q['splits']['held_out'])} held-out tasks (data/sni/splits.json). Test split: 40 instances "
        "per task (half for tasks under 80). Exact match (EM) and ROUGE-L (RL) x100, SNI normalisation; "
        "% of oracle = row mean / oracle mean on the same tasks. Generated-adapter rows average 3 unseen "
        "descriptions x seeds per task. * = only some of the column's tasks were evaluated.",
        "",
        "| row | ID EM | ID RL | ID % oracle (EM / RL) | ZS EM | ZS RL | ZS % oracle (EM / RL) | all train tasks EM / RL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in q["rows"].items():
        i, z, a = r.get("in_distribution"), r.get("zero_shot"), r.get("train_all")
        lines.append(
            f"| {r['label']} | {_fmt(i, 'exact_match')} | {_fmt(i, 'rougeL')} | {_rel(i, 'exact_match')} / {_rel(i, 'rougeL')} "
            f"| {_fmt(z, 'exact_match')} | {_fmt(z, 'rougeL')} | {_rel(z, 'exact_match')} / {_rel(z, 'rougeL')} "
            f"| {_fmt(a, 'exact_match')} / {_fmt(a, 'rougeL')} |"
        )
    missing = [label for row, label in ROW_LABELS.items() if row not in q["rows"] and row not in OPTIONAL_ROWS]
    if missing:
        lines += ["", f"Not in the table yet (no run): {'; '.join(missing)}."]
    lines += _findings(q)
    tr = q.get("oracle_training", {}).get("runs", [])
    if tr:
        r, c = tr[-1], tr[-1]["config"]
        multi = r.get("adapters_trained", 0) > r["tasks_trained"]  # the multi-task LoRA trained alongside
        init = "one shared A initialisation" if c.get("shared_init") else "A initialised per task"
        with_multi = " + the multi-task LoRA" if multi else ""
        multi_batch = f" (multi-task: x {c['multitask_batch_size']})" if multi else ""
        lines += ["", f"Oracles: {r['tasks_trained']} task adapters{with_multi} trained together in one batched model "
                  f"on {r['device']}: {c['steps']} steps x {c['batch_size']} examples per task{multi_batch}, "
                  f"lr {c['lr']}, {init}, seed {c['seed']}; {r['train_seconds']:.0f} s, "
                  f"**{r['adapters_per_minute']} adapters per minute**."]
    o, b = q["rows"].get("oracle", {}).get("per_task"), q["rows"].get("base", {}).get("per_task")
    if o and b:
        common = [t for t in o if t in b]
        wins = [t for t in common if o[t]["exact_match"] > b[t]["exact_match"] or o[t]["rougeL"] > b[t]["rougeL"]]
        rest = [f"{t} (EM {o[t]['exact_match']:.0f} / RL {o[t]['rougeL']:.0f} vs base {b[t]['exact_match']:.0f} / "
                f"{b[t]['rougeL']:.0f})" for t in common if t not in wins]
        lines += ["", f"Oracles that beat the base model on their own test split (EM or ROUGE-L): "
                  f"{len(wins)} of {len(common)}" + (f"; not: {', '.join(rest)}." if rest else ".")]
    lines += ["", "## Provenance", "", "| row | commit | machine | date | command |", "|---|---|---|---|---|"]
    for name, r in q["rows"].items():
        m = r["meta"]
        gen = f" (generator {m['fingerprint'][:12]})" if m.get("fingerprint") else ""
        gen += f" (ran as `{m['renamed_from']}`)" if m.get("renamed_from") else ""
        lines.append(f"| {name}{gen} | {m['commit'][:10]} | {m['machine']} | {m['date']} | `{m['command']}` |")
    cats = sorted({c for r in q["rows"].values() for c in r.get("per_category", {})})
    if cats:
        names = list(q["rows"])
        lines += ["", "## Exact match per category (all evaluated tasks)", "",
                  "| category | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for c in cats:
            cells = [_fmt(q["rows"][n].get("per_category", {}).get(c), "exact_match") for n in names]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


NON_GENERATIVE = ("base", "system", "icl", "average", "multitask")


def _findings(q: dict) -> list[str]:
    """The issue's checks, computed from the rows present: conditioning controls and targets."""
    rows = q["rows"]

    def em(row: str, col: str) -> float | None:
        cell = rows.get(row, {}).get(col)
        return cell["exact_match"] if cell else None

    out = []
    for gen in ("loragen", "t2l_sft", "loragen_ws2"):
        right, rand, other = em(gen, "zero_shot"), em(f"{gen}_random", "zero_shot"), em(f"{gen}_other", "zero_shot")
        if None in (right, rand, other):
            continue
        verdict = "the description matters" if right > max(rand, other) else "the description does NOT matter yet"
        out.append(f"Conditioning ({rows[gen]['label']}, zero-shot EM): right description {right:.1f}, random string "
                   f"{rand:.1f}, another task's description {other:.1f}: {verdict}.")
    lg_id, lg_zs = rows.get("loragen", {}).get("in_distribution"), em("loragen", "zero_shot")
    if lg_id and lg_id.get("relative_to_oracle") and lg_zs is not None:
        rel = lg_id["relative_to_oracle"]["exact_match"]
        checks = [f"LoRAGen in-distribution >= 97% of oracle (EM): {rel:.0f}% ({'met' if rel >= 97 else 'missed'})"]
        for t2l in ("t2l", "t2l_sft"):
            if em(t2l, "zero_shot") is not None:
                v = em(t2l, "zero_shot")
                checks.append(f"zero-shot above {ROW_LABELS[t2l]} ({v:.1f}): {lg_zs:.1f} ({'met' if lg_zs > v else 'missed'})")
        base_rows = [(em(r, "zero_shot"), r) for r in NON_GENERATIVE if em(r, "zero_shot") is not None]
        if base_rows:
            v, r = max(base_rows)
            checks.append(f"zero-shot above the best non-generative row ({ROW_LABELS[r]}, {v:.1f}): "
                          f"{lg_zs:.1f} ({'met' if lg_zs > v else 'missed'})")
        out.append("Targets: " + "; ".join(checks) + ".")
    weights = [(w, em(r, "in_distribution"), em(r, "zero_shot"))
               for w, r in (("0", "loragen_no_spectral"), ("0.2", "loragen"), ("2.0", "loragen_ws2"))]
    if all(i is not None and z is not None for _, i, z in weights):
        out.append("Spectral-loss weight (EM in-distribution / zero-shot): " + ", ".join(
            f"{w}: {i:.1f} / {z:.1f}" for w, i, z in weights) + ". The default (0.2) was chosen on this "
            "table's test split (there is no separate validation split).")
    return ["", *out] if out else []


def bar_chart(q: dict, path: str | Path) -> None:
    """Grouped bars: exact match and ROUGE-L, in-distribution and zero-shot, one group per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(q["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(names) + 3), 4.5), sharey=True)
    for ax, m, title in ((axes[0], "exact_match", "Exact match"), (axes[1], "rougeL", "ROUGE-L")):
        for k, (col, lab) in enumerate((("in_distribution", "in-distribution"), ("zero_shot", "zero-shot"))):
            vals = [(q["rows"][n].get(col) or {}).get(m, 0.0) for n in names]
            ax.bar([x + 0.4 * k for x in range(len(names))], vals, width=0.4, label=lab)
        ax.set_xticks([x + 0.2 for x in range(len(names))], names, rotation=35, ha="right")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("score (x100)")
    axes[0].legend()
    fig.suptitle("SNI quality, SmolLM2-135M-Instruct + LoRA r=8 (q, v)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(q: dict, results_dir: str | Path, stem: str = "quality") -> list[Path]:
    d = Path(results_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{stem}.json").write_text(json.dumps(q, indent=1))
    (d / f"{stem}.md").write_text(markdown(q))
    bar_chart(q, d / f"{stem}.png")
    return [d / f"{stem}.json", d / f"{stem}.md", d / f"{stem}.png"]
