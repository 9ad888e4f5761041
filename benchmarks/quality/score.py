"""Scores of the quality table from generation files: per task, per category, per split.

A task's score in a row is the mean over its test instances and the row's variants (descriptions x
seeds) of SNI exact match and ROUGE-L (generator.data.sni). Columns (data/sni/splits.json):

- in_distribution: mean over the fixed in-distribution subset of training tasks;
- validation: mean over the validation tasks (where choices are made);
- test: mean over the test tasks (reported once; zero-shot: no generator trained on them);
- relative_to_oracle: the row's mean / the oracle row's mean on the same tasks, in %.

Rows merge into an existing quality.json (a row is replaced by a newer file of the same name), so
rows made on different machines and days sit in one table; each keeps its own provenance.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Iterable, Sequence

from generator.data.sni import Task, TaskSplits, exact_match, rouge_l, split_instances

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
    # Rows of the earlier 102-task table (not in today's): the first LoRAGen run weighted the
    # spectral loss 2.0, and its ablations share that setting.
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
    "loragen_user": "LoRAGen, user-style descriptions",
    "loragen_sys": "LoRAGen + description as system prompt (checkpoint's sampler)",
    "loragen_user_sys": "LoRAGen + user-style description as system prompt",
    # LoRAGen fine-tuned by SFT through the base model on top of reconstruction (served as trained:
    # the description also as the system prompt).
    "loragen_sft": "LoRAGen SFT",
    "loragen_sft_user": "LoRAGen SFT, user-style descriptions",
    "loragen_sft_random": "LoRAGen SFT, random-string description (control)",
    "loragen_sft_other": "LoRAGen SFT, another task's description (control)",
    # The shipped checkpoint with its conditioning blended with the nearest training descriptions
    # (anchors.py; alpha 0.75, k 5, chosen on validation): an experiment, not served.
    "loragen_anchor": "LoRAGen SFT, anchor blend 0.75 (not served)",
    "loragen_anchor_user": "LoRAGen SFT, anchor blend 0.75 (not served), user-style descriptions",
    "loragen_anchor_random": "LoRAGen SFT, anchor blend 0.75 (not served), random-string description (control)",
    "loragen_anchor_other": "LoRAGen SFT, anchor blend 0.75 (not served), another task's description (control)",
    # Descriptions that name their labels (`generate --name-labels`: on closed-label tasks each
    # description ends with `Answer with one of: ...`, the labels of the task's training instances).
    "loragen_sft_labels": "LoRAGen SFT, descriptions naming their labels",
    "system_labels": "Base + description naming its labels as system prompt",
}
OPTIONAL_ROWS = ("loragen_ws2", "loragen_ws2_random", "loragen_ws2_other", "loragen_no_moe", "loragen_no_direction",
                 "loragen_no_spectral", "t2l_sft_random", "t2l_sft_other", "loragen_user_sys",
                 "loragen_sys", "loragen_sft", "loragen_sft_user", "loragen_sft_random",
                 "loragen_sft_other", "loragen_anchor", "loragen_anchor_user", "loragen_anchor_random",
                 "loragen_anchor_other", "loragen_sft_labels", "system_labels")  # not listed as missing


# The task-count curve's rows: loragen_n<N> (LoRAGen reconstruction on N training tasks) and
# loragen_n<N>_<variant> (a run of another recipe on N tasks: `gpu_pipeline.sh all_tasks` with ALL_RUN=all_<variant>).
CURVE_TASKS_RE = re.compile(r"^loragen_n(\d+)(?:_([a-z0-9]+))?$")
CURVE_VARIANTS = {"scaled": "steps scaled with the task count"}


def row_label(row: str) -> str:
    """Display name of a row: the known ones, the curve rows (task subsets, snapshots), else the name."""
    if row in ROW_LABELS:
        return ROW_LABELS[row]
    if m := CURVE_TASKS_RE.match(row):
        variant = f", {CURVE_VARIANTS.get(m[2], m[2])}" if m[2] else ""
        return f"LoRAGen trained on {m[1]} tasks{variant} (1 description per task)"
    if m := re.match(r"^loragen_dit-(\d+)$", row):
        return f"LoRAGen after {m[1]} denoiser steps (1 description per task)"
    if m := re.match(r"^loragen_g([0-9.]+)_s(\d+)$", row):
        return f"LoRAGen, guidance {m[1]}, {m[2]} sampler steps"
    return row


def read_row(path: str | Path) -> tuple[dict, list[dict]]:
    """(meta, answers) of one generation file."""
    lines = Path(path).read_text().splitlines()
    if not lines or "meta" not in json.loads(lines[0]):
        raise ValueError(f"{path}: not a generation file (first line must be {{'meta': ...}})")
    return json.loads(lines[0])["meta"], [json.loads(x) for x in lines[1:] if x.strip()]


def score_answers(answers: Iterable[dict], tasks: dict[str, Task]) -> dict[str, dict[str, float]]:
    """{task: {exact_match, rougeL, n[, partial]}}: means over the task's answers (instances x
    variants). ValueError for an answer to an instance the task's test split lacks or one given
    twice (task, instance, variant); a task not answered on every test instance for each of its
    variants is `partial` (its cells are marked)."""
    refs = {name: split_instances(t)[1] for name, t in tasks.items()}
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: {m: [] for m in METRICS})
    seen: dict[str, set[tuple[int, str]]] = defaultdict(set)
    for a in answers:
        if a["task"] not in refs:
            continue
        test, i, v = refs[a["task"]], a["i"], str(a.get("v", ""))
        if not isinstance(i, int) or not 0 <= i < len(test):
            raise ValueError(f"{a['task']}: answer to instance {i!r}, but its test split has {len(test)}")
        if (i, v) in seen[a["task"]]:
            raise ValueError(f"{a['task']}: instance {i} answered twice in variant {v!r}")
        seen[a["task"]].add((i, v))
        acc[a["task"]]["exact_match"].append(exact_match(a["pred"], test[i].outputs))
        acc[a["task"]]["rougeL"].append(rouge_l(a["pred"], test[i].outputs))
    out = {}
    for t, v in sorted(acc.items()):
        out[t] = {"exact_match": round(mean(v["exact_match"]), 3), "rougeL": round(mean(v["rougeL"]), 3),
                  "n": len(v["rougeL"])}
        if len(seen[t]) < len(refs[t]) * len({variant for _, variant in seen[t]}):
            out[t]["partial"] = True
    return out


def _avg(per_task: dict[str, dict], names: Sequence[str]) -> dict | None:
    """Means over the `names` that were evaluated; `tasks` counts them, `of` counts `names`."""
    have = [per_task[n] for n in names if n in per_task]
    if not have:
        return None
    cell = {m: round(mean(h[m] for h in have), 2) for m in METRICS} | {"tasks": len(have), "of": len(names)}
    partial = sum(1 for h in have if h.get("partial"))
    return cell | ({"partial_tasks": partial} if partial else {})


def aggregate(rows: dict[str, dict], tasks: dict[str, Task], splits: TaskSplits) -> dict[str, dict]:
    """Adds in_distribution / validation / test / train_all / per_category and relative_to_oracle to each row."""
    columns = {"in_distribution": list(splits.in_distribution_eval), "validation": list(splits.validation),
               "test": list(splits.test), "train_all": [n for n in sorted(tasks) if n in set(splits.train)]}
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


def generation_files(paths: Sequence[str | Path]) -> list[Path]:
    """The generation files named: a file as is, a folder's *.jsonl in name order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise ValueError(f"{p}: a folder with no generation files (*.jsonl)")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such generation file or folder")
    return files


