"""Training loops for both generator kinds: resumable, reproducible from a seed, with tqdm.

* T2L: one stage, reconstruction of the library's factors from description embeddings.
* LoRAGen: stage "lae" trains the LoRA autoencoder on the library's adapters; the posterior means
  of all adapters are then the latents; stage "dit" trains the diffusion denoiser on
  (description embedding, latent) pairs.

Every `checkpoint_every` steps the full training state (weights, optimiser, stage, step, the
final logs of finished stages) is written atomically to `<out>/train_state.pt`; `resume=True`
continues from it. Batches are drawn from a generator seeded by (seed, stage, step), so a resumed
run sees the batches an uninterrupted run would and, on the CPU, writes the same checkpoint. The
finished checkpoint is `<out>/config.json` + `<out>/model.safetensors`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..adapter import stack_adapters
from ..api import Generator, shared_encoder
from ..config import DiffusionConfig, LAEConfig, T2LConfig, TargetSpec, TrainConfig
from ..data.library import load_library
from ..encoder import DescriptionEncoder
from ..models import build_model, model_class

STATE_FILE = "train_state.pt"


@dataclass
class TrainingData:
    """A library as tensors: factors per task and embeddings per description."""

    target: TargetSpec
    task_names: list[str]
    A: dict[str, torch.Tensor]  # module -> (T, L, r, d_in)
    B: dict[str, torch.Tensor]  # module -> (T, L, d_out, r)
    cond: torch.Tensor  # (D, 384), one row per description
    desc_task: torch.Tensor  # (D,) task index of each description
    descriptions: list[str]

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def digest(self) -> str:
        """sha256 of the library's content (factors, descriptions, task names): part of a run's
        identity, so that a resume never continues on an oracle library retrained meanwhile."""
        h = hashlib.sha256()
        for name, ts in (("A", self.A), ("B", self.B)):
            for module in sorted(ts):
                h.update(f"{name}:{module}:{tuple(ts[module].shape)}\x00".encode())
                h.update(ts[module].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        h.update("\x00".join(self.task_names + ["--"] + self.descriptions).encode())
        return h.hexdigest()

    def to(self, device: str | torch.device) -> "TrainingData":
        """The same data with its tensors on `device` (training runs where the data is)."""
        return TrainingData(
            self.target, self.task_names,
            {m: a.to(device) for m, a in self.A.items()}, {m: b.to(device) for m, b in self.B.items()},
            self.cond.to(device), self.desc_task.to(device), self.descriptions,
        )


def load_training_data(
    library: str | Path, target: TargetSpec | None = None, encoder: DescriptionEncoder | None = None,
    max_descriptions: int | None = None, only: Sequence[str] | None = None,
) -> TrainingData:
    """Load a library folder (or its tasks named in `only`) and embed its descriptions.

    `max_descriptions`: use only the first N descriptions of each task.
    """
    tasks = load_library(library, target, only)
    A, B = stack_adapters([t.adapter for t in tasks])
    per_task = [t.descriptions[:max_descriptions] for t in tasks]
    descriptions = [d for ds in per_task for d in ds]
    desc_task = torch.tensor([i for i, ds in enumerate(per_task) for _ in ds])
    cond = (encoder or shared_encoder("cpu")).encode(descriptions)
    return TrainingData(tasks[0].adapter.target, [t.name for t in tasks], A, B, cond, desc_task, descriptions)


def _batch_generator(seed: int, stage: str, step: int) -> torch.Generator:
    code = {"t2l": 1, "lae": 2, "dit": 3, "sft": 4}[stage]
    return torch.Generator().manual_seed((seed * 1_000_003 + code * 7_919 + step) % 2**63)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class TrainingRun:
    """One resumable training run: state file, resume, optimisers, progress bars, a time limit."""

    def __init__(
        self, kind: str, out: Path, identity: dict[str, Any], resume: bool, progress: bool,
        callback: Callable[[str, int], None] | None = None, log_every: int = 0,
    ) -> None:
        self.kind, self.out, self.identity, self.progress, self.callback = kind, out, identity, progress, callback
        self.log_every = log_every  # print a step's logs every that many steps (0: only the progress bar)
        self.deadline: float | None = None  # time.monotonic() after which `loop` stops early (see stop_after)
        self.stopped_at: int | None = None  # the step a stage stopped at, if the deadline ended it
        path = out / STATE_FILE
        if (out / "config.json").is_file() and not path.is_file():
            raise ValueError(f"{out} already holds a finished checkpoint: train into another folder, or delete it")
        if path.is_file() and not resume:
            raise ValueError(f"{out} holds an unfinished run ({STATE_FILE}): resume it (--resume), or delete it")
        out.mkdir(parents=True, exist_ok=True)
        self.state: dict[str, Any] | None = None
        self.logs: dict[str, dict[str, float]] = {}  # stage -> its last step's logs, once the stage is complete
        if resume and path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=False)
            if state.get("identity") != identity:
                raise ValueError(f"{path} belongs to a different training run (kind, target, configs or library differ)")
            self.state = state
            self.logs = dict(state.get("extra", {}).get("logs", {}))

    def stop_after(self, seconds: float | None) -> None:
        """End the current stage early, at a step boundary, once `seconds` have passed from now.

        The caller checks `stopped_at` before it starts another stage or finishes the run (SFT, one
        stage, does; `train_loragen` sets no deadline).
        """
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def save(self, model: torch.nn.Module, stage: str, step: int, optim: torch.optim.Optimizer) -> None:
        _atomic_torch_save(
            {"identity": self.identity, "stage": stage, "step": step, "model": model.state_dict(),
             "optim": optim.state_dict(), "rng": torch.get_rng_state(), "extra": {"logs": self.logs}},
            self.out / STATE_FILE,
        )

    def loop(
        self,
        model: torch.nn.Module,
        stage: str,
        steps: int,
        params: list[torch.nn.Parameter],
        cfg: TrainConfig,
        step_fn: Callable[[torch.Generator], tuple[torch.Tensor, dict[str, float]]],
        stages_order: list[str],
    ) -> dict[str, float]:
        """Run (or resume, or skip if already done) one stage of `steps` optimiser steps.

        Returns the logs of the stage's last step (also when the stage was finished before a resume).
        """
        optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

        def lr_at(s: int) -> float:  # 50-step warm-up, then linear decay to 10%
            return cfg.lr * min(1.0, (s + 1) / 50) * (0.1 + 0.9 * (1 - s / max(1, steps)))
        start = 0
        if self.state is not None:
            done_stage = self.state["stage"]
            if stages_order.index(done_stage) > stages_order.index(stage):
                model.load_state_dict(self.state["model"])  # this stage finished before the interruption
                model.eval()
                return dict(self.logs.get(stage, {}))
            if done_stage == stage:
                model.load_state_dict(self.state["model"])
                optim.load_state_dict(self.state["optim"])
                start = int(self.state["step"])
                # CPU dropout draws continue as if never stopped (the CUDA generator is not saved)
                torch.set_rng_state(self.state["rng"])
        logs: dict[str, float] = {}
        model.train()
        bar = tqdm(range(start, steps), desc=f"{self.kind}:{stage}", disable=not self.progress, initial=start, total=steps)
        for step in bar:
            if self.deadline is not None and time.monotonic() > self.deadline:
                self.stopped_at = step  # the state saved below resumes here
                self.save(model, stage, step, optim)
                bar.close()
                model.eval()
                return logs
            for group in optim.param_groups:
                group["lr"] = lr_at(step)
            loss, logs = step_fn(_batch_generator(cfg.seed, stage, step))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            if step % 10 == 0:
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()})
            if self.log_every and (step == start or (step + 1) % self.log_every == 0):
                tqdm.write(f"{self.kind}:{stage} step {step + 1}/{steps} " + " ".join(f"{k}={v:.4g}" for k, v in logs.items()))
            if self.callback is not None:  # before the state moves past this step: a resume redoes it
                self.callback(stage, step + 1)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                self.save(model, stage, step + 1, optim)
        if start < steps or stage not in self.logs:
            self.logs[stage] = logs
        self.save(model, stage, steps, optim)  # stage complete
        model.eval()
        return dict(self.logs[stage])

    def finish(self) -> None:
        (self.out / STATE_FILE).unlink(missing_ok=True)


def run_identity(
    kind: str, target: TargetSpec, configs: dict, cfg: TrainConfig, tasks: Sequence[str], num_descriptions: int,
    data: str | None = None,
) -> dict[str, Any]:
    """What makes a run itself: a resume continues only a state written with the same identity.
    ``data``: a digest of the training data's content (`TrainingData.digest`), where it has one."""
    train = cfg.to_dict()
    train.pop("checkpoint_every", None)
    train.pop("num_threads", None)
    return json.loads(json.dumps({"kind": kind, "target": target.to_dict(), "configs": configs, "train": train,
                                  "tasks": list(tasks), "num_descriptions": num_descriptions, "data": data}))


