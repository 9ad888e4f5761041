"""Generators trained by supervised fine-tuning (SFT) through the base model (Text-to-LoRA, Sec. 3.2).

Instead of reconstructing library adapters, the generator's adapters are plugged into the frozen
base model and trained on the tasks' examples: each step draws `tasks_per_step` training tasks,
one *train* description of each (never an evaluation description) and `examples_per_task` of its
train instances; the generator turns the descriptions into factors, every example row uses its
task's factors (`MultiLoRA.use_factors`), and the loss is the output tokens' cross-entropy (the
mean over each task's output tokens, averaged over tasks), as for the oracles.

Both kinds train through their `sft_factors`, the factors exactly as generation makes them:
- T2L (T2L's SFT): the hypernetwork from scratch; its standardiser (the scale of the factors) is
  fitted to an oracle library, the only use of the library's weights, or copied from a generator
  checkpoint trained on one (`stats_from`: a LoRAGen's LAE keeps the same statistics), so that a
  T2L can be trained by SFT where no oracle library is at hand.
- LoRAGen, "SFT on top of reconstruction": starts from a reconstruction-trained checkpoint
  (`init`) and trains its denoiser and LAE decoder through every DDIM step of the sampler it is
  served with (`sampler_steps`, `guidance`, from fresh noise each step). Needs no oracles, so it can
  train on every training task, also those without an oracle LoRA.
With `system_prompt`, each training prompt carries its description as the system prompt, as
`serve` sends it by default (the description beside the adapter).

Contrastive term (`contrast_weight` > 0). Plain SFT can lower the loss by making every adapter a
better generic instruction follower whatever the description; the term makes the adapter depend on
it. Each task j of a step is also scored under the factors of another task of the same step,
pi(j) = j + 1 mod k (a derangement: the step's tasks are a random draw, so the pairing is random
too), with the same prompts (only the adapter is swapped: a wrong system prompt would be a gap the
frozen base model gives for free). With CE_j(i) the mean cross-entropy of task j's output tokens
under the factors of description i:

    loss = 1/k sum_j [ CE_j(j) + contrast_weight * max(0, contrast_margin + CE_j(j) - CE_j(pi(j))) ]

A hinge with a margin, not the unbounded difference CE_j(j) - CE_j(pi(j)): once the right
description wins by the margin, the term stops pushing, so it cannot be lowered by making the
adapters of wrong descriptions arbitrarily bad (an unbounded term would dominate the SFT loss). One
negative per task (rather than a softmax over all k descriptions) costs one more base-model
forward and backward over the examples; the wrong factors are the step's factors permuted, so no
extra generator pass. The gradient reaches the generator through both assignments: CE_j(pi(j))
moves the factors of pi(j)'s description.

Micro-batches: the factors are computed once per step; each micro-batch backpropagates into a
detached copy of them, and the summed factor gradients are then pushed through the generator in
one backward (the surrogate sum(factors * grad) has exactly that gradient). With the contrastive
term, each assignment (right, wrong) backpropagates into its own copy, indexed by task; the hinge
needs every micro-batch's CE before it is known which tasks it is active for, so each task's two
gradients are scaled afterwards (1 + contrast_weight and -contrast_weight where active, 1 and 0
where not), which is exactly the gradient of the loss above.

Conditioning noise (`cond_noise` = s > 0): each step's description embeddings (unit vectors) are
replaced by normalize(c + s * n / sqrt(d)), n ~ N(0, I): a cosine of about 1 / sqrt(1 + s^2) to the
clean embedding, so the generator is trained on a neighbourhood of each training description rather
than on the point; descriptions of unseen tasks land between the training points, where plain SFT
has no reason to make the adapter depend on them (see `probe`: on the shipped checkpoint the right
description's adapter beats a random string's by 1.08 nats per output token on training tasks and
by 0.41 on validation tasks). The encoder puts two descriptions of one task at a cosine of 0.62 and
a description and the nearest description of another task at 0.54-0.59, so tasks are close
neighbours; s = 0.75 (cosine 0.8) stays inside a task's own spread.

Named labels (`name_labels` = p > 0): the issue's reading of the answers, counted by
`benchmarks.quality labels`, is that adapters of unseen tasks answer in training tasks' formats;
few descriptions name their labels, and nothing in training asks the generator to honour labels
that a description does name. With probability p, the description drawn for a task with a closed
label set (`generator.data.sni.train_labels`: those of its train instances) is replaced by the same
description with its labels named (`add_label_names`: ``... Answer with one of: "NEG", "POS".``),
for the generator's conditioning and, with `system_prompt`, the system prompt alike. Tasks
without a closed label set are drawn as before.

User-style descriptions (`user_style` = p > 0): the train descriptions are T2L's paraphrases of a
task's definition (long, formal: "Your responsibility is to capture essential terms that relate to
organism substances ..."); users type one short sentence ("Find the organism substance named in
the sentence."), and descriptions of that kind score differently on unseen tasks (the quality
table's user-style rows). With probability p, the description drawn for a task that has
user-style descriptions (`splits.json`'s `user_descriptions`, two per training task) is replaced by
one of them, drawn uniformly, for the conditioning and the system prompt alike. Drawn after the
named-labels draw, so that p = 0 leaves the random stream of earlier runs unchanged. Measured on
validation (2026-12-07, `benchmarks/results/quality_user_style.md`): p = 0.5 did not lift EM with
user-style descriptions (16.16 against 15.97 in the shipped recipe) and cost some with T2L's.

The probe (`probe_tasks`, `probe_every`): every that many steps, and at the last, the mean
output-token CE of held-out tasks' test examples under their descriptions' adapters and under
random strings' (`generator.training.probe`), printed and appended to `<out>/probe.jsonl`: whether
SFT still moves what matters on tasks it never trains on, step by step.

Snapshots (`snapshots`): at those steps a generator checkpoint of the weights so far is also written
to `<out>/snapshots/sft-<step>/` (served with the run's sampler), so that the SFT step count can be
chosen on validation from one run (quality against SFT steps).

The checkpoint is a normal generator (extra.training = "sft"), loaded and used like any other.

    python -m generator.training.sft --kind loragen --init generator/checkpoints/default --out runs/loragen_sft
    python -m generator.training.sft --kind t2l --library runs/oracles/library --out runs/t2l_sft
    python -m generator.training.sft --kind t2l --stats-from generator/checkpoints/default --out runs/t2l_sft
    python -m generator.training.sft --kind loragen --init generator/checkpoints/default --out runs/loragen_sft_contrast \
        --contrast-weight 1.0 --contrast-margin 0.5 --probe-every 50
    python -m generator.training.sft --kind loragen --init generator/checkpoints/default --out runs/loragen_sft_named \
        --system-prompt --name-labels 0.5
    python -m generator.training.sft --kind loragen --init runs/recon --out runs/loragen_sft_user \
        --system-prompt --user-style 0.5
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..adapter import stack_adapters
from ..api import Generator, shared_encoder
from ..base_model import load_base_model
from ..config import T2LConfig, TargetSpec, TrainConfig
from ..data.library import load_library
from ..data.sni import (Task, add_label_names, load_splits, load_tasks, split_descriptions, split_instances,
                        train_labels)
from ..encoder import DescriptionEncoder
from ..models import build_model
from .multilora import MultiLoRA
from .oracles import OracleConfig
from .probe import probe_set, run_probe
from .prompts import encode_example, microbatches, output_token_ce
from ..arg_types import count, device, number
from .train import TrainingRun, run_identity

__all__ = ["SFTConfig", "SFTTasks", "draw_descriptions", "load_sft_tasks", "sft_backward", "train_sft"]

DEFAULT_TASKS = Path(__file__).resolve().parents[2] / "data" / "sni" / "tasks"
PROBE_EXAMPLES = 8  # test examples per probe task


@dataclass
class SFTConfig:
    """What an SFT step draws, the prompts, the sampler trained through, micro-batching, and the
    contrastive term (see the module's docstring).

    `contrast_margin` is in nats per output token (the CE is a per-task mean over output tokens):
    0.5 asks the right description's adapter to make each output token about e^0.5 = 1.65 times as
    likely as a wrong description's does, about 12 times for a whole 5-token answer; that is a
    clear gap at an SFT loss of about 1 nat per token, without asking wrong adapters to be useless.
    """

    tasks_per_step: int = 32
    examples_per_task: int = 8
    tokens_per_microbatch: int = 32768
    system_prompt: bool = False  # the description as the system prompt of every training prompt
    sampler_steps: int | None = None  # LoRAGen: DDIM steps trained through (the checkpoint is served with
    # them); None: those `init` is served with
    guidance: float | None = None  # LoRAGen: classifier-free guidance scale, likewise
    contrast_weight: float = 0.0  # weight of the contrastive hinge; 0: plain SFT (no second pass)
    contrast_margin: float = 0.5  # nats per output token by which the right description's CE must win
    cond_noise: float = 0.0  # scale of the noise on each step's description embeddings; 0: none
    name_labels: float = 0.0  # probability that a closed-label task's description names its labels; 0: never
    user_style: float = 0.0  # probability that a task's description is one of its user-style ones; 0: never

    def __post_init__(self) -> None:
        for name in ("name_labels", "user_style"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability, got {getattr(self, name)}")
        if not self.cond_noise >= 0:
            raise ValueError(f"cond_noise must be >= 0, got {self.cond_noise}")
        if not self.contrast_weight >= 0:
            raise ValueError(f"contrast_weight must be >= 0, got {self.contrast_weight}")
        if not self.contrast_margin >= 0:
            raise ValueError(f"contrast_margin must be >= 0 (nats per output token), got {self.contrast_margin}")
        self.tasks_in_step(self.tasks_per_step)

    def tasks_in_step(self, num_tasks: int) -> int:
        """Tasks drawn per step from `num_tasks` training tasks; the contrastive term needs two."""
        k = min(self.tasks_per_step, num_tasks)
        if self.contrast_weight > 0 and k < 2:
            raise ValueError(f"the contrastive term pairs each task with another task of its step: it needs at "
                             f"least 2 tasks per step, got {k} (tasks_per_step {self.tasks_per_step}, "
                             f"{num_tasks} training tasks)")
        return k


@dataclass
class SFTTasks:
    """The training tasks and their train descriptions, embedded; with named labels, each
    description of a closed-label task also has a second version naming the labels; with
    user-style descriptions, those of each task follow."""

    tasks: list[Task]
    descriptions: list[str]  # the train descriptions, then their labelled versions, then user-style ones
    cond: torch.Tensor  # (D, d_cond), one row per description
    desc_task: torch.Tensor  # (D,) index into `tasks`
    num_plain: int  # descriptions as the tasks give them: the first ones
    labelled: list[int] = field(default_factory=list)  # per plain description: its labelled version's index, or -1
    user_of: list[list[int]] = field(default_factory=list)  # per task: its user-style descriptions' indices

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]


def load_sft_tasks(tasks_dir: str | Path, names: Sequence[str] | None, encoder: DescriptionEncoder,
                   named_labels: bool = False, user_style: bool = False) -> SFTTasks:
    """`names` (default: the folder's `train` split) with their train descriptions, embedded;
    with `named_labels`, also each closed-label task's descriptions naming its labels (those of
    its train instances); with `user_style`, also each task's user-style descriptions (the
    splits file's; only training tasks may have them here)."""
    splits = load_splits(tasks_dir)
    names = list(names) if names is not None else list(splits.train)
    if not names:
        raise ValueError("SFT needs at least one training task")
    held_out = sorted(set(names) & set(splits.evaluation))
    if held_out:  # choose on validation, report on test: neither is ever trained on
        raise ValueError(f"{len(held_out)} validation or test tasks must not be trained on: {held_out[:3]}")
    tasks = load_tasks(tasks_dir, names)
    per_task = [split_descriptions(t)[0] for t in tasks]
    empty = [t.name for t, d in zip(tasks, per_task) if not d]
    if empty:
        raise ValueError(f"tasks without a train description: {empty}")
    descriptions = [d for ds in per_task for d in ds]
    owner = [i for i, ds in enumerate(per_task) for _ in ds]
    num_plain = len(descriptions)
    labelled: list[int] = []
    if named_labels:
        labels = train_labels(tasks)
        for d, i in zip(list(descriptions), list(owner)):
            task_labels = labels.get(tasks[i].name)
            labelled.append(-1 if task_labels is None else len(descriptions))
            if task_labels is not None:
                descriptions.append(add_label_names(d, task_labels))
                owner.append(i)
    user_of: list[list[int]] = []
    if user_style:
        for i, t in enumerate(tasks):
            user = splits.user_descriptions.get(t.name, ())
            user_of.append(list(range(len(descriptions), len(descriptions) + len(user))))
            descriptions.extend(user)
            owner.extend([i] * len(user))
        if not any(user_of):
            raise ValueError(f"none of the {len(tasks)} training tasks has user-style descriptions in the splits file")
    return SFTTasks(tasks, descriptions, encoder.encode(descriptions), torch.tensor(owner), num_plain, labelled,
                    user_of)


def library_stats_of(checkpoint: str | Path) -> tuple[TargetSpec, dict[str, tuple[torch.Tensor, torch.Tensor]], str]:
    """(target, factor statistics, fingerprint) of the oracle library a generator checkpoint was
    trained on: a LoRAGen's LAE and a T2L's standardiser both keep them (`factor_stats`)."""
    gen = Generator.load(checkpoint, cuda_graphs=False)
    owner = gen.model.lae if gen.kind == "loragen" else gen.model.standardizer
    return gen.target, {k: (m.detach().clone(), s.detach().clone()) for k, (m, s) in owner.library_stats().items()}, \
        gen.fingerprint


def _initial_model(
    kind: str, init: str | Path | None, library: str | Path | None, model_cfg: T2LConfig | None,
    stats_from: str | Path | None = None,
) -> tuple[torch.nn.Module, str, TargetSpec, dict[str, Any], str | None, dict[str, Any], str | None]:
    """(model, kind, target, configs, init fingerprint, the sampler init is served with, fingerprint
    of `stats_from`): from a checkpoint, or a T2L whose standardiser is fitted to a library or copied
    from the checkpoint `stats_from` (the statistics of the library that checkpoint was trained on)."""
    if init is not None:
        if stats_from is not None:
            raise ValueError("stats_from is for a T2L from scratch; a run from init keeps init's statistics")
        gen = Generator.load(init, cuda_graphs=False)
        if gen.kind != kind:
            raise ValueError(f"--init {init} is a {gen.kind} checkpoint, not {kind}")
        return gen.model, gen.kind, gen.target, gen.configs, gen.fingerprint, gen.sampler, None
    if kind != "t2l":
        raise ValueError(f"SFT of {kind} starts from a reconstruction-trained checkpoint: give init")
    if (library is None) == (stats_from is None):
        raise ValueError("T2L from scratch needs its standardiser's statistics: an oracle library to fit them to, "
                         "or a generator checkpoint to copy them from (one of the two)")
    configs = {"t2l": (model_cfg or T2LConfig()).to_dict()}
    if library is not None:
        adapters = [t.adapter for t in load_library(library)]
        model = build_model("t2l", adapters[0].target, configs)
        model.standardizer.fit(*stack_adapters(adapters))
        return model, "t2l", adapters[0].target, configs, None, model.sampler_defaults(), None
    target, stats, stats_fp = library_stats_of(stats_from)
    model = build_model("t2l", target, configs)
    model.standardizer.load_library_stats(stats)
    return model, "t2l", target, configs, None, model.sampler_defaults(), stats_fp


Row = tuple[int, list[int], int]  # (task's position in the step, prompt + output ids, prompt length)


def sft_backward(
    base: torch.nn.Module, multi: MultiLoRA, A: dict[str, torch.Tensor], B: dict[str, torch.Tensor],
    rows: Sequence[Row], sft: SFTConfig, pad_id: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One step's loss through the base model, micro-batch by micro-batch: (surrogate, logs).

    A[m]: (k, L, r, d_in), B[m]: (k, L, d_out, r), the generator's factors of the step's k tasks
    (with their graph); each row uses its task's factors (and, with the contrastive term, also the
    next task's). Every micro-batch backpropagates into detached copies of the factors; the
    surrogate's backward then pushes the step's factor gradients through the generator once.
    Logs: `sft_loss`; with the contrastive term also the mean right and wrong CE, their gap and the
    fraction of tasks whose hinge is active.
    """
    k = next(iter(A.values())).shape[0]
    device = next(base.parameters()).device
    wrong = [(j + 1) % k for j in range(k)]  # pi: task j is also scored under the factors of task pi(j)
    assignments: list[list[int] | None] = [None] + ([wrong] if sft.contrast_weight > 0 else [])  # None: the right one

    def pick(x: torch.Tensor, perm: list[int] | None) -> torch.Tensor:
        """Per-task factors under an assignment: row j holds the factors task j is scored with."""
        return x if perm is None else x[perm]

    def scaled(grad: torch.Tensor, coef: torch.Tensor | None) -> torch.Tensor:
        """Each task's factor gradient times its coefficient (None: 1)."""
        return grad if coef is None else grad * coef.view(-1, *[1] * (grad.dim() - 1))

    leaves = [({m: pick(a, perm).detach().requires_grad_() for m, a in A.items()},
               {m: pick(b, perm).detach().requires_grad_() for m, b in B.items()}) for perm in assignments]
    out_tokens = torch.zeros(k)
    for j, ids, p_len in rows:
        out_tokens[j] += len(ids) - p_len
    if not bool((out_tokens > 0).all()):
        empty = torch.nonzero(out_tokens == 0).flatten().tolist()
        raise ValueError(f"every task of the step needs output tokens: tasks {empty} have none")
    weight = (1.0 / (out_tokens * k)).to(device)  # mean over a task's tokens, then over tasks
    totals = [0.0 for _ in assignments]
    per_task = torch.zeros(len(assignments), k, device=device)  # weighted CE sums: CE_j(.) / k
    for group in microbatches([len(r[1]) for r in rows], sft.tokens_per_microbatch):
        which = torch.tensor([rows[i][0] for i in group], device=device)
        seqs = [(rows[i][1], rows[i][2]) for i in group]
        for a, (A_leaf, B_leaf) in enumerate(leaves):
            with multi.use_factors({m: x[which] for m, x in A_leaf.items()}, {m: x[which] for m, x in B_leaf.items()}):
                ce, row = output_token_ce(base, seqs, pad_id)
            weighted = ce * weight[which[row]]
            loss = weighted.sum()
            loss.backward()
            totals[a] += float(loss.detach())
            per_task[a].index_add_(0, which[row], weighted.detach())
    if sft.contrast_weight == 0:
        coefs: list[torch.Tensor | None] = [None]
        logs = {"sft_loss": totals[0]}
    else:
        hinge = sft.contrast_margin + k * (per_task[0] - per_task[1])  # margin + CE_j(j) - CE_j(pi(j))
        active = (hinge > 0).float()
        coefs = [1 + sft.contrast_weight * active, -sft.contrast_weight * active]
        logs = {"sft_loss": totals[0] + sft.contrast_weight * float(hinge.clamp(min=0).mean()),
                "sft_ce_right": totals[0], "sft_ce_wrong": totals[1], "sft_ce_gap": totals[1] - totals[0],
                "sft_hinge_active": float(active.mean())}
    surrogate = sum(
        (pick(A[m], perm) * scaled(A_leaf[m].grad, coef)).sum() + (pick(B[m], perm) * scaled(B_leaf[m].grad, coef)).sum()
        for perm, (A_leaf, B_leaf), coef in zip(assignments, leaves, coefs) for m in A)
    return surrogate, logs


def draw_descriptions(chosen: Sequence[int], descs_of: Sequence[torch.Tensor], labelled: Sequence[int],
                      name_labels: float, g: torch.Generator, user_of: Sequence[Sequence[int]] = (),
                      user_style: float = 0.0) -> list[int]:
    """One description index per chosen task: a uniform draw among the task's plain descriptions
    (`descs_of[task]`), replaced with probability `name_labels` by its labelled version
    (`labelled[d]`, -1: none), then with probability `user_style` by one of the task's user-style
    descriptions (`user_of[task]`, drawn uniformly; none: kept). Each option at 0 draws no further
    random number, so the stream is the one of runs before it existed; otherwise its draws are
    made for every task, whether or not the task has labels or user-style descriptions."""
    idx = [int(descs_of[t][torch.randint(len(descs_of[t]), (1,), generator=g)]) for t in chosen]
    if name_labels > 0:
        named = (torch.rand(len(chosen), generator=g) < name_labels).tolist()
        idx = [labelled[d] if use and labelled[d] >= 0 else d for d, use in zip(idx, named)]
    if user_style > 0:
        use = (torch.rand(len(chosen), generator=g) < user_style).tolist()
        pick = torch.rand(len(chosen), generator=g).tolist()
        idx = [user_of[t][int(u * len(user_of[t]))] if want and user_of[t] else d
               for t, d, want, u in zip(chosen, idx, use, pick)]
    return idx


def noisy_cond(cond: torch.Tensor, scale: float, g: torch.Generator) -> torch.Tensor:
    """Unit embeddings (N, d) moved by Gaussian noise of norm about `scale`, renormalised (scale 0: unchanged)."""
    if scale == 0:
        return cond
    noise = torch.randn(cond.shape, generator=g).to(cond) * (scale / math.sqrt(cond.shape[-1]))
    return torch.nn.functional.normalize(cond + noise, dim=-1)


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
    log_every: int = 0,
    probe_tasks: Sequence[str] | None = None,
    probe_every: int = 0,
    snapshots: Sequence[int] = (),
    stats_from: str | Path | None = None,
) -> Generator:
    """Train a generator by SFT on `names` (default: the train split) of `tasks_dir`.

    `init`: the checkpoint to start from (required for LoRAGen); `library`: the oracle library a
    T2L from scratch fits its standardiser to, or `stats_from`: a generator checkpoint whose
    library's statistics it copies (no oracles needed). With `max_seconds` (counted from this call, set-up
    included), training stops at the first step boundary after that long and the checkpoint is
    written from the weights so far (its `extra.stopped_at` says at which step); the training
    state stays, so `resume=True` continues. `log_every`: print the step's logs every that many
    steps (0: only the progress bar shows them). `probe_tasks` (default: the validation split) are
    probed every `probe_every` steps and at the last (0: never; see the module's docstring).
    `snapshots`: steps at which the weights so far are also written as a checkpoint to
    `<out>/snapshots/sft-<step>/`.
    """
    started = time.monotonic()
    cfg, sft = cfg or TrainConfig(), sft or SFTConfig()
    names = list(names) if names is not None else list(load_splits(tasks_dir).train)
    k = sft.tasks_in_step(len(names))  # before any loading: a contrastive run needs two tasks a step
    snapshot_steps = set(snapshots)
    if any(n < 1 or n > cfg.steps for n in snapshot_steps):
        raise ValueError(f"snapshot steps must lie in 1..{cfg.steps}: {sorted(snapshot_steps)}")
    torch.manual_seed(cfg.seed)
    model, kind, target, configs, init_fp, served, stats_fp = _initial_model(kind, init, library, model_cfg, stats_from)
    origin = {"init": init_fp} | ({"stats_from": stats_fp} if stats_fp is not None else {})
    if kind == "loragen":  # what is not set: the sampler init is served with
        sft = replace(sft, sampler_steps=int(served["steps"]) if sft.sampler_steps is None else sft.sampler_steps,
                      guidance=float(served["guidance"]) if sft.guidance is None else sft.guidance)
    model = model.to(device)
    data = load_sft_tasks(tasks_dir, names, shared_encoder(device), named_labels=sft.name_labels > 0,
                          user_style=sft.user_style > 0)
    base, tok, _ = load_base_model(device)
    ocfg = OracleConfig()
    train_split = [split_instances(t)[0] for t in data.tasks]
    plain_task = data.desc_task[: data.num_plain]
    descs_of = [torch.nonzero(plain_task == i).flatten() for i in range(len(data.tasks))]
    sampler = ({"steps": sft.sampler_steps, "guidance": sft.guidance} if kind == "loragen"
               else model.sampler_defaults())
    identity = run_identity(kind, target, configs, cfg, data.names, len(data.descriptions)) | {
        "training": "sft", "sft": vars(sft), **origin}
    probe = None
    if probe_every > 0:
        probe_names = list(probe_tasks) if probe_tasks is not None else list(load_splits(tasks_dir).validation)
        overlap = sorted(set(probe_names) & set(names))
        if overlap:
            raise ValueError(f"probe tasks must be held out, but {len(overlap)} are training tasks: {overlap[:3]}")
        probe = probe_set(load_tasks(tasks_dir, probe_names), tok, shared_encoder(device), PROBE_EXAMPLES,
                          system_prompt=sft.system_prompt)
    probe_log: dict[str, float] = {}
    multi = MultiLoRA(base, target, num_adapters=1)
    cond_all = data.cond.to(device)

    def checkpoint(weights: torch.nn.Module, **extra: Any) -> Generator:
        """A generator of this run: its sampler, and in `extra` what made it plus `extra`."""
        return Generator(kind, target, weights, configs, sampler, extra={
            "training": "sft", **origin, "library": {"tasks": data.names}, "train": cfg.to_dict(),
            "sft": vars(sft), **extra})

    def on_step(stage: str, step: int) -> None:
        """After each step: a snapshot if `step` is one, then the probe."""
        if step in snapshot_steps:
            checkpoint(copy.deepcopy(model).cpu(), snapshot={"sft_step": step}).save(Path(out) / "snapshots" / f"sft-{step}")
        probe_at(step)

    def probe_at(step: int) -> None:
        """The probe every `probe_every` steps and at the last; printed and appended to probe.jsonl."""
        if probe is None or (step % probe_every and step != cfg.steps):
            return
        probe_log.clear()
        probe_log.update(run_probe(model, sampler, probe, base, multi, tok.pad_token_id))
        line = {"step": step, **{k: round(v, 4) for k, v in probe_log.items()}}
        with open(Path(out) / "probe.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        tqdm.write(f"{kind}_sft probe step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in probe_log.items()))

    run = TrainingRun(f"{kind}_sft", Path(out), identity, resume, progress, callback=on_step, log_every=log_every)

    def example(task: int, desc: int, i: int) -> tuple[list[int], int]:
        """(prompt + output ids, prompt length) of train instance i of a task."""
        x = train_split[task][i]
        system = data.descriptions[desc] if sft.system_prompt else None
        p, o = encode_example(tok, x.input, x.outputs[0], ocfg.max_input_tokens, ocfg.max_output_tokens, system)
        return p + o, len(p)

    def step_fn(g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        chosen = torch.randperm(len(data.tasks), generator=g)[:k].tolist()
        desc_idx = draw_descriptions(chosen, descs_of, data.labelled, sft.name_labels, g, data.user_of,
                                     sft.user_style)
        cond = noisy_cond(cond_all[desc_idx], sft.cond_noise, g)
        A, B = model.sft_factors(cond, g, sampler["steps"], sampler["guidance"])
        rows: list[Row] = []
        for j, (t, d) in enumerate(zip(chosen, desc_idx)):
            for i in torch.randint(len(train_split[t]), (sft.examples_per_task,), generator=g).tolist():
                rows.append((j, *example(t, d, i)))
        return sft_backward(base, multi, A, B, rows, sft, tok.pad_token_id)

    run.stop_after(None if max_seconds is None else max_seconds - (time.monotonic() - started))
    try:
        logs = run.loop(model, "sft", cfg.steps, model.sft_parameters(), cfg, step_fn, ["sft"])
    finally:
        multi.unload()
    gen = checkpoint(model.cpu(), final=logs, stopped_at=run.stopped_at,
                     **({"probe": {"tasks": probe.names, **probe_log}} if probe is not None else {}))
    gen.save(out)
    if run.stopped_at is None:
        run.finish()
    return gen


def _names_in(path: str) -> list[str]:
    """Task names, one per line (blank lines skipped)."""
    try:
        return [n.strip() for n in Path(path).read_text().splitlines() if n.strip()]
    except OSError as e:
        raise SystemExit(f"error: cannot read {path}: {e.strerror}") from None


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m generator.training.sft", description=__doc__.split("\n")[0])
    ap.add_argument("--kind", choices=("t2l", "loragen"), default="t2l")
    ap.add_argument("--init", help="checkpoint to start from (required for loragen: a reconstruction-trained one)")
    ap.add_argument("--library", help="oracle library (T2L from scratch: its standardiser is fitted to it)")
    ap.add_argument("--stats-from", help="T2L from scratch without a library: copy its standardiser's statistics "
                    "from this generator checkpoint (those of the library it was trained on)")
    ap.add_argument("--tasks", default=str(DEFAULT_TASKS), help="task folder (instances, descriptions, splits.json)")
    ap.add_argument("--tasks-file", help="train on the task names in this file (one per line; default: the train split)")
    ap.add_argument("--out", required=True, help="checkpoint folder")
    ap.add_argument("--steps", type=count(1), default=1000)
    ap.add_argument("--lr", type=number(0.0, 1.0, above=True), default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks-per-step", type=count(1), default=SFTConfig.tasks_per_step)
    ap.add_argument("--examples-per-task", type=count(1), default=SFTConfig.examples_per_task)
    ap.add_argument("--tokens-per-microbatch", type=count(1), default=SFTConfig.tokens_per_microbatch)
    ap.add_argument("--system-prompt", action="store_true", help="the description as each training prompt's system prompt")
    ap.add_argument("--sampler-steps", type=count(1), help="loragen: DDIM steps (default: those --init is served with)")
    ap.add_argument("--guidance", type=number(0.0, 100.0), help="loragen: guidance scale (default: that --init is served with)")
    ap.add_argument("--contrast-weight", type=float, default=SFTConfig.contrast_weight,
                    help="weight of the contrastive hinge (right description's CE below another task's; 0: off)")
    ap.add_argument("--contrast-margin", type=float, default=SFTConfig.contrast_margin,
                    help="the hinge's margin, in nats per output token")
    ap.add_argument("--cond-noise", type=float, default=SFTConfig.cond_noise,
                    help="noise on the description embeddings each step (about the norm of the noise; 0: none)")
    ap.add_argument("--name-labels", type=float, default=SFTConfig.name_labels,
                    help="probability that a closed-label task's description names its labels (0: never)")
    ap.add_argument("--user-style", type=float, default=SFTConfig.user_style,
                    help="probability that a task's description is one of its user-style ones (splits.json; 0: never)")
    ap.add_argument("--probe-every", type=count(0), default=0,
                    help="probe the validation tasks every N steps and at the last: CE right vs random string (0: never)")
    ap.add_argument("--probe-tasks-file", help="probe the task names in this file (default: the validation split)")
    ap.add_argument("--snapshots", type=count(1), nargs="*", default=[],
                    help="steps at which to also write <out>/snapshots/sft-<step>/ (choose the step count on validation)")
    ap.add_argument("--checkpoint-every", type=count(1), default=200)
    ap.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=count(1), default=1)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--log-every", type=count(0), default=20, help="print the step's logs every N steps (0: never)")
    ap.add_argument("--max-seconds", type=number(0.0, 1e6, above=True), default=None,
                    help="stop early after this long and write the checkpoint so far (resumable)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    names = _names_in(a.tasks_file) if a.tasks_file else None
    probe_tasks = _names_in(a.probe_tasks_file) if a.probe_tasks_file else None
    cfg = TrainConfig(steps=a.steps, lr=a.lr, seed=a.seed, checkpoint_every=a.checkpoint_every, batch_size=a.tasks_per_step)
    try:
        sft = SFTConfig(a.tasks_per_step, a.examples_per_task, a.tokens_per_microbatch, a.system_prompt,
                        a.sampler_steps, a.guidance, a.contrast_weight, a.contrast_margin, a.cond_noise,
                        a.name_labels, a.user_style)
        gen = train_sft(a.out, a.kind, a.tasks, names, a.init, a.library, cfg=cfg, sft=sft, device=a.device,
                        resume=a.resume, progress=not a.no_progress, max_seconds=a.max_seconds,
                        log_every=a.log_every, probe_tasks=probe_tasks, probe_every=a.probe_every,
                        snapshots=a.snapshots, stats_from=a.stats_from)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the state so far is saved; --resume continues it") from None
    stopped = gen.extra.get("stopped_at")
    note = f", stopped by --max-seconds at step {stopped} of {a.steps}" if stopped is not None else ""
    print(f"{a.kind} (SFT) checkpoint {a.out}: fingerprint {gen.fingerprint[:12]}, {gen.num_parameters} parameters{note}")


if __name__ == "__main__":
    main()
