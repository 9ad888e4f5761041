"""Do generated adapters answer in their task's label set? (`labels`; no GPU, reads generation files)

The issue's reading of the answers was that adapters "answer in the formats of training tasks,
not in the label set their description names". This counts it, on tasks with a closed label set
(2 to `MAX_LABELS` distinct normalised outputs over all the task's instances, e.g. Yes/No,
POS/NEG, 1-5): for each row (a generation file) and task,

* ``exact_match``: as in the table;
* ``in_label_set``: share of answers that are one of the task's labels (right or wrong);
* ``other_tasks_label``: share of answers outside the task's labels that are a label of a
  training task (``splits.train``): a training task's format, borrowed;
* ``top_answer``: share of the task's answers that are its most frequent answer (100: one
  answer for every input); ``reference_top``: the same share for the references (the first
  output of each instance), what a row that answers right would show;
* ``train_majority``: the exact match of answering every input with the task's most frequent
  label in its training instances: what a constant answer scores, the floor a row's choice
  among the labels has to beat.

Means are over the closed-label tasks that every given row answered, so rows compare on the
same tasks. A row is named by its file's meta (``row``); ``NAME=FILE`` names it NAME instead (two
files of one row name, e.g. the same checkpoint with and without ``--name-labels``).

    python -m benchmarks.quality labels --tasks data/sni/tasks --generations ROW.jsonl ... \
        --out benchmarks/results/quality_labels

Writes ``<out>.json`` (per task and row) and ``<out>.md`` (means over the closed-label tasks per
row, and the rows' most borrowed labels).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean
from typing import Sequence

from generator.data.sni import (MAX_LABELS, Task, TaskSplits, exact_match, label_strings, normalize_answer,
                                split_descriptions, split_instances)

from .score import read_row

METRICS = ("exact_match", "in_label_set", "other_tasks_label", "top_answer", "reference_top", "train_majority")


def label_set(task: Task) -> frozenset[str] | None:
    """The task's normalised labels (over all its instances), or None if it has not 2 to
    `MAX_LABELS` distinct outputs."""
    labels = label_strings(task.instances)
    return None if labels is None else frozenset(normalize_answer(label) for label in labels)


def label_use(answers: Sequence[dict], tasks: dict[str, Task], splits: TaskSplits) -> dict:
    """Per closed-label task of ``answers``: the `METRICS`, the answers' count and its top 3 answers."""
    train_labels: dict[str, str] = {}  # label -> a training task that has it
    for name in splits.train:
        task = tasks.get(name)
        labels = label_set(task) if task is not None else None
        for label in labels or ():
            train_labels.setdefault(label, name)
    by_task: dict[str, list[dict]] = defaultdict(list)
    for a in answers:
        by_task[a["task"]].append(a)
    out = {}
    for name, rows in sorted(by_task.items()):
        labels = label_set(tasks[name]) if name in tasks else None
        if labels is None:
            continue
        train, test = split_instances(tasks[name])
        refs = [test[a["i"]].outputs for a in rows]
        preds = [normalize_answer(a["pred"]) for a in rows]
        outside = [p for p in preds if p not in labels]
        counts = Counter(preds)
        golds = Counter(normalize_answer(r[0]) for r in refs)
        constant = (label_strings(train) or [""])[0]  # the most frequent training label
        out[name] = {
            "n": len(preds),
            "labels": sorted(labels),
            "exact_match": mean(exact_match(a["pred"], r) for a, r in zip(rows, refs)),
            "in_label_set": 100.0 * (len(preds) - len(outside)) / len(preds),
            "other_tasks_label": 100.0 * sum(p in train_labels for p in outside) / len(preds),
            "top_answer": 100.0 * counts.most_common(1)[0][1] / len(preds),
            "reference_top": 100.0 * golds.most_common(1)[0][1] / len(preds),
            "train_majority": mean(exact_match(constant, r) for r in refs),
            "top_answers": counts.most_common(3),
            "borrowed": Counter(p for p in outside if p in train_labels).most_common(3),
        }
    return out


def names_labels(text: str, labels: frozenset[str]) -> bool:
    """Whether ``text`` names every label (as normalised words)."""
    words = f" {normalize_answer(text)} "
    return all(f" {label} " in words for label in labels)


