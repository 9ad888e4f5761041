"""Generators trained by supervised fine-tuning (SFT) through the base model (Text-to-LoRA, Sec. 3.2).

Instead of reconstructing library adapters, the generator's adapters are plugged into the frozen
base model and trained on the tasks' examples: each step draws `tasks_per_step` training tasks,
one *train* description of each (never an evaluation description) and `examples_per_task` of its
train instances; the generator turns the descriptions into factors, every example row uses its
task's factors (`MultiLoRA.use_factors`), and the loss is the output tokens' cross-entropy (the
mean over each task's output tokens, averaged over tasks), as for the oracles.

Both kinds train through their `sft_factors`, the factors exactly as generation makes them:
- T2L (T2L's SFT): the hypernetwork from scratch; its standardiser (the scale of the factors) is
  fitted to an oracle library, the only use of the library's weights.
- LoRAGen, "SFT on top of reconstruction": starts from a reconstruction-trained checkpoint
  (`init`) and trains its denoiser and LAE decoder through every DDIM step of the sampler it is
  served with (`sampler_steps`, `guidance`, from fresh noise each step). Needs no oracles, so it can
  train on every training task, also those without an oracle LoRA.
With `system_prompt`, each training prompt carries its description as the system prompt, as
`serve` sends it by default (the description beside the adapter).

Micro-batches: the factors are computed once per step; each micro-batch backpropagates into a
detached copy of them, and the summed factor gradients are then pushed through the generator in
one backward (the surrogate sum(factors * grad) has exactly that gradient).

The checkpoint is a normal generator (extra.training = "sft"), loaded and used like any other.

    python -m generator.training.sft --kind loragen --init generator/checkpoints/default --out runs/loragen_sft
    python -m generator.training.sft --kind t2l --library runs/oracles/library --out runs/t2l_sft
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..adapter import stack_adapters
from ..api import Generator, shared_encoder
from ..base_model import load_base_model
from ..config import T2LConfig, TargetSpec, TrainConfig
from ..data.library import load_library
from ..data.sni import Task, load_splits, load_tasks, split_descriptions, split_instances
from ..encoder import DescriptionEncoder
from ..models import build_model
from .multilora import MultiLoRA
from .oracles import OracleConfig
from .prompts import encode_example, microbatches, output_token_ce
from .train import TrainingRun, run_identity

__all__ = ["SFTConfig", "SFTTasks", "load_sft_tasks", "train_sft"]

DEFAULT_TASKS = Path(__file__).resolve().parents[2] / "data" / "sni" / "tasks"


@dataclass
class SFTConfig:
    """What an SFT step draws, the prompts, the sampler trained through, and micro-batching."""

    tasks_per_step: int = 32
    examples_per_task: int = 8
    tokens_per_microbatch: int = 32768
    system_prompt: bool = False  # the description as the system prompt of every training prompt
    sampler_steps: int = 20  # LoRAGen: DDIM steps trained through (the checkpoint is served with them)
    guidance: float = 2.0  # LoRAGen: classifier-free guidance scale, likewise


@dataclass
class SFTTasks:
    """The training tasks and their train descriptions, embedded."""

    tasks: list[Task]
    descriptions: list[str]
    cond: torch.Tensor  # (D, d_cond), one row per description
    desc_task: torch.Tensor  # (D,) index into `tasks`

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]


def load_sft_tasks(tasks_dir: str | Path, names: Sequence[str] | None, encoder: DescriptionEncoder) -> SFTTasks:
    """`names` (default: the folder's `train` split) with their train descriptions, embedded."""
    names = list(names) if names is not None else list(load_splits(tasks_dir).train)
    if not names:
        raise ValueError("SFT needs at least one training task")
    tasks = load_tasks(tasks_dir, names)
    per_task = [split_descriptions(t)[0] for t in tasks]
    empty = [t.name for t, d in zip(tasks, per_task) if not d]
    if empty:
        raise ValueError(f"tasks without a train description: {empty}")
    descriptions = [d for ds in per_task for d in ds]
    desc_task = torch.tensor([i for i, ds in enumerate(per_task) for _ in ds])
    return SFTTasks(tasks, descriptions, encoder.encode(descriptions), desc_task)


def _initial_model(
    kind: str, init: str | Path | None, library: str | Path | None, model_cfg: T2LConfig | None,
) -> tuple[torch.nn.Module, str, TargetSpec, dict[str, Any], str | None]:
    """(model, kind, target, configs, init fingerprint): from a checkpoint, or a T2L fitted to a library."""
    if init is not None:
        gen = Generator.load(init, cuda_graphs=False)
        if gen.kind != kind:
            raise ValueError(f"--init {init} is a {gen.kind} checkpoint, not {kind}")
        return gen.model, gen.kind, gen.target, gen.configs, gen.fingerprint
    if kind != "t2l":
        raise ValueError(f"SFT of {kind} starts from a reconstruction-trained checkpoint: give init")
    if library is None:
        raise ValueError("T2L from scratch needs an oracle library (its standardiser is fitted to it)")
    adapters = [t.adapter for t in load_library(library)]
    configs = {"t2l": (model_cfg or T2LConfig()).to_dict()}
    model = build_model("t2l", adapters[0].target, configs)
    model.standardizer.fit(*stack_adapters(adapters))
    return model, "t2l", adapters[0].target, configs, None


def train_sft(
    out: str | Path,
    kind: str = "t2l",
    tasks_dir: str | Path = DEFAULT_TASKS,
    names: Sequence[str] | None = None,
    init: str | Path | None = None,
    library: str | Path | None = None,
    model_cfg: T2LConfig | None = None,
    cfg: TrainConfig | None = None,
    sft: SFTConfig | None = None,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    max_seconds: float | None = None,
) -> Generator:
    """Train a generator by SFT on `names` (default: the train split) of `tasks_dir`.

    `init`: the checkpoint to start from (required for LoRAGen); `library`: the oracle library a
    T2L from scratch fits its standardiser to. With `max_seconds` (counted from this call, set-up
    included), training stops at the first step boundary after that long and the checkpoint is
    written from the weights so far (its `extra.stopped_at` says at which step); the training
    state stays, so `resume=True` continues.
    """
    started = time.monotonic()
    cfg, sft = cfg or TrainConfig(), sft or SFTConfig()
    torch.manual_seed(cfg.seed)
    model, kind, target, configs, init_fp = _initial_model(kind, init, library, model_cfg)
    model = model.to(device)
    data = load_sft_tasks(tasks_dir, names, shared_encoder(device))
    base, tok, _ = load_base_model(device)
    ocfg = OracleConfig()
    train_split = [split_instances(t)[0] for t in data.tasks]
    descs_of = [torch.nonzero(data.desc_task == i).flatten() for i in range(len(data.tasks))]
    sampler = ({"steps": sft.sampler_steps, "guidance": sft.guidance} if kind == "loragen"
               else model.sampler_defaults())
    identity = run_identity(kind, target, configs, cfg, data.names, len(data.descriptions)) | {
        "training": "sft", "sft": vars(sft), "init": init_fp}
    run = TrainingRun(f"{kind}_sft", Path(out), identity, resume, progress)
    multi = MultiLoRA(base, target, num_adapters=1)
    cond_all = data.cond.to(device)
    k = min(sft.tasks_per_step, len(data.tasks))

    def example(task: int, desc: int, i: int) -> tuple[list[int], int, int]:
        """(prompt + output ids, prompt length, output length) of train instance i of a task."""
        x = train_split[task][i]
        system = data.descriptions[desc] if sft.system_prompt else None
        p, o = encode_example(tok, x.input, x.outputs[0], ocfg.max_input_tokens, ocfg.max_output_tokens, system)
        return p + o, len(p), len(o)

    def step_fn(g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        chosen = torch.randperm(len(data.tasks), generator=g)[:k].tolist()
        desc_idx = [int(descs_of[t][torch.randint(len(descs_of[t]), (1,), generator=g)]) for t in chosen]
        A, B = model.sft_factors(cond_all[desc_idx], g, sampler["steps"], sampler["guidance"])
        # A[m]: (k, L, r, d_in), B[m]: (k, L, d_out, r)
        A_leaf = {m: a.detach().requires_grad_() for m, a in A.items()}
        B_leaf = {m: b.detach().requires_grad_() for m, b in B.items()}
        rows: list[tuple[int, list[int], int]] = []  # (position in `chosen`, ids, prompt length)
        out_tokens = torch.zeros(k)
        for j, (t, d) in enumerate(zip(chosen, desc_idx)):
            for i in torch.randint(len(train_split[t]), (sft.examples_per_task,), generator=g).tolist():
                ids, p_len, o_len = example(t, d, i)
                rows.append((j, ids, p_len))
                out_tokens[j] += o_len
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
        logs = run.loop(model, "sft", cfg.steps, model.sft_parameters(), cfg, step_fn, ["sft"])
    finally:
        multi.unload()
    gen = Generator(
        kind, target, model.cpu(), configs, sampler,
        extra={"training": "sft", "init": init_fp, "library": {"tasks": data.names}, "train": cfg.to_dict(),
               "sft": vars(sft), "final": logs, "stopped_at": run.stopped_at},
    )
    gen.save(out)
    if run.stopped_at is None:
        run.finish()
    return gen


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m generator.training.sft", description=__doc__.split("\n")[0])
    ap.add_argument("--kind", choices=("t2l", "loragen"), default="t2l")
    ap.add_argument("--init", help="checkpoint to start from (required for loragen: a reconstruction-trained one)")
    ap.add_argument("--library", help="oracle library (T2L from scratch: its standardiser is fitted to it)")
    ap.add_argument("--tasks", default=str(DEFAULT_TASKS), help="task folder (instances, descriptions, splits.json)")
    ap.add_argument("--tasks-file", help="train on the task names in this file (one per line; default: the train split)")
    ap.add_argument("--out", required=True, help="checkpoint folder")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks-per-step", type=int, default=SFTConfig.tasks_per_step)
    ap.add_argument("--examples-per-task", type=int, default=SFTConfig.examples_per_task)
    ap.add_argument("--tokens-per-microbatch", type=int, default=SFTConfig.tokens_per_microbatch)
    ap.add_argument("--system-prompt", action="store_true", help="the description as each training prompt's system prompt")
    ap.add_argument("--sampler-steps", type=int, default=SFTConfig.sampler_steps, help="loragen: DDIM steps")
    ap.add_argument("--guidance", type=float, default=SFTConfig.guidance, help="loragen: guidance scale")
    ap.add_argument("--checkpoint-every", type=int, default=200)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop early after this long and write the checkpoint so far (resumable)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    names = None
    if a.tasks_file:
        names = [n.strip() for n in Path(a.tasks_file).read_text().splitlines() if n.strip()]
    cfg = TrainConfig(steps=a.steps, lr=a.lr, seed=a.seed, checkpoint_every=a.checkpoint_every, batch_size=a.tasks_per_step)
    sft = SFTConfig(a.tasks_per_step, a.examples_per_task, a.tokens_per_microbatch, a.system_prompt,
                    a.sampler_steps, a.guidance)
    try:
        gen = train_sft(a.out, a.kind, a.tasks, names, a.init, a.library, cfg=cfg, sft=sft, device=a.device,
                        resume=a.resume, progress=not a.no_progress, max_seconds=a.max_seconds)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    stopped = gen.extra.get("stopped_at")
    note = f", stopped by --max-seconds at step {stopped} of {a.steps}" if stopped is not None else ""
    print(f"{a.kind} (SFT) checkpoint {a.out}: fingerprint {gen.fingerprint[:12]}, {gen.num_parameters} parameters{note}")


if __name__ == "__main__":
    main()
