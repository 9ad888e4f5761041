"""How much a generator's conditioning carries over to unseen tasks, in nats (`ce-gap`; no GPU needed).

For a checkpoint, on some of the tasks it trained on and on validation tasks: the mean
output-token cross-entropy of each task's examples under the adapter generated from the task's
description, under the adapter generated from a random string of the same length, and under the
base model alone, the description as the system prompt in all three (`generator.training.probe`).
The gap right vs random is what the description adds through the adapter; a generator that only
memorised its training descriptions shows a large gap on training tasks and none on unseen ones.

    python -m benchmarks.quality ce-gap --generator generator/checkpoints/default --tasks data/sni/tasks \
        --out benchmarks/results/quality_ce_gap
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import sys
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from benchmarks.provenance import git_commit
from generator.api import Generator, shared_encoder
from generator.base_model import load_base_model
from generator.data.sni import Task, TaskSplits, split_descriptions
from generator.training.multilora import MultiLoRA
from generator.training.probe import ProbeSet, conditioned_ce, probe_set
from generator.training.prompts import microbatches, output_token_ce

__all__ = ["ce_gap", "pick_tasks"]


def pick_tasks(tasks: Sequence[Task], names: Sequence[str], n: int) -> list[Task]:
    """The first `n` of `names` in sha256 order of the name (a fixed, unbiased draw)."""
    by_name = {t.name: t for t in tasks}
    missing = [x for x in names if x not in by_name]
    if missing:
        raise ValueError(f"tasks not in the task folder: {missing[:5]}")
    chosen = sorted(names, key=lambda x: hashlib.sha256(f"ce-gap\x00{x}".encode()).hexdigest())[:n]
    return [by_name[x] for x in chosen]


def embedding_spread(tasks: Sequence[Task], encoder, per_task: int = 10) -> dict[str, float]:
    """How far apart the encoder puts descriptions: mean cosine between two descriptions of one task
    and between a description and the nearest description of another of these tasks."""
    descs, owner = [], []
    for i, t in enumerate(tasks):
        d = split_descriptions(t)[1][:per_task]
        descs += d
        owner += [i] * len(d)
    e = encoder.encode(descs)
    sim, own = e @ e.T, torch.tensor(owner)
    same = own[:, None] == own[None, :]
    intra = sim[same & ~torch.eye(len(descs), dtype=torch.bool)]
    nearest_other = sim.masked_fill(same, -2.0).max(dim=1).values
    return {"cosine_same_task": round(float(intra.mean()), 4), "cosine_nearest_other_task": round(float(nearest_other.mean()), 4)}


@torch.no_grad()
def _base_ce(base: torch.nn.Module, probe: ProbeSet, pad_id: int) -> torch.Tensor:
    """(k,) each task's mean output-token CE under the base model alone."""
    rows = [(j, seq) for j, seqs in enumerate(probe.seqs) for seq in seqs]
    sums, counts = torch.zeros(len(probe.seqs)), torch.zeros(len(probe.seqs))
    for group in microbatches([len(r[1][0]) for r in rows], 32768):
        which = torch.tensor([rows[i][0] for i in group])
        ce, row = output_token_ce(base, [rows[i][1] for i in group], pad_id)
        sums.index_add_(0, which[row.cpu()], ce.float().cpu())
        counts.index_add_(0, which[row.cpu()], torch.ones(len(ce)))
    return sums / counts