def labels_named(tasks: dict[str, Task], splits: TaskSplits) -> dict[str, dict[str, list[int]]]:
    """Per split (validation, test): [naming every label, all] over the closed-label tasks'
    evaluation descriptions, user-style descriptions and SNI definitions."""
    out = {}
    for split, names in (("validation", splits.validation), ("test", splits.test)):
        counts = {"descriptions": [0, 0], "user_descriptions": [0, 0], "definitions": [0, 0]}
        for name in names:
            labels = label_set(tasks[name]) if name in tasks else None
            if labels is None:
                continue
            for kind, texts in (("descriptions", split_descriptions(tasks[name])[1]),
                                ("user_descriptions", splits.user_descriptions.get(name, ())),
                                ("definitions", (tasks[name].definition,))):
                counts[kind][0] += sum(names_labels(t, labels) for t in texts)
                counts[kind][1] += len(texts)
        out[split] = counts
    return out


def run(tasks: Sequence[Task], splits: TaskSplits, files: Sequence[str | Path]) -> dict:
    """`label_use` of each generation file, and its means over the closed-label tasks all rows share."""
    by_name = {t.name: t for t in tasks}
    rows = {}
    for f in files:
        name, _, path = str(f).partition("=") if "=" in str(f) and not Path(f).exists() else ("", "", str(f))
        meta, answers = read_row(path)
        name = name or meta.get("row", Path(path).stem)
        if name in rows:
            raise ValueError(f"two files give row {name!r}: name one NAME=FILE")
        rows[name] = {
            "meta": {k: meta.get(k) for k in ("row", "command", "commit", "machine", "date", "fingerprint")},
            "tasks": label_use(answers, by_name, splits),
        }
    common = sorted(set.intersection(*(set(r["tasks"]) for r in rows.values()))) if rows else []
    for r in rows.values():
        r["mean"] = {m: round(mean(r["tasks"][t][m] for t in common), 1) for m in METRICS} if common else None
    from benchmarks.provenance import provenance

    return {"provenance": provenance(), "max_labels": MAX_LABELS, "common_tasks": common, "rows": rows,
            "labels_named": labels_named(by_name, splits)}


def markdown(result: dict) -> str:
    p = result.get("provenance") or {}
    lines = [
        "# Do generated adapters answer in their task's label set?", "",
        f"`{p.get('command')}` at commit {p.get('commit')}, {p.get('date')}; the rows' own generation commands "
        "are in the JSON (`rows.<row>.meta`).", "",
        f"The {len(result['common_tasks'])} tasks with a closed label set (at most {result['max_labels']} distinct "
        "normalised outputs) that every row answered; means over them, in % of answers (`python -m "
        "benchmarks.quality labels`, see its docstring). `other task's label`: an answer outside the task's labels "
        "that is a training task's label; `top answer`: the share of a task's answers that are its most frequent "
        "one (the references': `reference_top`).", "",
        "| row | EM | in label set | other task's label | top answer | most borrowed (answers) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in result["rows"].items():
        if row["mean"] is None:
            continue
        borrowed: Counter[str] = Counter()
        for t in result["common_tasks"]:
            borrowed.update(dict(row["tasks"][t]["borrowed"]))
        top = ", ".join(f"`{b}` ({n})" for b, n in borrowed.most_common(3)) or "--"
        m = row["mean"]
        lines.append(f"| {name} | {m['exact_match']:.1f} | {m['in_label_set']:.1f} | {m['other_tasks_label']:.1f} | "
                     f"{m['top_answer']:.1f} | {top} |")
    if result["rows"] and (first := next(iter(result["rows"].values())))["mean"] is not None:
        lines += ["", f"References: the most frequent label is {first['mean']['reference_top']:.1f}% of a task's "
                      f"instances on average; answering every input with the task's most frequent training label "
                      f"scores {first['mean']['train_majority']:.1f} EM."]
    lines += ["", "How often a text names every label of its (closed-label) task:", "",
              "| split | evaluation descriptions | user-style descriptions | SNI definitions |", "| --- | --- | --- | --- |"]
    for split, c in result["labels_named"].items():
        lines.append(f"| {split} | " + " | ".join(f"{k} / {n}" for k, n in c.values()) + " |")
    lines.append("")
    return "\n".join(lines)


def write(result: dict, out: str | Path) -> list[Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(".json"), out.with_suffix(".md")]
    paths[0].write_text(json.dumps(result, indent=1))
    paths[1].write_text(markdown(result))
    return paths
