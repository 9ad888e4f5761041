"""Where quality comes from: exact match against the number of training tasks and against steps.

Reads the curve rows of the quality pipeline (one evaluation description per task, the
checkpoint's own sampler): `loragen_n<N>` (LoRAGen trained on the first N training tasks; a row
`loragen_n<N>_<variant>`, another recipe on N tasks, is a point of its own beside that curve) and
`loragen_dit-<S>` (a LoRAGen run after S denoiser steps; its last snapshot is also a point of the
first curve, at the number of tasks that run trained on: `steps_run_tasks`, by default the train
split's size), in a validation and a test folder; and SFT runs with snapshots
(`gpu_pipeline.sh sft_curve`): rows `<run>_at<S>` and `<run>` whose generations record `sft_step`,
one curve per run against SFT steps, beside the `incumbent` row (the shipped default); a run's
conditioning control rows `<run>_at<S>_random` (and `<run>_random`) make a curve of their own,
`<run>_random`. An in-distribution folder (`--in-distribution`: rows on training tasks) gives the
same curves on those tasks, with the oracles' mean over the tasks its rows answered taken from a
committed table (`--oracle-from benchmarks/results/quality.json`). Writes `<stem>.json` and
`<stem>.png` with the curves that have points, and the 3-shot and oracle rows for scale.

    python -m benchmarks.quality.curves --tasks data/sni/tasks --validation runs/q_validation \
        --test runs/q_test --results benchmarks/results --steps-run-tasks 204
    python -m benchmarks.quality.curves --tasks data/sni/tasks --in-distribution runs/q_id_fit \
        --oracle-from benchmarks/results/quality.json --stem quality_fit
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from generator.data.sni import load_splits, load_tasks

from .score import CURVE_TASKS_RE, CURVE_VARIANTS, read_row, score_answers

S_RE = re.compile(r"^loragen_dit-(\d+)$")
AT_RE = re.compile(r"_at\d+(?=(?:_random)?$)")  # an SFT snapshot's row: <run>_at<step>[_random]
SPLITS = {"validation": "o--", "test": "s-", "in_distribution": "^-"}  # plot style of each split's curves


def _per_task(path: Path, tasks: dict, names: list[str]) -> dict[str, dict]:
    return score_answers(read_row(path)[1], {n: tasks[n] for n in names if n in tasks})


def _em(path: Path, tasks: dict, names: list[str]) -> float | None:
    per_task = _per_task(path, tasks, names)
    return round(sum(v["exact_match"] for v in per_task.values()) / len(per_task), 2) if per_task else None


def _oracle_em(table: Path, folder: Path, tasks: dict, names: list[str]) -> float | None:
    """The committed oracle row's mean EM (``rows.oracle.per_task`` of a quality table) over the
    tasks that the rows in `folder` answered."""
    answered = {t for path in folder.glob("*.jsonl") for t in _per_task(path, tasks, names)}
    oracle = json.loads(table.read_text())["rows"]["oracle"]["per_task"]
    have = [oracle[t]["exact_match"] for t in sorted(answered) if t in oracle]
    return round(sum(have) / len(have), 2) if have else None


def _sft_points(folder: Path, tasks: dict, names: list[str]) -> dict[str, dict[int, float | None]]:
    """{run: {SFT step: EM}} of the SFT runs with at least one snapshot row in `folder`."""
    points: dict[str, dict[int, float | None]] = {}
    snapshotted: set[str] = set()
    for path in sorted(folder.glob("*.jsonl")):
        step = read_row(path)[0].get("sft_step")
        if step is not None:
            run = AT_RE.sub("", path.stem)
            points.setdefault(run, {})[int(step)] = _em(path, tasks, names)
            if run != path.stem:
                snapshotted.add(run)
    return {run: dict(sorted(v.items())) for run, v in sorted(points.items()) if run in snapshotted}


def curves(tasks_dir: str, folders: dict[str, Path], oracle_from: Path | None = None,
           steps_run_tasks: int | None = None) -> dict:
    """{split: {"tasks": {N: EM}, "variants": {variant: {N: EM}}, "steps": {S: EM}, "icl": EM, "oracle": EM}}
    for the given folders
    (splits: validation, test, in_distribution); `oracle_from`: a quality table whose oracle row
    gives the in-distribution folder's "oracle"; `steps_run_tasks`: the training tasks of the run
    whose snapshots make the steps curve (default: the train split's size)."""
    tasks = {t.name: t for t in load_tasks(tasks_dir)}
    splits = load_splits(tasks_dir)
    steps_run_tasks = steps_run_tasks or len(splits.train)
    names = {"validation": list(splits.validation), "test": list(splits.test),
             "in_distribution": list(splits.in_distribution_eval)}
    out: dict = {"num_train_tasks": len(splits.train), "steps_run_tasks": steps_run_tasks}
    for split, folder in folders.items():
        res: dict = {"tasks": {}, "variants": {}, "steps": {}}
        for path in sorted(folder.glob("*.jsonl")):
            row = path.stem
            if (m := CURVE_TASKS_RE.match(row)) is not None:
                points = res["variants"].setdefault(m[2], {}) if m[2] else res["tasks"]
                points[int(m[1])] = _em(path, tasks, names[split])
            elif (m := S_RE.match(row)) is not None:
                res["steps"][int(m[1])] = _em(path, tasks, names[split])
            elif row in ("icl", "oracle", "incumbent"):
                res[row] = _em(path, tasks, names[split])
        if res["steps"] and steps_run_tasks not in res["tasks"]:  # a loragen_n<N> row of that N comes first
            res["tasks"][steps_run_tasks] = res["steps"][max(res["steps"])]
        res["tasks"] = dict(sorted(res["tasks"].items()))
        res["variants"] = {v: dict(sorted(pts.items())) for v, pts in sorted(res["variants"].items())}
        res["steps"] = dict(sorted(res["steps"].items()))
        res["sft"] = _sft_points(folder, tasks, names[split])
        if split == "in_distribution" and oracle_from is not None:
            res["oracle"] = _oracle_em(oracle_from, folder, tasks, names[split])
        out[split] = res
    return out


def plot(c: dict, path: Path) -> None:
    """One panel per curve that has points: training tasks, denoiser steps, SFT steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, xlabel, title) for key, xlabel, title in (
        ("tasks", "training tasks", "quality against the number of training tasks"),
        ("steps", "denoiser training steps", "quality against training steps"
         + (f" ({c['steps_run_tasks']} tasks)" if c.get("steps_run_tasks") else "")),
        ("sft", "SFT steps", "quality against SFT steps (as served)"),
    ) if any(c.get(split, {}).get(key) for split in SPLITS)]
    if not panels:
        raise ValueError("no curve rows to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), sharey=True, squeeze=False)
    for ax, (key, xlabel, title) in zip(axes[0], panels):
        for split, style in SPLITS.items():
            if split not in c or not c[split][key]:
                continue
            curves = c[split][key].items() if key == "sft" else [("LoRAGen", c[split][key])]
            for name, pts in curves:
                xs = list(pts)
                line = ax.plot(xs, [pts[x] for x in xs], style, label=f"{name} ({split})")[0]
            for variant, pts in (c[split].get("variants", {}).items() if key == "tasks" else ()):
                xs = list(pts)
                ax.plot(xs, [pts[x] for x in xs], "*", ms=11, color=line.get_color(),
                        label=f"LoRAGen, {CURVE_VARIANTS.get(variant, variant)} ({split})")
            refs = (("incumbent", "shipped default"), ("icl", "3-shot ICL"), ("oracle", "oracles")) if key == "sft" \
                else (("icl", "3-shot ICL"), ("oracle", "oracles"))
            for (ref, label), ls in zip(refs, (":", "-.", "--")):
                if c[split].get(ref) is not None and (split == "test" or key == "sft"):
                    ax.axhline(c[split][ref], ls=ls, color="grey", label=f"{label} ({split})")
        if key != "sft":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("exact match")
    unseen, seen = any(k in c for k in ("validation", "test")), "in_distribution" in c
    fig.suptitle("LoRAGen on tasks it never trained on" + (" and on training tasks" if seen else "") if unseen
                 else "LoRAGen on training tasks (in-distribution)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality.curves", description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--validation", type=Path)
    ap.add_argument("--test", type=Path)
    ap.add_argument("--in-distribution", type=Path, help="folder of rows on the in-distribution (training) tasks")
    ap.add_argument("--oracle-from", type=Path,
                    help="quality table (quality.json) whose oracle row is the in-distribution reference")
    ap.add_argument("--steps-run-tasks", type=int,
                    help="training tasks of the run whose loragen_dit-<S> rows make the steps curve "
                         "(default: the train split's size)")
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--stem", default="quality_curves")
    a = ap.parse_args(argv)
    folders = {k: v for k, v in (("validation", a.validation), ("test", a.test),
                                 ("in_distribution", a.in_distribution)) if v is not None}
    import sys

    from benchmarks.provenance import provenance

    command = " ".join(["python -m benchmarks.quality.curves", *sys.argv[1:]])
    out = Path(a.results)
    try:
        c = {**provenance(command), **curves(a.tasks, folders, a.oracle_from, a.steps_run_tasks)}
        out.mkdir(parents=True, exist_ok=True)
        plot(c, out / f"{a.stem}.png")  # refuses curves without rows before anything is written
    except (ValueError, OSError) as e:  # no rows, a missing folder or file: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
    (out / f"{a.stem}.json").write_text(json.dumps(c, indent=1))
    print(json.dumps(c, indent=1))


if __name__ == "__main__":
    main()