def ce_gap(
    generator: str | Path, tasks: Sequence[Task], splits: TaskSplits, num_tasks: int = 16, examples: int = 4,
    steps: int | None = None, guidance: float | None = None, device: str = "cpu",
) -> dict:
    """The measurement on the checkpoint's training tasks and on validation tasks (see the module)."""
    gen = Generator.load(generator, cuda_graphs=False)
    trained = list(gen.extra.get("library", {}).get("tasks") or splits.train)
    sampler = {**gen.sampler, **({"steps": steps} if steps else {}), **({"guidance": guidance} if guidance else {})}
    base, tok, _ = load_base_model(device)  # float32 on a CPU, bf16 on CUDA, as SFT trains
    encoder = shared_encoder(device)
    model = gen.model.to(device).eval()
    sets = {"train": (pick_tasks(tasks, trained, num_tasks), False),
            "validation": (pick_tasks(tasks, splits.validation, num_tasks), True)}
    probes = {k: probe_set(ts, tok, encoder, examples, system_prompt=True, held_out=held) for k, (ts, held) in sets.items()}
    bar = tqdm(total=3 * len(probes), desc="ce-gap (base, right, random per set)")
    base_ce = {}
    for k, p in probes.items():
        base_ce[k] = _base_ce(base, p, tok.pad_token_id)
        bar.update()
    multi = MultiLoRA(base, gen.target, num_adapters=1)
    out: dict = {"generator": str(generator), "fingerprint": gen.fingerprint, "sampler": sampler,
                 "examples_per_task": examples, "sets": {}}
    try:
        for name, p in probes.items():
            right = conditioned_ce(model, sampler, p.cond, p, base, multi, tok.pad_token_id)
            bar.update()
            rand = conditioned_ce(model, sampler, p.control_cond, p, base, multi, tok.pad_token_id)
            bar.update()
            out["sets"][name] = {
                "instances": "train" if name == "train" else "test",
                "ce_right": round(float(right.mean()), 4), "ce_random": round(float(rand.mean()), 4),
                "ce_base": round(float(base_ce[name].mean()), 4), "gap": round(float((rand - right).mean()), 4),
                "tasks_gap_over_half_nat": int(((rand - right) > 0.5).sum()),
                "embeddings": embedding_spread(sets[name][0], encoder),
                "tasks": {t: {"right": round(float(a), 4), "random": round(float(b), 4), "base": round(float(c), 4)}
                          for t, a, b, c in zip(p.names, right, rand, base_ce[name])},
            }
    finally:
        multi.unload()
        bar.close()
    out.update(command=" ".join(["python", "-m", "benchmarks.quality"] + sys.argv[1:]), commit=git_commit() or "unknown",
               machine=torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.node(),
               date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"))
    return out


def write(result: dict, stem: str | Path) -> list[Path]:
    """<stem>.json and a short <stem>.md."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    j, m = stem.with_suffix(".json"), stem.with_suffix(".md")
    j.write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# What the description adds through the adapter (generator {result['fingerprint'][:12]})", "",
        "Mean output-token cross-entropy (nats) of each task's examples, the description as the system prompt "
        "throughout: under the adapter generated from the task's description (*right*), from a random string "
        "of the same length (*random*), and the base model alone. *Gap* = random - right: what the description "
        f"adds through the adapter. Sampler: {result['sampler']}; examples per task: {result['examples_per_task']}.", "",
        "| set | examples | tasks | right | random | base | gap | tasks with gap > 0.5 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in result["sets"].items():
        lines.append(f"| {name} | {s['instances']} instances | {len(s['tasks'])} | {s['ce_right']:.3f} | "
                     f"{s['ce_random']:.3f} | {s['ce_base']:.3f} | {s['gap']:+.3f} | {s['tasks_gap_over_half_nat']} |")
    lines += ["", "Description embeddings (the encoder's cosine, up to 10 evaluation descriptions per task): "
              + "; ".join(f"{name}: two descriptions of one task {s['embeddings']['cosine_same_task']:.3f}, a description "
                          f"and the nearest of another task {s['embeddings']['cosine_nearest_other_task']:.3f}"
                          for name, s in result["sets"].items()) + "."]
    lines += ["", f"`{result['command']}` at commit `{result['commit']}` on {result['machine']}, {result['date']}.", ""]
    m.write_text("\n".join(lines))
    return [j, m]
