"""Greedy, batched generation for the quality table's rows, all adapters in one `MultiLoRA` model.

A *row* is a way of answering a task's test inputs: the base model alone, with the description
as system prompt, with 3 in-context examples, with the average of the training oracles merged
into the weights, with the multi-task LoRA, with each task's oracle, or with adapters generated
by a generator from descriptions (several descriptions x seeds per task, averaged later).

Every row writes one JSONL file: a first line `{"meta": {...}}` (row name, command, commit,
machine, date, seconds), then one line per answer `{"task", "i" (test instance), "v" (variant:
description/seed), "pred"}`. Scores are computed from these files by `benchmarks.quality.score`,
which needs no GPU.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from benchmarks.provenance import git_commit
from benchmarks.quality.anchors import AnchorBlend, training_descriptions
from generator.adapter import LoRAAdapter
from generator.base_model import load_base_model
from generator.config import TargetSpec
from generator.data.library import load_adapters
from generator.data.sni import (Instance, Task, add_label_names, random_description, shot_examples,
                                split_descriptions, split_instances, train_labels)
from generator.training.multilora import MultiLoRA
from generator.training.prompts import chat_messages, prompt_ids, truncate_text

MAX_NEW_TOKENS = 128  # cap; each task gets min(cap, its longest train output + 16)
MAX_INPUT_TOKENS = 384  # as in oracle training
MAX_SHOT_TOKENS = 256  # per in-context example input
NUM_DESCRIPTIONS = 3  # evaluation descriptions per task (as the papers do)


@dataclass
class Prompt:
    """One generation: its task, test instance, variant, chat messages and adapter slot (-1: none)."""

    task: str
    i: int
    v: str
    messages: list[dict[str, str]]
    slot: int = -1


# ------------------------------------------------------------------------------------------------
# Batched greedy generation


def max_new_tokens(tokenizer, task: Task, cap: int = MAX_NEW_TOKENS) -> int:
    """A task's generation budget: its longest train output (tokens) + 16, at most `cap`."""
    train, _ = split_instances(task)
    longest = max(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for x in train for o in x.outputs[:1])
    return min(cap, longest + 16)


def token_batches(order: Sequence[int], length: Callable[[int], int], max_tokens: int,
                  max_rows: int | None = None, budget: Callable[[int], int] = lambda k: 0) -> list[list[int]]:
    """``order`` cut into consecutive batches of at most ``max_rows`` items whose padded size,
    items x (the longest ``length`` + the newest item's ``budget``: ``order`` ascends in it),
    stays within ``max_tokens`` (an item alone may exceed it)."""
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for k in order:
        grown = max(longest, length(k))
        if cur and ((max_rows is not None and len(cur) >= max_rows) or (grown + budget(k)) * (len(cur) + 1) > max_tokens):
            batches.append(cur)
            cur, grown = [], length(k)
        cur.append(k)
        longest = grown
    if cur:
        batches.append(cur)
    return batches


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    budgets: dict[str, int],
    multi: MultiLoRA | None = None,
    max_rows: int = 512,
    max_tokens: int = 262144,
    progress: bool = True,
    desc: str = "generating",
) -> list[str]:
    """Greedy answers to `prompts` (same order), batched by budget and length, left-padded.

    Rows of one batch may use different adapters (`prompt.slot`, through `multi`).
    """
    device = next(model.parameters()).device
    ids = [prompt_ids(tokenizer, p.messages) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda k: (budgets[prompts[k].task], len(ids[k])))
    batches = token_batches(order, lambda k: len(ids[k]), max_tokens, max_rows, lambda k: budgets[prompts[k].task])
    out: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    for batch in tqdm(batches, desc=desc, disable=not progress):
        S = max(len(ids[k]) for k in batch)
        input_ids = torch.full((len(batch), S), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), S), dtype=torch.long)
        for b, k in enumerate(batch):  # left padding
            input_ids[b, S - len(ids[k]) :] = torch.tensor(ids[k])
            mask[b, S - len(ids[k]) :] = 1
        budget = max(budgets[prompts[k].task] for k in batch)
        slots = [prompts[k].slot for k in batch]
        ctx = multi.use(slots) if multi is not None else contextlib.nullcontext()
        with ctx:
            gen = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=budget,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        texts = tokenizer.batch_decode(gen[:, S:], skip_special_tokens=True)
        for k, t in zip(batch, texts):
            out[k] = t.strip()
    return out