def merge_rows(existing: dict | None, paths: Sequence[str | Path], tasks: dict[str, Task], splits: TaskSplits) -> dict:
    """quality.json content: rows of `existing` plus (replacing) the rows of the generation files
    (`paths`: files or folders of them). Files of one row (its validation and test sets, made
    apart) join if they score disjoint tasks with one generator; files that overlap or disagree on
    the generator are refused rather than one silently replacing the other."""
    rows = dict((existing or {}).get("rows", {}))
    seen: dict[str, Path] = {}
    for f in generation_files(paths):
        meta, answers = read_row(f)
        per_task = score_answers(answers, tasks)
        name = meta["row"]
        if name in seen:
            first = rows[name]
            both = sorted(first["per_task"].keys() & per_task.keys())
            if both or first["meta"].get("fingerprint") != meta.get("fingerprint"):
                why = f"both score {both[0]}" if both else "they name different generators"
                raise ValueError(f"row {name!r} is in {seen[name]} and {f} and {why}: score them apart (--stem)")
            first["per_task"].update(per_task)
            continue
        seen[name] = f
        rows[name] = {"label": row_label(name), "meta": meta, "per_task": per_task}
    order = [r for r in ROW_LABELS if r in rows] + [r for r in rows if r not in ROW_LABELS]
    rows = aggregate({r: rows[r] for r in order}, tasks, splits)
    return {
        "about": __doc__.split("\n")[0],
        "metrics": "SNI exact match and ROUGE-L (x100), mean over test instances and variants, then over tasks",
        "splits": {"validation": list(splits.validation), "test": list(splits.test),
                   "in_distribution_eval": list(splits.in_distribution_eval)},
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------------
# Outputs


def _fmt(cell: dict | None, m: str) -> str:
    if not cell:
        return "—"
    text = f"{cell[m]:.1f}" + ("" if cell["tasks"] == cell["of"] else f"* ({cell['tasks']}/{cell['of']} tasks)")
    return text + (f"† ({cell['partial_tasks']} tasks on some instances only)" if cell.get("partial_tasks") else "")


def _setting(meta: dict) -> str:
    """How a generated row sampled and prompted (from its meta); for other rows only how their
    descriptions were changed, if they were."""
    named = f", descriptions naming their labels ({len(meta['name_labels']['tasks'])} closed-label tasks)" \
        if meta.get("name_labels") else ""
    sampler = meta.get("sampler")
    if not sampler:
        return named.removeprefix(", ")
    out = f"{sampler.get('steps')} steps, guidance {sampler.get('guidance')}"
    if meta.get("system_prompt"):
        out += ", + description as system prompt"
    if meta.get("descriptions") == "user":
        out += ", user-style descriptions"
    if blend := meta.get("anchor_blend"):
        out += f", anchor blend alpha {blend['alpha']} k {blend['k']}"
    if meta.get("adapter_scale", 1.0) != 1.0:
        out += f", adapter scale {meta['adapter_scale']}"
    return out + named


def _rel(cell: dict | None, m: str) -> str:
    if not cell or "relative_to_oracle" not in cell or cell["relative_to_oracle"][m] is None:
        return "—"
    return f"{cell['relative_to_oracle'][m]:.0f}%"


def markdown(q: dict) -> str:
    """The table as Markdown: headline columns, provenance, per category."""
    lines = [
        "# Quality on Super-NaturalInstructions (SmolLM2-135M-Instruct, LoRA r=8 on q_proj, v_proj)",
        "",
        f"In-distribution (ID): {len(q['splits']['in_distribution_eval'])} fixed training tasks; validation: "
        f"{len(q['splits']['validation'])} tasks (choices were made there); test: {len(q['splits']['test'])} tasks "
        "(each row scored once; no generator trained on validation or test tasks). 40 test instances per task "
        "(half for tasks under 80). Exact match (EM) and ROUGE-L (RL) x100, SNI normalisation; % of oracle = row "
        "mean / oracle mean on the same tasks. Generated-adapter rows average 3 unseen descriptions (or the 2 "
        "user-style ones) x seeds per task. * = only some of the column's tasks were evaluated; "
        "† = some tasks on only some of their test instances.",
        "",
        "| row | test EM | test RL | test % oracle (EM) | validation EM | ID EM | ID % oracle (EM) | generator | setting |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in q["rows"].items():
        i, v, t = r.get("in_distribution"), r.get("validation"), r.get("test")
        fp = r["meta"].get("fingerprint", "")[:12]
        lines.append(
            f"| {r['label']} | {_fmt(t, 'exact_match')} | {_fmt(t, 'rougeL')} | {_rel(t, 'exact_match')} "
            f"| {_fmt(v, 'exact_match')} | {_fmt(i, 'exact_match')} | {_rel(i, 'exact_match')} | {fp} "
            f"| {_setting(r['meta'])} |"
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
    """The targets, computed from the rows present (test column): conditioning controls, 3-shot, oracles."""
    rows = q["rows"]

    def em(row: str, col: str = "test") -> float | None:
        cell = rows.get(row, {}).get(col)
        return cell["exact_match"] if cell else None

    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    out = []
    for gen in ("loragen_sft", "loragen", "t2l_sft", "t2l"):
        right, rand, other = em(gen), em(f"{gen}_random"), em(f"{gen}_other")
        if None in (right, rand, other):
            continue
        worst = max(rand, other)
        out.append(f"Conditioning ({rows[gen]['label']}, test EM): right description {right:.1f}, random string "
                   f"{rand:.1f}, another task's description {other:.1f}: right >= 2x both controls "
                   f"{verdict(right >= 2 * worst and right > 0)}.")
    icl = em("icl")
    checks = []
    for row in ("loragen_sft", "loragen", "loragen_sys"):
        if em(row) is not None and icl is not None:
            checks.append(f"{rows[row]['label']} >= 3-shot ICL ({icl:.1f}): {em(row):.1f} ({verdict(em(row) >= icl)})")
    for row in ("loragen_sft_user", "loragen_user", "loragen_user_sys"):
        if em(row) is not None and icl is not None:
            checks.append(f"{rows[row]['label']} >= 80% of 3-shot ICL ({0.8 * icl:.1f}): {em(row):.1f} "
                          f"({verdict(em(row) >= 0.8 * icl)})")
    for row in ("loragen_sft", "loragen"):
        ind = rows.get(row, {}).get("in_distribution")
        if ind and ind.get("relative_to_oracle") and ind["relative_to_oracle"]["exact_match"] is not None:
            rel = ind["relative_to_oracle"]["exact_match"]
            checks.append(f"{rows[row]['label']} in-distribution >= 90% of the oracles (EM): {rel:.0f}% "
                          f"({verdict(rel >= 90)})")
    if checks:
        out.append("Targets (test split, EM): " + "; ".join(checks) + ".")
    return ["", *out] if out else []


def bar_chart(q: dict, path: str | Path) -> None:
    """Grouped bars: exact match and ROUGE-L, in-distribution and test (unseen tasks), one group per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(q["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(names) + 3), 4.5), sharey=True)
    for ax, m, title in ((axes[0], "exact_match", "Exact match"), (axes[1], "rougeL", "ROUGE-L")):
        for k, (col, lab) in enumerate((("in_distribution", "in-distribution"), ("test", "test (unseen tasks)"))):
            vals = [(q["rows"][n].get(col) or {}).get(m, 0.0) for n in names]
            ax.bar([x + 0.4 * k for x in range(len(names))], vals, width=0.4, label=lab)
        ax.set_xticks([x + 0.2 for x in range(len(names))], names, rotation=40, ha="right")
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