def train_t2l(
    data: TrainingData, out: str | Path, model_cfg: T2LConfig | None = None, cfg: TrainConfig | None = None,
    resume: bool = False, progress: bool = True, callback: Callable[[str, int], None] | None = None,
) -> Generator:
    """Train the T2L hypernetwork on a library; writes and returns the checkpoint.

    `callback(stage, step)` runs after every optimiser step (e.g. to stop a run early).
    """
    model_cfg, cfg = model_cfg or T2LConfig(), cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    configs = {"t2l": model_cfg.to_dict()}
    model = build_model("t2l", data.target, configs).to(data.cond.device)
    model.standardizer.fit(data.A, data.B)
    identity = run_identity("t2l", data.target, configs, cfg, data.task_names, len(data.descriptions), data.digest())
    run = TrainingRun("t2l", Path(out), identity, resume, progress, callback)

    def step_fn(g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        idx = torch.randint(len(data.descriptions), (cfg.batch_size,), generator=g).to(data.cond.device)
        tasks = data.desc_task[idx]
        A = {m: data.A[m][tasks] for m in data.target.modules}
        B = {m: data.B[m][tasks] for m in data.target.modules}
        return model.loss(data.cond[idx], A, B)

    logs = run.loop(model, "t2l", cfg.steps, list(model.parameters()), cfg, step_fn, ["t2l"])
    gen = Generator("t2l", data.target, model, configs, model.sampler_defaults(),
                    extra={"library": {"tasks": data.task_names}, "train": cfg.to_dict(), "final": logs})
    gen.save(out)
    run.finish()
    return gen


def train_loragen(
    data: TrainingData, out: str | Path, lae_cfg: LAEConfig | None = None, diff_cfg: DiffusionConfig | None = None,
    cfg: TrainConfig | None = None, resume: bool = False, progress: bool = True,
    callback: Callable[[str, int], None] | None = None, snapshots: Sequence[int] = (),
) -> Generator:
    """Train LoRAGen (LAE, then latent diffusion) on a library; writes and returns the checkpoint.

    `snapshots`: denoiser steps at which a generator checkpoint of the model so far is also written,
    to `<out>/snapshots/dit-<step>/` (quality against training steps).
    """
    lae_cfg, diff_cfg, cfg = lae_cfg or LAEConfig(), diff_cfg or DiffusionConfig(), cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    configs = {"lae": lae_cfg.to_dict(), "diffusion": diff_cfg.to_dict()}
    model = build_model("loragen", data.target, configs).to(data.cond.device)
    model.lae.fit_scales(data.A, data.B)

    snapshot_steps = set(snapshots)

    def on_step(stage: str, step: int) -> None:
        if stage == "dit" and step in snapshot_steps:
            copy = build_model("loragen", data.target, configs)
            copy.load_state_dict(model.state_dict())
            Generator("loragen", data.target, copy, configs, copy.sampler_defaults(),
                      extra={"library": {"tasks": data.task_names}, "train": cfg.to_dict(),
                             "snapshot": {"dit_step": step}}).save(Path(out) / "snapshots" / f"dit-{step}")
        if callback is not None:
            callback(stage, step)

    identity = run_identity("loragen", data.target, configs, cfg, data.task_names, len(data.descriptions), data.digest())
    run = TrainingRun("loragen", Path(out), identity, resume, progress, on_step)
    order = ["lae", "dit"]

    def lae_step(g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        tokens = {}
        for m in data.target.modules:  # random (task, layer) locations of every module
            ti = torch.randint(data.num_tasks, (cfg.tokens_per_step,), generator=g)
            li = torch.randint(data.target.num_layers, (cfg.tokens_per_step,), generator=g)
            ti, li = ti.to(data.cond.device), li.to(data.cond.device)
            tokens[m] = (data.A[m][ti, li], data.B[m][ti, li], li)
        return model.lae.loss(tokens, generator=g)

    lae_logs = run.loop(model, "lae", cfg.steps, list(model.lae.parameters()), cfg, lae_step, order)
    # Stage 2 targets: posterior means of every library adapter.
    with torch.no_grad():
        model.eval()
        z_tasks = model.lae.encode_mean(data.A, data.B)  # (T, P, d_z)
        model.fit_latent_scale(z_tasks)  # deterministic given the LAE, so also right when resuming

    def dit_step(g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        idx = torch.randint(len(data.descriptions), (cfg.batch_size,), generator=g).to(data.cond.device)
        return model.diffusion_loss(z_tasks[data.desc_task[idx]], data.cond[idx], generator=g)

    dit_logs = run.loop(model, "dit", cfg.diffusion_steps, list(model.dit.parameters()), cfg, dit_step, order)
    final = {**{f"lae_{k}": v for k, v in lae_logs.items()}, **{f"dit_{k}": v for k, v in dit_logs.items()}}
    gen = Generator("loragen", data.target, model, configs, model.sampler_defaults(),
                    extra={"library": {"tasks": data.task_names}, "train": cfg.to_dict(), "final": final})
    gen.save(out)
    run.finish()
    return gen


def train(
    kind: str, library: str | Path, out: str | Path, cfg: TrainConfig | None = None,
    configs: dict[str, Any] | None = None, target: TargetSpec | None = None,
    resume: bool = False, progress: bool = True, callback: Callable[[str, int], None] | None = None,
    device: str | torch.device = "cpu", max_descriptions: int | None = None, only: Sequence[str] | None = None,
    snapshots: Sequence[int] = (),
) -> Generator:
    """Train a generator of `kind` ("loragen" | "t2l") on a library folder, on `device`.

    `only`: train on these tasks of the library. Batches are drawn on the CPU from the seeded
    generator, so a run is reproducible on a device up to that device's float arithmetic.
    """
    model_class(kind)  # ValueError naming the known kinds
    configs = configs or {}
    data = load_training_data(library, target, shared_encoder(device), max_descriptions, only).to(device)
    if kind == "t2l":
        return train_t2l(data, out, T2LConfig.from_dict(configs.get("t2l", {})), cfg, resume, progress, callback)
    return train_loragen(data, out, LAEConfig.from_dict(configs.get("lae", {})),
                         DiffusionConfig.from_dict(configs.get("diffusion", {})), cfg, resume, progress, callback,
                         snapshots)