@torch.no_grad()
def choose_labels(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    labels_of: dict[str, list[str]],
    multi: MultiLoRA | None = None,
    max_tokens: int = 16384,
    progress: bool = True,
) -> list[str]:
    """Per prompt, the label of its task (``labels_of[task]``) the model finds most likely as the
    whole answer: the summed log-probability of the label's tokens and the end of turn after the
    prompt (rank classification). Rows of one batch may use different adapters (`prompt.slot`).
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    label_ids = {t: [tokenizer(lab, add_special_tokens=False)["input_ids"] + [eos] for lab in labs]
                 for t, labs in labels_of.items()}
    seqs = []  # (prompt index, label index, prompt ids, label ids)
    for k, p in enumerate(prompts):
        ids = prompt_ids(tokenizer, p.messages)
        seqs += [(k, j, ids, lab) for j, lab in enumerate(label_ids[p.task])]
    length = lambda n: len(seqs[n][2]) + len(seqs[n][3])  # noqa: E731
    batches = token_batches(sorted(range(len(seqs)), key=length), length, max_tokens)
    scores: dict[tuple[int, int], float] = {}
    pad = tokenizer.pad_token_id
    for batch in tqdm(batches, desc="choosing labels", disable=not progress):
        S = max(length(n) for n in batch)
        input_ids = torch.full((len(batch), S), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), S), dtype=torch.long)
        for b, n in enumerate(batch):  # right padding: the label's positions are known
            row = seqs[n][2] + seqs[n][3]
            input_ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
        ctx = multi.use([prompts[seqs[n][0]].slot for n in batch]) if multi is not None else contextlib.nullcontext()
        with ctx:  # the vocabulary projection only where a label token is predicted
            hidden = model.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        rows = torch.cat([torch.full((len(seqs[n][3]),), b) for b, n in enumerate(batch)])
        cols = torch.cat([torch.arange(len(seqs[n][2]) - 1, len(seqs[n][2]) + len(seqs[n][3]) - 1) for n in batch])
        targets = torch.tensor([t for n in batch for t in seqs[n][3]], device=device)
        logp = torch.log_softmax(model.lm_head(hidden[rows.to(device), cols.to(device)]).float(), dim=-1)
        per_token = logp.gather(1, targets[:, None])[:, 0].cpu()
        start = 0
        for n in batch:
            k, j, _, lab = seqs[n]
            scores[(k, j)] = per_token[start:start + len(lab)].sum().item()
            start += len(lab)
    return [labels_of[p.task][max(range(len(labels_of[p.task])), key=lambda j: scores[(k, j)])]
            for k, p in enumerate(prompts)]


# ------------------------------------------------------------------------------------------------
# Prompts of each row


def input_prompts(tokenizer, tasks: Sequence[Task], slot_of: Callable[[str, str], int] | None = None,
                  variants: Callable[[Task], Sequence[str]] = lambda t: ("0",),
                  system_of: Callable[[str, str], str | None] = lambda task, v: None) -> list[Prompt]:
    """The test inputs in the chat template (after `system_of`'s system prompt, if any), once per
    variant, each with its adapter slot."""
    out = []
    for t in tasks:
        _, test = split_instances(t)
        for v in variants(t):
            slot = slot_of(t.name, v) if slot_of else -1
            system = system_of(t.name, v)
            for i, x in enumerate(test):
                msgs = chat_messages(truncate_text(tokenizer, x.input, MAX_INPUT_TOKENS), system=system)
                out.append(Prompt(t.name, i, v, msgs, slot))
    return out


def eval_descriptions(task: Task, k: int = NUM_DESCRIPTIONS) -> list[str]:
    """The first k of the task's evaluation descriptions (never trained on)."""
    return split_descriptions(task)[1][:k]


def descriptions_for(num_descriptions: int, user_descriptions: Mapping[str, Sequence[str]] | None = None,
                     named_labels: Mapping[str, list[str]] | None = None) -> Callable[[Task], list[str]]:
    """What a row's descriptions of a task are: its user-style ones (all) if `user_descriptions`
    is given (ValueError later for a task without), else its first `num_descriptions` evaluation
    ones; naming the task's labels where `named_labels` (task -> labels) has them."""
    def of(task: Task) -> list[str]:
        if user_descriptions is None:
            return eval_descriptions(task, num_descriptions)
        if not user_descriptions.get(task.name):
            raise ValueError(f"no user-style descriptions for task {task.name}")
        return list(user_descriptions[task.name])
    return of if named_labels is None else with_named_labels(of, dict(named_labels))


def with_named_labels(descriptions_of: Callable[[Task], Sequence[str]],
                      labels_of: dict[str, list[str]]) -> Callable[[Task], list[str]]:
    """``descriptions_of`` whose descriptions of a task in ``labels_of`` name its labels."""
    def named(task: Task) -> list[str]:
        labels = labels_of.get(task.name)
        return [add_label_names(d, labels) if labels else d for d in descriptions_of(task)]
    return named


def system_prompts(tokenizer, tasks: Sequence[Task],
                   descriptions_of: Callable[[Task], Sequence[str]] = eval_descriptions) -> list[Prompt]:
    """Each evaluation description as the system prompt, then the input."""
    out = []
    for t in tasks:
        _, test = split_instances(t)
        for j, d in enumerate(descriptions_of(t)):
            for i, x in enumerate(test):
                msgs = chat_messages(truncate_text(tokenizer, x.input, MAX_INPUT_TOKENS), system=d)
                out.append(Prompt(t.name, i, f"d{j}", msgs))
    return out


def icl_prompts(tokenizer, tasks: Sequence[Task], k: int = 3) -> list[Prompt]:
    """k fixed training examples as earlier chat turns, then the input (no description)."""
    out = []
    for t in tasks:
        _, test = split_instances(t)
        shots = [Instance(truncate_text(tokenizer, s.input, MAX_SHOT_TOKENS), s.outputs) for s in shot_examples(t, k)]
        for i, x in enumerate(test):
            msgs = chat_messages(truncate_text(tokenizer, x.input, MAX_INPUT_TOKENS), shots=shots)
            out.append(Prompt(t.name, i, "0", msgs))
    return out


def other_task(tasks_by_name: dict[str, Task], name: str) -> Task:
    """A control: a fixed other task, of another category where possible (half-way round the sorted list)."""
    names = sorted(tasks_by_name)
    k = names.index(name)
    for step in range(len(names) // 2, len(names) + len(names) // 2):
        other = tasks_by_name[names[(k + step) % len(names)]]
        if other.name != name and other.category != tasks_by_name[name].category:
            return other
    return tasks_by_name[names[(k + 1) % len(names)]]


# ------------------------------------------------------------------------------------------------
# Adapters of each row


def merge_mean_delta(model, target: TargetSpec, adapters: Sequence[LoRAAdapter]) -> None:
    """W += mean_i dW_i at every location: the "average LoRA" baseline, merged exactly."""
    for m, layer in target.locations:
        lin = model.get_submodule(target.path(m, layer))
        delta = sum(a.reorder(target).delta(m, layer).double() for a in adapters) / len(adapters)
        with torch.no_grad():
            lin.weight += delta.to(lin.weight.device, lin.weight.dtype)


def multi_with(model, adapters: Sequence[LoRAAdapter]) -> MultiLoRA:
    """A MultiLoRA over `model` holding `adapters` in slots 0..n-1 (kept as bf16 / the model's dtype)."""
    target = adapters[0].target
    multi = MultiLoRA(model, target, len(adapters), dtype=next(model.parameters()).dtype)
    for slot, a in enumerate(adapters):
        multi.load(slot, a)
    return multi


def generated_adapters(
    ckpt: str | Path, tasks: Sequence[Task], conditioning: str, seeds: Sequence[int], device: str,
    all_tasks: dict[str, Task], descriptions_of: Callable[[Task], Sequence[str]] = eval_descriptions,
    steps: int | None = None, guidance: float | None = None,
    blend: AnchorBlend | None = None, anchor_tasks: Sequence[Task] = (), adapter_scale: float = 1.0,
) -> tuple[list[LoRAAdapter], dict[tuple[str, str], int], dict[tuple[str, str], str], dict]:
    """Adapters from a generator checkpoint: per task, its descriptions (`descriptions_of`) x seeds.

    conditioning: "description" (the task's descriptions), "random" (random strings of the same
    length) or "other" (another task's descriptions). `steps` / `guidance` override the
    checkpoint's sampler. `blend` conditions on a blend with the nearest descriptions of
    `anchor_tasks` (the training tasks; `anchors.py`); `adapter_scale` multiplies every adapter's
    dW (its B factors). Returns (adapters, {(task, variant): slot},
    {(task, variant): the text the adapter was generated from}, info).
    """
    from generator.adapter import unstack_adapters
    from generator.api import Generator

    gen = Generator.load(ckpt, device=device)
    adapters, slot_of, text_of, seconds = [], {}, {}, 0.0
    if blend is not None:
        anchor_texts = training_descriptions(anchor_tasks)
        if not anchor_texts:
            raise ValueError("--anchor-blend needs the training tasks' descriptions")
        anchors = torch.cat([gen.encoder.encode(anchor_texts[i:i + 1024]) for i in range(0, len(anchor_texts), 1024)])
        nearest: list[float] = []
    for seed in seeds:
        descs, keys = [], []
        for t in tasks:
            src = other_task(all_tasks, t.name) if conditioning == "other" else t
            for j, d in enumerate(descriptions_of(src)):
                if conditioning == "random":
                    d = random_description(t.name, j, seed, len(d))
                descs.append(d)
                keys.append((t.name, f"d{j}s{seed}"))
        t0 = time.perf_counter()
        if blend is None:
            made = gen.generate(descs, seed=seed, steps=steps, guidance=guidance)
        else:
            cond, top1 = blend.apply(gen.encoder.encode(descs), anchors)
            nearest += top1.tolist()
            made = unstack_adapters(gen.target, *gen.generate_factors(cond, descs, seed, steps, guidance))
        if adapter_scale != 1.0:
            made = [LoRAAdapter(a.target, a.A, {m: b * adapter_scale for m, b in a.B.items()}) for a in made]
        seconds += time.perf_counter() - t0
        for key, d, a in zip(keys, descs, made):
            slot_of[key] = len(adapters)
            text_of[key] = d
            adapters.append(a)
    sampler = {**gen.sampler, **({"steps": steps} if steps else {}), **({"guidance": guidance} if guidance else {})}
    info = {"generator": str(ckpt), "kind": gen.kind, "fingerprint": gen.fingerprint, "conditioning": conditioning,
            "seeds": list(seeds), "sampler": sampler, "generate_seconds": round(seconds, 2)}
    if gen.extra.get("training") == "sft":  # how far SFT had gone: a snapshot's step, else where the run ended
        snap, stopped = gen.extra.get("snapshot"), gen.extra.get("stopped_at")
        info["sft_step"] = (snap["sft_step"] if snap else stopped if stopped is not None
                            else gen.extra.get("train", {}).get("steps"))
    if blend is not None:
        info["anchor_blend"] = {**blend.to_dict(), "anchors": len(anchor_texts),
                                "nearest_cosine_mean": round(sum(nearest) / len(nearest), 4)}
    if adapter_scale != 1.0:
        info["adapter_scale"] = adapter_scale
    return adapters, slot_of, text_of, info


# ------------------------------------------------------------------------------------------------
# Running rows


def run_meta(row: str, **extra) -> dict:
    """Provenance of a row: command, commit, machine, date."""
    commit = git_commit() or "unknown"
    machine = platform.node()
    if torch.cuda.is_available():
        machine = torch.cuda.get_device_name(0)
    return {
        "row": row,
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.quality"] + sys.argv[1:]),
        "commit": commit,
        "machine": machine,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **extra,
    }


def write_row(path: Path, meta: dict, prompts: Sequence[Prompt], preds: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for p, y in zip(prompts, preds):
            f.write(json.dumps({"task": p.task, "i": p.i, "v": p.v, "pred": y}) + "\n")
    os.replace(tmp, path)


BASELINE_ROWS = ("base", "system", "icl", "average", "multitask", "oracle")


def row_conditioning(row: str, default: str = "description") -> str:
    """Conditioning controls by row name: `<name>_random` -> random strings, `<name>_other` -> another task's."""
    for suffix in ("random", "other"):
        if row.endswith("_" + suffix):
            return suffix
    return default


def run_rows(
    rows: Iterable[str],
    tasks: Sequence[Task],
    out: Path,
    device: str,
    oracles: Path | None = None,
    train_task_names: Sequence[str] = (),
    max_rows: int = 512,
    generator_ckpt: str | None = None,
    conditioning: str = "description",
    seeds: Sequence[int] = (0,),
    all_tasks: dict[str, Task] | None = None,
    progress: bool = True,
    skip_done: bool = True,
    limit_instances: int | None = None,
    user_descriptions: dict[str, Sequence[str]] | None = None,
    system_prompt: bool = False,
    steps: int | None = None,
    guidance: float | None = None,
    num_descriptions: int = NUM_DESCRIPTIONS,
    blend: AnchorBlend | None = None,
    adapter_scale: float = 1.0,
    label_choice: bool = False,
    name_labels: bool = False,
) -> dict[str, float]:
    """Generate every requested row into `out/<row>.jsonl`; returns seconds per row.

    Baseline rows are those of `BASELINE_ROWS`; any other row name needs `generator_ckpt` and is
    generated adapters (with `conditioning` and `seeds`). A row whose file exists is skipped.
    `label_choice`: on tasks with a closed label set (in their training instances), the answer is
    the label the model finds most likely (`choose_labels`) instead of a free generation: what
    answering within the label set gives when the set is known (it comes from the data, not the
    description: not a served setting). `name_labels`: on those tasks, every description (system
    prompt and conditioning) ends with a sentence naming the labels (`generator.data.sni.add_label_names`).
    """
    times, failed = {}, []
    for row in rows:
        path = out / f"{row}.jsonl"
        if skip_done and path.is_file():
            continue
        try:
            times[row] = _run_row(row, tasks, path, device, oracles, train_task_names, max_rows, generator_ckpt,
                                  conditioning, seeds, all_tasks, progress, limit_instances,
                                  user_descriptions, system_prompt, steps, guidance, num_descriptions, blend,
                                  adapter_scale, label_choice, name_labels)
        except Exception:  # one broken row must not cost the others (a GPU call is precious)
            import traceback

            traceback.print_exc()
            failed.append(row)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if failed:
        raise RuntimeError(f"rows failed: {failed} (the others were written)")
    return times


def _run_row(row, tasks, path, device, oracles, train_task_names, max_rows, generator_ckpt, conditioning, seeds,
             all_tasks, progress, limit_instances, user_descriptions=None, system_prompt=False, steps=None,
             guidance=None, num_descriptions=NUM_DESCRIPTIONS, blend=None, adapter_scale=1.0,
             label_choice=False, name_labels=False) -> float:
    """Generate one row into `path`; returns its seconds."""
    t0 = time.perf_counter()
    model, tok, _ = load_base_model(device)
    budgets = {t.name: max_new_tokens(tok, t) for t in tasks}
    multi, extra = None, {}
    named = train_labels(tasks) if name_labels else {}
    if row == "base":
        prompts = input_prompts(tok, tasks)
    elif row == "system":
        prompts = system_prompts(tok, tasks, with_named_labels(eval_descriptions, named))
    elif row == "icl":
        prompts = icl_prompts(tok, tasks)
    elif row == "average":
        lib = load_adapters(oracles / "library")
        used = [lib[n] for n in train_task_names if n in lib]
        if not used:
            raise ValueError("the average LoRA needs the training tasks' oracles in <oracles>/library")
        merge_mean_delta(model, used[0].target, used)
        extra = {"averaged_adapters": len(used)}
        prompts = input_prompts(tok, tasks)
    elif row == "multitask":
        multi = multi_with(model, [LoRAAdapter.load_peft(oracles / "multitask")])
        prompts = input_prompts(tok, tasks, slot_of=lambda name, v: 0)
    elif row == "oracle":
        lib = load_adapters(oracles / "library", oracles / "held_out")
        names = [t.name for t in tasks if t.name in lib]
        missing = [t.name for t in tasks if t.name not in lib]
        if missing:
            print(f"oracle row: no oracle for {len(missing)} tasks, skipped: {missing[:5]}...", file=sys.stderr)
        multi = multi_with(model, [lib[n] for n in names])
        slot = {n: k for k, n in enumerate(names)}
        prompts = input_prompts(tok, [t for t in tasks if t.name in slot], slot_of=lambda name, v: slot[name])
    else:
        if generator_ckpt is None:
            raise ValueError(f"row {row!r} is not a baseline ({', '.join(BASELINE_ROWS)}); give --generator")
        cond = row_conditioning(row, conditioning)
        if user_descriptions is not None:
            lacking = [t.name for t in tasks if not user_descriptions.get(t.name)]
            if lacking:
                raise ValueError(f"no user-style descriptions for {len(lacking)} tasks, e.g. {lacking[:3]}")
        descriptions_of = descriptions_for(num_descriptions, user_descriptions, named if name_labels else None)
        all_tasks = all_tasks or {t.name: t for t in tasks}
        adapters, slot_of, text_of, extra = generated_adapters(
            generator_ckpt, tasks, cond, seeds, device, all_tasks, descriptions_of, steps, guidance,
            blend, [all_tasks[n] for n in train_task_names if n in all_tasks], adapter_scale)
        extra |= {"descriptions": "user" if user_descriptions is not None else "eval", "system_prompt": system_prompt}
        multi = multi_with(model, adapters)
        variants = lambda t: [f"d{j}s{s}" for s in seeds for j in range(len(descriptions_of(t)))]
        prompts = input_prompts(tok, tasks, slot_of=lambda name, v: slot_of[(name, v)], variants=variants,
                                system_of=(lambda name, v: text_of[(name, v)]) if system_prompt else (lambda n, v: None))
    if limit_instances is not None:
        prompts = [p for p in prompts if p.i < limit_instances]
    labels_of: dict[str, list[str]] = {}
    if label_choice:
        labels_of = train_labels(tasks)
        extra["label_choice"] = {"tasks": sorted(labels_of), "labels_from": "the task's training instances"}
    chosen = [k for k, p in enumerate(prompts) if p.task in labels_of]
    free = [k for k, p in enumerate(prompts) if p.task not in labels_of]
    preds = [""] * len(prompts)
    for k, pred in zip(free, generate(model, tok, [prompts[k] for k in free], budgets, multi, max_rows=max_rows,
                                      progress=progress, desc=row)):
        preds[k] = pred
    if chosen:
        for k, pred in zip(chosen, choose_labels(model, tok, [prompts[k] for k in chosen], labels_of, multi,
                                                 progress=progress)):
            preds[k] = pred
    if name_labels and (row == "system" or row not in BASELINE_ROWS):  # the rows whose prompts have a description
        extra["name_labels"] = {"tasks": sorted(named), "labels_from": "the task's training instances"}
    seconds = time.perf_counter() - t0
    write_row(path, run_meta(row, seconds=round(seconds, 1), prompts=len(prompts), **extra), prompts, preds)
    print(f"row {row}: {len(prompts)} answers in {seconds:.1f} s", file=sys.stderr, flush=True)
    return seconds
