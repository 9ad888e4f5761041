"""Oracle LoRAs: one adapter per task, many tasks trained at once in one batched base model.

The prompt is the instance input alone in the base model's chat template (the task lives in the
adapter, not the prompt); the loss is cross-entropy on the output tokens (and the closing
`<|im_end|>`), averaged over a task's output tokens in its batch, as a stock peft run would.

Each task is a *job* with its own adapter slot in a `MultiLoRA` model. Every step draws
`batch_size` examples per job, packs all rows of all jobs into micro-batches of similar length
(gradient accumulation), and takes one AdamW step. AdamW is elementwise and clipping is per slot,
so a task's adapter is what training it alone would give (up to float rounding), and it depends
only on (seed, task name, its examples), not on which other tasks share the batch.

Output: a *library* folder, one sub-folder per task with a PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`) and `descriptions.json`, plus `library.json` (the run's config and
adapters per minute). Optionally one multi-task LoRA trained on all training tasks together.

    python -m generator.oracle train --tasks data/sni/tasks --out runs/library --multitask-out runs/multitask

Resumable: tasks whose adapter folder is complete are skipped. `pack` / `unpack` move a library
as a few bf16 safetensors shards (how it travels back from the GPU machine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAAdapter, write_peft_files
from .config import TargetSpec
from .multilora import MultiLoRA
from .sni import Task, chat_messages, load_splits, load_tasks, split_descriptions, split_instances

__all__ = [
    "OracleConfig",
    "Job",
    "load_base_model",
    "encode_example",
    "output_token_ce",
    "train_adapters",
    "train_library",
    "load_adapters",
    "pack_library",
    "unpack_library",
]

DESCRIPTIONS_FILE = "descriptions.json"
TASK_FILE = "task.json"
SUMMARY_FILE = "oracles.json"
LIBRARY_DIR, HELD_OUT_DIR, MULTITASK = "library", "held_out", "multitask"
BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class OracleConfig:
    """Training settings (saved in library.json). Defaults: the calibration run of the issue."""

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


def default_dtype(device: str | torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_base_model(device: str = "cpu", dtype: torch.dtype | None = None, model_dir: str | Path | None = None):
    """(model, tokenizer, model_dir) for SmolLM2 via `generator.base_model.ensure_base_model()`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .base_model import ensure_base_model

    model_dir = Path(model_dir) if model_dir else ensure_base_model()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype or default_dtype(device))
    model.to(device).eval()
    return model, tok, model_dir


def truncate_text(tokenizer, text: str, max_tokens: int) -> str:
    """`text` cut to its first `max_tokens` tokens (unchanged when shorter)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat prompt ending with the assistant header."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_example(tokenizer, input_text: str, output: str, cfg: OracleConfig) -> tuple[list[int], list[int]]:
    """(prompt ids, output ids + eos) for one instance, input alone in the chat template."""
    p = prompt_ids(tokenizer, chat_messages(truncate_text(tokenizer, input_text, cfg.max_input_tokens)))
    o = tokenizer(output, add_special_tokens=False)["input_ids"][: cfg.max_output_tokens - 1]
    return p, o + [tokenizer.eos_token_id]


def task_examples(tokenizer, task: Task, cfg: OracleConfig) -> list[tuple[list[int], list[int]]]:
    """A task's training examples (its train split; the first accepted output is the target)."""
    train, _ = split_instances(task)
    return [encode_example(tokenizer, x.input, x.outputs[0], cfg) for x in train]


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


def _microbatches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices grouped by similar length, each group's rows x longest row <= max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups, cur, longest = [], [], 0
    for i in order:
        L = max(longest, lengths[i])
        if cur and L * (len(cur) + 1) > max_tokens:
            groups.append(cur)
            cur, L = [], lengths[i]
        cur.append(i)
        longest = L
    if cur:
        groups.append(cur)
    return groups


