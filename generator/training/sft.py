"""T2L trained by supervised fine-tuning (SFT) through the base model (Text-to-LoRA, Sec. 3.2).

Instead of reconstructing library adapters, the hypernetwork's adapters are plugged into the frozen
base model and trained on the tasks' examples: each step draws `tasks_per_step` training tasks,
one *train* description of each (never an evaluation description) and `examples_per_task` of its
train instances; the hypernetwork turns the descriptions into factors, every example row uses its
task's factors (`MultiLoRA.use_factors`), and the loss is the output tokens' cross-entropy (the
mean over each task's output tokens, averaged over tasks), as for the oracles.

Micro-batches: the factors are computed once per step; each micro-batch backpropagates into a
detached copy of them, and the summed factor gradients are then pushed through the hypernetwork
in one backward (the surrogate sum(factors * grad) has exactly that gradient).

The standardiser (scale of the factors) is fitted to the oracle library, the only use of the
library's weights; the checkpoint is a normal T2L generator (kind "t2l", extra.training = "sft"),
loaded and used like any other (`generator.Generator.load`).

    python -m generator.training.sft --tasks data/sni/tasks --library runs/oracles/library --out runs/t2l_sft
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..api import Generator, shared_encoder
from ..base_model import load_base_model
from ..config import T2LConfig, TrainConfig
from ..data.sni import load_tasks
from ..models import build_model
from .multilora import MultiLoRA
from .oracles import OracleConfig
from .prompts import microbatches, output_token_ce, task_examples
from .train import TrainingData, TrainingRun, load_training_data, run_identity

__all__ = ["SFTConfig", "train_t2l_sft"]


@dataclass
class SFTConfig:
    """What an SFT step draws, and micro-batching."""

    tasks_per_step: int = 32
    examples_per_task: int = 8
    tokens_per_microbatch: int = 32768


def _seed(*parts: object) -> int:
    return int(hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def train_t2l_sft(
    tasks_dir: str | Path,
    library: str | Path,
    out: str | Path,
    model_cfg: T2LConfig | None = None,
    cfg: TrainConfig | None = None,
    sft: SFTConfig | None = None,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    data: TrainingData | None = None,
    max_seconds: float | None = None,
) -> Generator:
    """Train T2L by SFT on the library's tasks (their train descriptions and train instances).

    With `max_seconds` (counted from this call, set-up included), training stops at the first
    step boundary after that long and the checkpoint is written from the weights so far (its
    `extra.stopped_at` says at which step); the training state stays, so `resume=True` continues.
    """
    started = time.monotonic()
    model_cfg, cfg, sft = model_cfg or T2LConfig(), cfg or TrainConfig(), sft or SFTConfig()
    torch.manual_seed(cfg.seed)
    # task names, train descriptions + embeddings (on the training device: ~19k descriptions), factors
    data = data or load_training_data(library, encoder=shared_encoder(device))
    base, tok, _ = load_base_model(device)
    tasks = load_tasks(tasks_dir, data.task_names)
    ocfg = OracleConfig()
    examples = [task_examples(tok, t, ocfg.max_input_tokens, ocfg.max_output_tokens) for t in tasks]
    descs_of = [torch.nonzero(data.desc_task == i).flatten() for i in range(data.num_tasks)]

    configs = {"t2l": model_cfg.to_dict()}
    model = build_model("t2l", data.target, configs).to(device)
    model.standardizer.fit({m: a.to(device) for m, a in data.A.items()}, {m: b.to(device) for m, b in data.B.items()})
    identity = run_identity("t2l", data.target, configs, cfg, data) | {"training": "sft", "sft": vars(sft)}
    run = TrainingRun("t2l_sft", Path(out), identity, resume, progress)
    multi = MultiLoRA(base, data.target, num_adapters=1)
    cond_all = data.cond.to(device)
    k = min(sft.tasks_per_step, data.num_tasks)

    def step_fn(g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        chosen = torch.randperm(data.num_tasks, generator=g)[:k].tolist()
        desc_idx = [int(descs_of[t][torch.randint(len(descs_of[t]), (1,), generator=g)]) for t in chosen]
        A, B = model.standardizer.denormalize(*model.hypernet(cond_all[desc_idx]))  # (k, L, r, d_in), (k, L, d_out, r)
        A_leaf = {m: a.detach().requires_grad_() for m, a in A.items()}
        B_leaf = {m: b.detach().requires_grad_() for m, b in B.items()}
        rows: list[tuple[int, list[int], int]] = []  # (position in `chosen`, ids, prompt length)
        out_tokens = torch.zeros(k)
        for j, t in enumerate(chosen):
            for i in torch.randint(len(examples[t]), (sft.examples_per_task,), generator=g).tolist():
                p, o = examples[t][i]
                rows.append((j, p + o, len(p)))
                out_tokens[j] += len(o)
        weight = (1.0 / (out_tokens * k)).to(device)  # mean over a task's tokens, then over tasks
        total = 0.0
        for group in microbatches([len(r[1]) for r in rows], sft.tokens_per_microbatch):
            which = torch.tensor([rows[i][0] for i in group], device=device)
            with multi.use_factors({m: a[which] for m, a in A_leaf.items()}, {m: b[which] for m, b in B_leaf.items()}):
                ce, row = output_token_ce(base, [(rows[i][1], rows[i][2]) for i in group], tok.pad_token_id)
            loss = (ce * weight[which[row]]).sum()
            loss.backward()
            total += float(loss.detach())
        surrogate = sum((A[m] * A_leaf[m].grad).sum() + (B[m] * B_leaf[m].grad).sum() for m in A)
        return surrogate, {"sft_loss": total}

    run.stop_after(None if max_seconds is None else max_seconds - (time.monotonic() - started))
    try:
        logs = run.loop(model, "t2l", cfg.steps, list(model.hypernet.parameters()), cfg, step_fn, ["t2l"])
    finally:
        multi.unload()
    gen = Generator(
        "t2l", data.target, model.cpu(), configs, model.sampler_defaults(),
        extra={"training": "sft", "library": {"tasks": data.task_names}, "train": cfg.to_dict(), "sft": vars(sft),
               "final": logs, "stopped_at": run.stopped_at},
    )
    gen.save(out)
    if run.stopped_at is None:
        run.finish()
    return gen


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m generator.training.sft", description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", required=True, help="task folder (instances)")
    ap.add_argument("--library", required=True, help="oracle library of the training tasks (descriptions, standardiser)")
    ap.add_argument("--out", required=True, help="checkpoint folder")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks-per-step", type=int, default=SFTConfig.tasks_per_step)
    ap.add_argument("--examples-per-task", type=int, default=SFTConfig.examples_per_task)
    ap.add_argument("--tokens-per-microbatch", type=int, default=SFTConfig.tokens_per_microbatch)
    ap.add_argument("--checkpoint-every", type=int, default=200)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop early after this long and write the checkpoint so far (resumable)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = TrainConfig(steps=a.steps, lr=a.lr, seed=a.seed, checkpoint_every=a.checkpoint_every, batch_size=a.tasks_per_step)
    sft = SFTConfig(a.tasks_per_step, a.examples_per_task, a.tokens_per_microbatch)
    gen = train_t2l_sft(a.tasks, a.library, a.out, cfg=cfg, sft=sft, device=a.device, resume=a.resume,
                         max_seconds=a.max_seconds)
    stopped = gen.extra.get("stopped_at")
    note = f", stopped by --max-seconds at step {stopped} of {a.steps}" if stopped is not None else ""
    print(f"T2L (SFT) checkpoint {a.out}: fingerprint {gen.fingerprint[:12]}, {gen.num_parameters} parameters{note}")


if __name__ == "__main__":
    main()
