"""Oracle LoRAs: one adapter per task, many tasks trained at once in one batched base model.

The prompt is the instance input alone in the base model's chat template (the task lives in the
adapter, not the prompt); the loss is cross-entropy on the output tokens (and the closing
`<|im_end|>`), averaged over a task's output tokens in its batch, as a stock peft run would.

Each task is a *job* with its own adapter slot in a `MultiLoRA` model. Every step draws
`batch_size` examples per job, packs all rows of all jobs into micro-batches of similar length
(gradient accumulation), and takes one AdamW step. AdamW is elementwise and clipping is per slot,
so a task's adapter is what training it alone would give (up to float rounding), and it depends
only on (seed, task name, its examples), not on which other tasks share the batch.

Output: a library root (`generator.data.library`): `library/<task>/` for the training tasks,
`held_out/<task>/` for validation and test tasks, optionally `multitask/`, and `oracles.json`
(each run's settings, adapters per minute and loss curves).

    python -m generator.training.oracles train --tasks data/sni/tasks --out runs/oracles --multitask

Resumable: tasks whose adapter folder is complete are skipped. `pack` / `unpack` move a library
as a few bf16 safetensors shards (how it travels back from the GPU machine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..adapter import LoRAAdapter
from ..arg_types import count, device, number
from ..base_model import load_base_model
from ..config import TargetSpec
from ..data import library
from ..data.sni import Task, load_splits, load_tasks, split_descriptions
from .multilora import MultiLoRA
from .prompts import microbatches, output_token_ce, task_examples

__all__ = ["OracleConfig", "Job", "train_adapters", "train_library"]

BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class OracleConfig:
    """Training settings (saved in oracles.json): LoRA r 8 on q_proj, v_proj, 100 steps x 16 at lr 5e-4."""

    rank: int = 8
    alpha: float = 16.0
    modules: tuple[str, ...] = ("q_proj", "v_proj")
    steps: int = 100
    batch_size: int = 16  # examples per task per step
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0  # then linear decay to 0 (the transformers Trainer default schedule)
    max_grad_norm: float = 1.0  # per adapter
    max_input_tokens: int = 384  # longer inputs are cut (keeps their beginning)
    max_output_tokens: int = 128
    seed: int = 0
    multitask_batch_size: int = 128  # examples per step for the multi-task LoRA
    # Every task's A starts from the same draw (seeded by `seed` alone). B starts at zero, so
    # adapters then differ only by what training wrote into them: a library a generator can
    # compress (the shared A0 is a bias it learns once), instead of one where most of each A
    # is that task's own random initialisation. False: A's init seeded by (seed, task name).
    shared_init: bool = True


@dataclass
class Job:
    """One adapter to train: its name (seeds its init and sampling) and (prompt ids, output ids) pairs."""

    name: str
    examples: list[tuple[list[int], list[int]]]
    batch_size: int


def _seed_of(*parts: object) -> int:
    return int(hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:15], 16)


# ------------------------------------------------------------------------------------------------
# Batched training


class _Sampler:
    """Epoch-wise shuffled draws of one job's examples, from its own seeded generator."""

    def __init__(self, n: int, seed: int):
        self.n, self.g, self.order, self.pos = n, torch.Generator().manual_seed(seed), [], 0

    def draw(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == len(self.order):
                self.order, self.pos = torch.randperm(self.n, generator=self.g).tolist(), 0
            take = min(k - len(out), len(self.order) - self.pos)
            out += self.order[self.pos : self.pos + take]
            self.pos += take
        return out


def train_adapters(
    model,
    jobs: Sequence[Job],
    target: TargetSpec,
    cfg: OracleConfig,
    tokens_per_microbatch: int = 16384,
    pad_id: int = 0,
    progress: bool = True,
) -> tuple[list[LoRAAdapter], dict]:
    """Train one LoRA per job, all at once; returns the adapters and stats (seconds, losses).

    `model` is the plain base model (it is wrapped here and unwrapped again before returning).
    """
    device = next(model.parameters()).device
    multi = MultiLoRA(model, target, len(jobs), dtype=torch.float32)
    try:
        for slot, job in enumerate(jobs):
            if not job.examples:
                raise ValueError(f"job {job.name!r} has no training examples")
            init_seed = _seed_of("init", cfg.seed) if cfg.shared_init else _seed_of("init", cfg.seed, job.name)
            multi.init_slot(slot, torch.Generator().manual_seed(init_seed))
        samplers = [_Sampler(len(j.examples), _seed_of("data", cfg.seed, j.name)) for j in jobs]
        params = multi.parameters()
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)

        def lr_at(step: int) -> float:
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        losses: list[list[float]] = []
        t0 = time.perf_counter()
        bar = tqdm(range(cfg.steps), desc=f"training {len(jobs)} adapters", disable=not progress)
        for step in bar:
            rows: list[tuple[int, list[int], int]] = []  # (slot, ids, prompt length)
            out_tokens = torch.zeros(len(jobs))
            for slot, (job, s) in enumerate(zip(jobs, samplers)):
                for i in s.draw(job.batch_size):
                    p, o = job.examples[i]
                    rows.append((slot, p + o, len(p)))
                    out_tokens[slot] += len(o)
            weight_of_slot = (1.0 / out_tokens).to(device)  # mean over the job's output tokens
            step_loss = torch.zeros(len(jobs), device=device)
            for group in microbatches([len(r[1]) for r in rows], tokens_per_microbatch):
                slots = torch.tensor([rows[i][0] for i in group], device=device)
                with multi.use(slots):
                    ce, b_idx_t = output_token_ce(model, [(rows[i][1], rows[i][2]) for i in group], pad_id)
                tok_slot = slots[b_idx_t]
                w = weight_of_slot[tok_slot]
                (ce * w).sum().backward()
                step_loss.index_add_(0, tok_slot, (ce * w).detach())
            multi.clip_grad_norm_per_slot_(cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step % 10 == 0 or step == cfg.steps - 1:
                sl = step_loss.cpu().tolist()
                losses.append(sl)
                bar.set_postfix(loss=f"{sum(sl) / len(sl):.3f}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        adapters = [multi.adapter(slot) for slot in range(len(jobs))]
    finally:
        multi.unload()
    return adapters, {"seconds": seconds, "loss_every_10_steps": losses, "jobs": [j.name for j in jobs]}


# ------------------------------------------------------------------------------------------------
# The library


def task_info(task: Task, split: str) -> tuple[list[str], dict]:
    """(descriptions.json, task.json) of a task's oracle folder.

    descriptions.json is what generators train on (the task's *train* descriptions); task.json
    keeps its split, the evaluation descriptions and the task's facts.
    """
    train_d, eval_d = split_descriptions(task)
    info = {
        "task": task.name,
        "split": split,
        "held_out": split != "train",
        "categories": list(task.categories),
        "definition": task.definition,
        "eval_descriptions": eval_d,
    }
    return train_d, info


def train_library(
    tasks_dir: str | Path,
    out: str | Path,
    cfg: OracleConfig,
    device: str = "cpu",
    only: Sequence[str] | None = None,
    group_size: int | None = None,
    tokens_per_microbatch: int | None = None,
    multitask: bool = False,
    splits_path: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train the oracles (and optionally the multi-task LoRA) into the library root `out`.

    Training tasks go to `library/`, validation and test tasks to `held_out/`; the multi-task
    LoRA trains on all training tasks. Adapters are written group by group (`group_size`
    adapters trained together), so an interrupted run keeps every finished group and a rerun
    trains only what is missing. Returns this run's summary (also appended to oracles.json).
    """
    tasks = load_tasks(tasks_dir, only)
    splits = load_splits(splits_path or tasks_dir)
    out = Path(out)
    config = {**asdict(cfg), "modules": list(cfg.modules)}
    before = [r.get("config") for r in library.read_summary(out).get("runs", []) if r.get("config")]
    if before and before[-1] != config:  # a rerun trains only the missing tasks: by the same recipe
        changed = sorted(k for k in config.keys() | before[-1].keys() if config.get(k) != before[-1].get(k))
        raise ValueError(f"{out} holds oracles trained with other settings ({', '.join(changed)} differ): "
                         "train into another folder, or rerun with the same settings to finish it")
    split_of = {t.name: splits.split_of(t.name) for t in tasks}
    folder_of = {
        t.name: out / (library.LIBRARY_DIR if split_of[t.name] == "train" else library.HELD_OUT_DIR) / t.name
        for t in tasks
    }
    todo = [t for t in tasks if not library.is_complete(folder_of[t.name])]
    want_multi = multitask and not library.is_complete_multitask(out / library.MULTITASK_DIR)
    if not todo and not want_multi:
        return {"tasks_trained": 0}

    torch.manual_seed(cfg.seed)
    model, tok, model_dir = load_base_model(device)
    target = TargetSpec.from_model(model_dir, cfg.modules, cfg.rank, cfg.alpha, base_model=BASE_MODEL_NAME)
    tpm = tokens_per_microbatch or (49152 if torch.device(device).type == "cuda" else 2048)

    train_names = [t.name for t in tasks if split_of[t.name] == "train"]
    need = {t.name for t in todo} | (set(train_names) if want_multi else set())
    examples_of = {
        t.name: task_examples(tok, t, cfg.max_input_tokens, cfg.max_output_tokens)
        for t in tqdm(tasks, desc="tokenising", disable=not progress) if t.name in need
    }
    jobs = [Job(t.name, examples_of[t.name], cfg.batch_size) for t in todo]
    if want_multi:
        examples = [e for n in train_names for e in examples_of[n]]
        jobs.append(Job(library.MULTITASK_DIR, examples, cfg.multitask_batch_size))
    size = group_size or len(jobs)
    seconds, stats = 0.0, []
    by_name = {t.name: t for t in tasks}
    for g in range(0, len(jobs), size):
        group = jobs[g : g + size]
        adapters, st = train_adapters(model, group, target, cfg, tpm, pad_id=tok.pad_token_id, progress=progress)
        seconds += st["seconds"]
        stats.append(st)
        for job, adapter in zip(group, adapters):
            if job.name == library.MULTITASK_DIR and job is jobs[-1] and want_multi:
                info = {"tasks": train_names, "steps": cfg.steps, "batch_size": cfg.multitask_batch_size,
                        "seed": cfg.seed}
                library.write_multitask(out / library.MULTITASK_DIR, adapter, info)
            else:
                descriptions, info = task_info(by_name[job.name], split_of[job.name])
                library.write_library_task(folder_of[job.name], adapter, descriptions, info)
    run = {
        "config": config,
        "device": _device_name(device),
        "tasks_trained": len(todo),
        "adapters_trained": len(jobs),
        "adapters_trained_together": min(size, len(jobs)),
        "train_seconds": round(seconds, 2),
        "adapters_per_minute": round(60.0 * len(jobs) / seconds, 1) if seconds > 0 else None,
        "loss_every_10_steps": {
            n: [round(row[i], 4) for row in st["loss_every_10_steps"]] for st in stats for i, n in enumerate(st["jobs"])
        },
    }
    library.append_run(out, run, target=target.to_dict(), held_out=sorted(splits.evaluation))
    return run


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


# ------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m generator.training.oracles", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the oracle library (resumes)")
    t.add_argument("--tasks", required=True, help="task folder (*.json); splits.json beside it")
    t.add_argument("--out", required=True, help="output root: library/, held_out/, multitask/, oracles.json")
    t.add_argument("--multitask", action="store_true", help="also train the multi-task LoRA on all training tasks")
    t.add_argument("--only", nargs="*", help="task names (default: all in the folder)")
    t.add_argument("--limit", type=count(1), help="only the first N tasks (dry runs)")
    t.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--group-size", type=count(1), help="adapters trained together (default: all)")
    t.add_argument("--tokens-per-microbatch", type=count(1))
    t.add_argument("--threads", type=count(1), default=1, help="CPU threads")
    for f in ("steps", "batch_size", "lr", "seed", "max_input_tokens", "multitask_batch_size", "rank"):
        kind = number(0.0, 1.0, above=True) if f == "lr" else count(0 if f == "seed" else 1)
        t.add_argument("--" + f.replace("_", "-"), type=kind, default=getattr(OracleConfig, f))
    t.add_argument("--per-task-init", action="store_true",
                   help="seed each task's A init by its name (default: one shared A init for all tasks)")
    p = sub.add_parser("pack", help="every adapter under a root -> bf16 shards")
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--shards", type=count(1), default=8)
    u = sub.add_parser("unpack", help="bf16 shards -> adapter folders under a root")
    u.add_argument("out")
    u.add_argument("shards", nargs="+")
    a = ap.parse_args(argv)
    try:
        _run(a)
    except (ValueError, OSError) as e:  # bad input: one line, not a traceback
        raise SystemExit(f"error: {e}") from None


def _run(a: argparse.Namespace) -> None:
    if a.cmd == "train":
        torch.set_num_threads(a.threads)
        cfg = OracleConfig(
            steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, max_input_tokens=a.max_input_tokens,
            multitask_batch_size=a.multitask_batch_size, rank=a.rank, alpha=2.0 * a.rank,
            shared_init=not a.per_task_init,
        )
        only = a.only
        if a.limit is not None:
            only = [x.name for x in load_tasks(a.tasks, only)][: a.limit]
        s = train_library(
            a.tasks, a.out, cfg, a.device, only, a.group_size, a.tokens_per_microbatch, a.multitask
        )
        print(json.dumps({k: v for k, v in s.items() if k != "loss_every_10_steps"}, indent=1))
    elif a.cmd == "pack":
        for path in library.pack_library(a.root, a.out, a.shards):
            print(path, f"{path.stat().st_size / 2**20:.1f} MiB")
    else:
        print(len(library.unpack_library(a.shards, a.out)), "adapters unpacked into", a.out)


if __name__ == "__main__":
    main()
