"""CLI of the quality benchmark (see benchmarks/quality/__init__.py).

Baseline rows (needs the oracles of `python -m generator.training.oracles train`):

    python -m benchmarks.quality generate --tasks data/sni/tasks --oracles runs/oracles \
        --rows base system icl average multitask oracle --out runs/quality

Generated adapters (a generator checkpoint; 3 evaluation descriptions x seeds per task):

    python -m benchmarks.quality generate --tasks data/sni/tasks --rows loragen \
        --generator runs/loragen --seeds 0 1 --task-set table --out runs/quality
    python -m benchmarks.quality generate ... --rows loragen_random loragen_other   # controls (by row name)

The sampler and system-prompt choice, from validation rows (written into the checkpoint):

    python -m benchmarks.quality choose --tasks data/sni/tasks --validation runs/q_validation \
        --checkpoint runs/loragen --out runs/choice.json

What the description adds through the adapter, in nats, on training and validation tasks (CPU):

    python -m benchmarks.quality ce-gap --tasks data/sni/tasks --generator generator/checkpoints/default \
        --out benchmarks/results/quality_ce_gap

Scores (CPU), merged into the existing table:

    python -m benchmarks.quality score --tasks data/sni/tasks --generations runs/quality/*.jsonl \
        --results benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from generator.arg_types import count
from generator.data.sni import load_splits, load_tasks

from .anchors import AnchorBlend
from .generate import BASELINE_ROWS, run_rows
from .score import merge_rows, write_outputs

TASK_SETS = ("all", "table", "evaluated", "validation", "test", "in_distribution", "held_out")


def _task_set(tasks, splits, which: str):
    """Tasks of a named set: held_out = validation + test; table = test + in-distribution."""
    if which == "all":
        return tasks
    keep = {
        "validation": set(splits.validation),
        "test": set(splits.test),
        "held_out": set(splits.evaluation),
        "in_distribution": set(splits.in_distribution_eval),
        "table": set(splits.test) | set(splits.in_distribution_eval),
        "evaluated": set(splits.evaluation) | set(splits.in_distribution_eval),
    }.get(which)
    if keep is None:
        raise SystemExit(f"unknown --task-set {which!r}; expected one of {TASK_SETS}")
    return [t for t in tasks if t.name in keep]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="answers of rows -> <out>/<row>.jsonl (skips rows already there)")
    g.add_argument("--tasks", required=True, help="task folder; splits.json beside it")
    g.add_argument("--rows", nargs="+", required=True, help=f"baselines: {' '.join(BASELINE_ROWS)}; other names need --generator")
    g.add_argument("--out", required=True)
    g.add_argument("--oracles", type=Path, help="root written by generator.training.oracles (library/, held_out/, multitask/)")
    g.add_argument("--generator", help="generator checkpoint folder (for generated-adapter rows)")
    g.add_argument("--conditioning", default="description", choices=("description", "random", "other"),
                   help="for generated rows; a row named <name>_random / <name>_other is that control whatever this says")
    g.add_argument("--seeds", type=int, nargs="+", default=[0])
    g.add_argument("--task-set", default="all", choices=TASK_SETS)
    g.add_argument("--user-descriptions", action="store_true",
                   help="generated rows: the test tasks' user-style descriptions (splits.json) instead of the "
                        "evaluation descriptions")
    g.add_argument("--system-prompt", action="store_true",
                   help="generated rows: the description also as the system prompt, with the adapter")
    g.add_argument("--sampler-steps", type=int, help="generated rows: sampler steps (default: the checkpoint's)")
    g.add_argument("--guidance", type=float, help="generated rows: guidance scale (default: the checkpoint's)")
    g.add_argument("--num-descriptions", type=count(1, 10), default=3, help="generated rows: evaluation descriptions per task")
    g.add_argument("--anchor-blend", type=float, metavar="ALPHA",
                   help="generated rows: condition on ALPHA x the description's embedding + (1 - ALPHA) x its "
                        "nearest training descriptions' (anchors.py; an experiment, default: off)")
    g.add_argument("--anchor-k", type=int, default=5, help="with --anchor-blend: nearest training descriptions")
    g.add_argument("--anchor-temperature", type=float, default=0.1, help="with --anchor-blend: softmax temperature")
    g.add_argument("--adapter-scale", type=float, default=1.0, metavar="S",
                   help="generated rows: multiply every adapter's dW by S (an experiment; default 1)")
    g.add_argument("--label-choice", action="store_true",
                   help="on tasks with a closed label set, answer with the label of highest whole-answer "
                        "likelihood instead of generating (the label set from the task's data; not what "
                        "`serve --label-choice` does: that is vLLM's token-by-token constrained decoding)")
    g.add_argument("--name-labels", action="store_true",
                   help="system and generated rows: on tasks with a closed label set, each description ends "
                        "with a sentence naming the labels of the task's training instances (as a user who "
                        "knows them would write it)")
    g.add_argument("--limit-tasks", type=count(1), help="first N tasks of the set (dry runs)")
    g.add_argument("--only", nargs="+", help="only these tasks of the set (dry runs)")
    g.add_argument("--limit-instances", type=count(1), help="first N test instances per task (dry runs)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--max-rows", type=int, help="rows per generation batch (default 512 on GPU, 8 on CPU)")
    g.add_argument("--threads", type=int, default=1)
    g.add_argument("--redo", action="store_true", help="regenerate rows whose file exists")
    s = sub.add_parser("score", help="metrics of generation files, merged into quality.json/.md/.png")
    s.add_argument("--tasks", required=True)
    s.add_argument("--generations", nargs="+", required=True, help="generation files (*.jsonl) or folders of them")
    s.add_argument("--results", default="benchmarks/results")
    s.add_argument("--stem", default="quality", help="output file names (<stem>.json/.md/.png)")
    s.add_argument("--fresh", action="store_true", help="do not merge into the existing <stem>.json")
    s.add_argument("--oracle-summary",
                   help="oracles.json of generator.training.oracles: its settings and speed go into the table")
    c = sub.add_parser("choose", help="pick the sampler and system-prompt setting with the best validation EM")
    c.add_argument("--tasks", required=True)
    c.add_argument("--validation", required=True, help="folder of validation rows loragen_g<G>_s<S>.jsonl, loragen_sys.jsonl")
    c.add_argument("--checkpoint", required=True, help="LoRAGen checkpoint: the chosen sampler is written into it")
    c.add_argument("--out", required=True, help="JSON file of the choice and every candidate's score")
    c.add_argument("--system-prompt-fixed", action="store_true",
                   help="every sampler row was generated with --system-prompt: choose the sampler only")
    k = sub.add_parser("choose-checkpoint", help="pick the checkpoint with the best validation EM (ties: the first)")
    k.add_argument("--validation", required=True, help="folder of the candidates' validation rows <ROW>.jsonl")
    k.add_argument("--margin", type=float, default=0.0,
                   help="EM by which the best must beat the incumbent to win (default 0: any gain)")
    nl = sub.add_parser("choose-named", help="the named-labels experiment's rule (choose.choose_named)")
    nl.add_argument("--plain", required=True, help="folder of the candidates' validation rows, descriptions as given")
    nl.add_argument("--named", required=True,
                    help="folder of their validation rows with the lever's descriptions (naming labels, user-style)")
    nl.add_argument("--lever", default="named_labels", choices=("named_labels", "user_style"),
                    help="what the descriptions of --named are")
    for chooser in (k, nl):
        chooser.add_argument("--tasks", required=True)
        chooser.add_argument("--candidate", action="append", required=True, metavar="ROW=CHECKPOINT",
                             help="a validation row and the checkpoint that made it; the incumbent first")
        chooser.add_argument("--out", required=True, help="JSON file of the choice and every candidate's scores")
    sv = sub.add_parser("served", help="a row answered by a running loragen-vllm serve (served.py)")
    sv.add_argument("--tasks", required=True)
    sv.add_argument("--task-set", default="validation", choices=("validation", "test", "in_distribution", "held_out"))
    sv.add_argument("--closed-only", action="store_true", help="only the tasks with a closed label set")
    sv.add_argument("--only", nargs="+", help="only these tasks of the set")
    sv.add_argument("--name-labels", action="store_true", help="descriptions of closed-label tasks name their labels")
    sv.add_argument("--choice", action="store_true",
                    help="closed-label tasks: answers restricted to the task's labels (vLLM structured outputs)")
    sv.add_argument("--num-descriptions", type=count(1, 10), default=2)
    sv.add_argument("--user-descriptions", action="store_true",
                    help="the tasks' user-style descriptions (splits.json) instead of the evaluation ones")
    sv.add_argument("--limit-instances", type=count(1), help="first N test instances per task (dry runs)")
    sv.add_argument("--row", required=True, help="the row's name (<out>/<row>.jsonl)")
    sv.add_argument("--out", required=True)
    sv.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    sv.add_argument("--concurrency", type=int, default=8)
    sv.add_argument("--server", default="", metavar="TEXT",
                    help="how the server was started, recorded in the row (e.g. 'serve --no-label-choice')")
    e = sub.add_parser("ce-gap", help="CE under the right description's adapter vs a random string's, train vs validation")
    e.add_argument("--tasks", required=True)
    e.add_argument("--generator", required=True, help="generator checkpoint folder")
    e.add_argument("--out", required=True, help="output stem: <out>.json and <out>.md")
    e.add_argument("--num-tasks", type=int, default=16, help="tasks per set (training tasks, validation tasks)")
    e.add_argument("--examples", type=int, default=4, help="examples per task")
    e.add_argument("--sampler-steps", type=int, help="default: the checkpoint's")
    e.add_argument("--guidance", type=float, help="default: the checkpoint's")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--seeds", type=int, default=0,
                   help="LoRAGen: also CE under N seeds' adapters, their mean adapter and x_T = 0 (0: off; else >= 2)")
    lb = sub.add_parser("labels", help="how often rows answer in their task's label set (closed-label tasks)")
    lb.add_argument("--tasks", required=True)
    lb.add_argument("--generations", nargs="+", required=True,
                    help="generation files <row>.jsonl, or NAME=FILE to name a row")
    lb.add_argument("--out", required=True, help="output stem: <out>.json and <out>.md")
    a = ap.parse_args(argv)
    try:
        _run(a)
    except (ValueError, OSError) as e:  # bad input (paths, files, rows): one line, not a traceback
        raise SystemExit(f"error: {e}") from None


def _run(a: argparse.Namespace) -> None:
    tasks = load_tasks(a.tasks)
    splits = load_splits(a.tasks)
    if a.cmd == "choose":
        from .choose import choose

        print(json.dumps(choose(a.validation, {t.name: t for t in tasks}, splits, a.checkpoint, a.out,
                                    a.system_prompt_fixed), indent=1))
        return
    if a.cmd in ("choose-checkpoint", "choose-named"):
        from .choose import choose_checkpoint, choose_named

        bad = [c for c in a.candidate if "=" not in c]
        if bad:
            raise SystemExit(f"error: --candidate takes ROW=CHECKPOINT, got {bad}")
        candidates = dict(c.split("=", 1) for c in a.candidate)
        by_name = {t.name: t for t in tasks}
        try:
            record = (choose_checkpoint(a.validation, candidates, by_name, splits, a.out, a.margin)
                      if a.cmd == "choose-checkpoint"
                      else choose_named(a.plain, a.named, candidates, by_name, splits, a.out, lever=a.lever))
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
        print(json.dumps(record, indent=1))
        return
    if a.cmd == "labels":
        from .labels import run as label_run
        from .labels import write as label_write

        try:
            result = label_run(tasks, splits, a.generations)
        except (ValueError, OSError) as e:
            raise SystemExit(f"error: {e}") from None
        for p in label_write(result, a.out):
            print(p)
        return
    if a.cmd == "served":
        from generator.data.sni import train_labels

        from .served import served_row

        chosen = _task_set(tasks, splits, a.task_set)
        if a.only:
            chosen = [t for t in chosen if t.name in set(a.only)]
        if a.closed_only:
            closed = train_labels(chosen)
            chosen = [t for t in chosen if t.name in closed]
        user = dict(splits.user_descriptions) if a.user_descriptions else None
        if user is not None and (lacking := [t.name for t in chosen if not user.get(t.name)]):
            raise SystemExit(f"error: no user-style descriptions for {len(lacking)} task(s), e.g. {lacking[0]}")
        if not chosen:
            raise SystemExit("error: no tasks to answer")
        print(served_row(a.base_url, chosen, a.out, a.row, name_labels=a.name_labels, choice=a.choice,
                         num_descriptions=a.num_descriptions, user_descriptions=user, concurrency=a.concurrency,
                         limit_instances=a.limit_instances, server=a.server))
        return
    if a.cmd == "ce-gap":
        from .ce_gap import ce_gap, write

        torch.set_num_threads(a.threads)
        result = ce_gap(a.generator, tasks, splits, a.num_tasks, a.examples, a.sampler_steps, a.guidance, a.device,
                        a.seeds)
        for p in write(result, a.out):
            print(p)
        print(json.dumps({k: {x: v for x, v in s.items() if x != "tasks"} for k, s in result["sets"].items()}, indent=1))
        return
    if a.cmd == "generate":
        torch.set_num_threads(a.threads)
        chosen = _task_set(tasks, splits, a.task_set)
        if a.only:
            chosen = [t for t in chosen if t.name in set(a.only)]
        chosen = chosen[: a.limit_tasks]
        if not chosen:
            raise SystemExit(f"error: no tasks to answer (--task-set {a.task_set} and --only have none in common)")
        max_rows = a.max_rows or (512 if torch.device(a.device).type == "cuda" else 8)
        try:
            blend = None if a.anchor_blend is None else AnchorBlend(a.anchor_blend, a.anchor_k, a.anchor_temperature)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        if not a.adapter_scale > 0:
            raise SystemExit(f"error: --adapter-scale must be positive, got {a.adapter_scale}")
        generated = [r for r in a.rows if r not in BASELINE_ROWS]
        if generated and not a.generator:  # checked before the base model loads
            raise SystemExit(f"error: rows {generated} are generated rows: they need --generator")
        if {"average", "multitask", "oracle"} & set(a.rows) and not a.oracles:
            raise SystemExit("error: rows average, multitask and oracle need --oracles")
        times = run_rows(
            a.rows, chosen, Path(a.out), a.device, oracles=a.oracles,
            train_task_names=splits.train_tasks([t.name for t in tasks]), max_rows=max_rows,
            generator_ckpt=a.generator, conditioning=a.conditioning, seeds=a.seeds,
            all_tasks={t.name: t for t in tasks}, skip_done=not a.redo, limit_instances=a.limit_instances,
            user_descriptions=dict(splits.user_descriptions) if a.user_descriptions else None,
            system_prompt=a.system_prompt, steps=a.sampler_steps, guidance=a.guidance,
            num_descriptions=a.num_descriptions,
            blend=blend, adapter_scale=a.adapter_scale, label_choice=a.label_choice, name_labels=a.name_labels,
        )
        print(json.dumps({k: round(v, 1) for k, v in times.items()}))
    else:
        path = Path(a.results) / f"{a.stem}.json"
        existing = None if a.fresh or not path.is_file() else json.loads(path.read_text())
        q = merge_rows(existing, a.generations, {t.name: t for t in tasks}, splits)
        if a.oracle_summary:
            q["oracle_training"] = json.loads(Path(a.oracle_summary).read_text())
        elif existing and "oracle_training" in existing:
            q["oracle_training"] = existing["oracle_training"]
        for p in write_outputs(q, a.results, a.stem):
            print(p)
        for name, r in q["rows"].items():
            print(f"{name:12s} ID {r.get('in_distribution')}  val {r.get('validation')}  test {r.get('test')}",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