def output_token_ce(model, seqs: Sequence[tuple[list[int], int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every output token of right-padded sequences, and the row of each token.

    seqs: (token ids, prompt length) per row; tokens after the prompt are the outputs. Logits are
    computed only where an output token is predicted (the vocabulary is large, outputs are short).
    Returns ce (n_out,), row (n_out,) on the model's device.
    """
    device = next(model.parameters()).device
    S = max(len(seq) for seq, _ in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), S), dtype=torch.long)
    rows, pos, tgt = [], [], []
    for b, (seq, P) in enumerate(seqs):
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        rows += [b] * (len(seq) - P)
        pos += range(P - 1, len(seq) - 1)  # the hidden state at t predicts token t + 1
        tgt += seq[P:]
    rows_t, pos_t = torch.tensor(rows, device=device), torch.tensor(pos, device=device)
    hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[rows_t, pos_t]).float()  # (n_out, vocab)
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor(tgt, device=device), reduction="none")
    return ce, rows_t


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
            for group in _microbatches([len(r[1]) for r in rows], tokens_per_microbatch):
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
        _unwrap(model, multi)
    return adapters, {"seconds": seconds, "loss_every_10_steps": losses, "jobs": [j.name for j in jobs]}


def _unwrap(model, multi: MultiLoRA) -> None:
    """Put the plain linear layers back (the model is the base model again)."""
    for (m, layer), lin in multi.layers.items():
        parent_path, _, leaf = multi.target.path(m, layer).rpartition(".")
        setattr(model.get_submodule(parent_path), leaf, lin.base)


# ------------------------------------------------------------------------------------------------
# The library


def task_entry(task: Task, held_out: bool) -> tuple[list[str], dict]:
    """(descriptions.json, task.json) of a library task.

    descriptions.json is what generators train on (generator.library's format: a JSON list of the
    task's *train* descriptions); task.json keeps the evaluation descriptions and the task's facts.
    """
    train_d, eval_d = split_descriptions(task)
    info = {
        "task": task.name,
        "held_out": held_out,
        "categories": list(task.categories),
        "definition": task.definition,
        "eval_descriptions": eval_d,
    }
    return train_d, info


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DESCRIPTIONS_FILE))


def _write_task(folder: Path, adapter: LoRAAdapter, entry: tuple[list[str], dict]) -> None:
    adapter.save_peft(folder)
    write_peft_files({TASK_FILE: json.dumps(entry[1], indent=1).encode()}, folder)
    write_peft_files({DESCRIPTIONS_FILE: json.dumps(entry[0], indent=1).encode()}, folder)  # last: marks complete


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
    """Train the oracles (and optionally the multi-task LoRA) into `out`; returns this run's summary.

    Layout of `out`: `library/<task>/` (training tasks: what generators train on),
    `held_out/<task>/` (held-out tasks' oracles: for the table only), `multitask/` (one adapter
    trained on all training tasks), `oracles.json` (settings, adapters per minute, losses).
    """
    tasks = load_tasks(tasks_dir, only)
    splits = load_splits(splits_path or tasks_dir)
    held = set(splits.held_out)
    out = Path(out)
    folder_of = {t.name: out / (HELD_OUT_DIR if t.name in held else LIBRARY_DIR) / t.name for t in tasks}
    todo = [t for t in tasks if not _complete(folder_of[t.name])]
    want_multi = multitask and not _complete_multi(out / MULTITASK)
    if not todo and not want_multi:
        return {"tasks_trained": 0}

    torch.manual_seed(cfg.seed)
    model, tok, model_dir = load_base_model(device)
    target = TargetSpec.from_model(model_dir, cfg.modules, cfg.rank, cfg.alpha, base_model=BASE_MODEL_NAME)
    tpm = tokens_per_microbatch or (49152 if torch.device(device).type == "cuda" else 2048)

    train_names = [t.name for t in tasks if t.name not in held]
    need = {t.name for t in todo} | (set(train_names) if want_multi else set())
    examples_of = {t.name: task_examples(tok, t, cfg) for t in tqdm(tasks, desc="tokenising", disable=not progress) if t.name in need}
    jobs = [Job(t.name, examples_of[t.name], cfg.batch_size) for t in todo]
    if want_multi:
        jobs.append(Job(MULTITASK, [e for n in train_names for e in examples_of[n]], cfg.multitask_batch_size))
    size = group_size or len(jobs)
    seconds, stats = 0.0, []
    by_name = {t.name: t for t in tasks}
    for g in range(0, len(jobs), size):
        group = jobs[g : g + size]
        adapters, st = train_adapters(model, group, target, cfg, tpm, pad_id=tok.pad_token_id, progress=progress)
        seconds += st["seconds"]
        stats.append(st)
        for job, adapter in zip(group, adapters):
            if job.name == MULTITASK:
                _write_multitask(out / MULTITASK, adapter, train_names, cfg)
            else:
                _write_task(folder_of[job.name], adapter, task_entry(by_name[job.name], job.name in held))
    run = {
        "config": {**asdict(cfg), "modules": list(cfg.modules)},
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
    summary_path = out / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"runs": []}
    summary.update({"target": target.to_dict(), "held_out": sorted(held)})
    summary["runs"].append(run)
    summary_path.write_text(json.dumps(summary, indent=1))
    return run


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def _complete_multi(folder: Path) -> bool:
    return all((folder / f).is_file() for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "multitask.json"))


def _write_multitask(folder: Path, adapter: LoRAAdapter, task_names: list[str], cfg: OracleConfig) -> None:
    adapter.save_peft(folder)
    info = {"tasks": task_names, "steps": cfg.steps, "batch_size": cfg.multitask_batch_size, "seed": cfg.seed}
    write_peft_files({"multitask.json": json.dumps(info, indent=1).encode()}, folder)


def load_adapters(*folders: str | Path) -> dict[str, LoRAAdapter]:
    """{task name: adapter} for every complete task folder (adapter + descriptions.json) of the folders."""
    out: dict[str, LoRAAdapter] = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise FileNotFoundError(f"library folder {folder} not found")
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and _complete(p)):
            if sub.name in out:
                raise ValueError(f"task {sub.name!r} occurs in two library folders")
            out[sub.name] = LoRAAdapter.load_peft(sub)
    return out


# ------------------------------------------------------------------------------------------------
# Transport: a library as a few bf16 shards


def pack_library(root: str | Path, out: str | Path, num_shards: int) -> list[Path]:
    """Write every adapter folder under `root` as `num_shards` bf16 safetensors files in `out`.

    Keys are the folders' paths relative to `root` (e.g. `library/task1146_country_capital`); each
    shard's metadata holds, per adapter, its target and side files (descriptions.json, ...); shard 0
    also carries `root`'s summary file.
    """
    from safetensors.torch import save_file

    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    subs = sorted(p.parent for p in root.rglob(ADAPTER_WEIGHTS))
    paths = []
    for k in range(num_shards):
        tensors, meta = {}, {}
        for sub in subs[k::num_shards]:
            a = LoRAAdapter.load_peft(sub)
            key = sub.relative_to(root).as_posix()
            for m in a.target.modules:
                tensors[f"{key}/{m}/A"] = a.A[m].to(torch.bfloat16).contiguous()
                tensors[f"{key}/{m}/B"] = a.B[m].to(torch.bfloat16).contiguous()
            side = {p.name: p.read_text() for p in sub.iterdir() if p.suffix == ".json" and p.name != ADAPTER_CONFIG}
            meta[key] = json.dumps({"target": a.target.to_dict(), "files": side})
        metadata = {"adapters": json.dumps(meta)}
        if k == 0 and (root / SUMMARY_FILE).is_file():
            metadata[SUMMARY_FILE] = (root / SUMMARY_FILE).read_text()
        path = out / f"oracles-{k:02d}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        paths.append(path)
    return paths


def unpack_library(shards: Sequence[str | Path], out: str | Path) -> list[str]:
    """Rebuild the adapter folders of `pack_library` shards under `out`; returns their keys."""
    from safetensors import safe_open

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            metadata = f.metadata()
            if SUMMARY_FILE in metadata:
                (out / SUMMARY_FILE).write_text(metadata[SUMMARY_FILE])
            for key, info in json.loads(metadata["adapters"]).items():
                if key.startswith("/") or ".." in key.split("/"):
                    raise ValueError(f"bad adapter key {key!r} in {shard}")
                info = json.loads(info)
                target = TargetSpec.from_dict(info["target"])
                A = {m: f.get_tensor(f"{key}/{m}/A").float() for m in target.modules}
                B = {m: f.get_tensor(f"{key}/{m}/B").float() for m in target.modules}
                dest = out / key
                LoRAAdapter(target, A, B).save_peft(dest)
                side = dict(info["files"])
                last = side.pop(DESCRIPTIONS_FILE, None)
                write_peft_files({n: t.encode() for n, t in side.items()}, dest)
                if last is not None:
                    write_peft_files({DESCRIPTIONS_FILE: last.encode()}, dest)
                names.append(key)
    return names


# ------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m generator.oracle", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the oracle library (resumes)")
    t.add_argument("--tasks", required=True, help="task folder (*.json); splits.json beside it")
    t.add_argument("--out", required=True, help="output root: library/, held_out/, multitask/, oracles.json")
    t.add_argument("--multitask", action="store_true", help="also train the multi-task LoRA on all training tasks")
    t.add_argument("--only", nargs="*", help="task names (default: all in the folder)")
    t.add_argument("--limit", type=int, help="only the first N tasks (dry runs)")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--group-size", type=int, help="adapters trained together (default: all)")
    t.add_argument("--tokens-per-microbatch", type=int)
    t.add_argument("--threads", type=int, default=1, help="CPU threads")
    for f in ("steps", "batch_size", "lr", "seed", "max_input_tokens", "multitask_batch_size", "rank"):
        t.add_argument("--" + f.replace("_", "-"), type=type(getattr(OracleConfig, f)), default=getattr(OracleConfig, f))
    t.add_argument("--per-task-init", action="store_true",
                   help="seed each task's A init by its name (default: one shared A init for all tasks)")
    p = sub.add_parser("pack", help="every adapter under a root -> bf16 shards")
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--shards", type=int, default=8)
    u = sub.add_parser("unpack", help="bf16 shards -> adapter folders under a root")
    u.add_argument("out")
    u.add_argument("shards", nargs="+")
    a = ap.parse_args(argv)
    if a.cmd == "train":
        torch.set_num_threads(a.threads)
        cfg = OracleConfig(
            steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, max_input_tokens=a.max_input_tokens,
            multitask_batch_size=a.multitask_batch_size, rank=a.rank, alpha=2.0 * a.rank,
            shared_init=not a.per_task_init,
        )
        only = a.only
        if a.limit:
            only = [x.name for x in load_tasks(a.tasks, only)][: a.limit]
        s = train_library(
            a.tasks, a.out, cfg, a.device, only, a.group_size, a.tokens_per_microbatch, a.multitask
        )
        print(json.dumps({k: v for k, v in s.items() if k != "loss_every_10_steps"}, indent=1))
    elif a.cmd == "pack":
        for path in pack_library(a.root, a.out, a.shards):
            print(path, f"{path.stat().st_size / 2**20:.1f} MiB")
    else:
        print(len(unpack_library(a.shards, a.out)), "adapters unpacked into", a.out)


if __name__ == "__main__":
    main()
