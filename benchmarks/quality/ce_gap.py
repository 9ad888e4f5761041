"""How much a generator's conditioning carries over to unseen tasks, in nats (`ce-gap`; no GPU needed).

For a checkpoint, on some of the tasks it trained on and on validation tasks: the mean
output-token cross-entropy of each task's examples under the adapter generated from the task's
description, under the adapter generated from a random string of the same length, and under the
base model alone, the description as the system prompt in all three (`generator.training.probe`).
The gap right vs random is what the description adds through the adapter; a generator that only
memorised its training descriptions shows a large gap on training tasks and none on unseen ones.

    python -m benchmarks.quality ce-gap --generator generator/checkpoints/default --tasks data/sni/tasks \
        --out benchmarks/results/quality_ce_gap [--seeds 4]

`--seeds N` (LoRAGen) also measures what the sampler's noise does: the same CE under the adapters of
seeds 1..N-1 (the *right* column is seed 0), the mean cosine of dW between two seeds' adapters of
one description, and two ways to take the noise out: the mean dW of the N seeds' adapters
(truncated to the adapters' rank by SVD) and DDIM from x_T = 0.
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
from generator.models.losses import delta_cosine
from generator.training.multilora import MultiLoRA
from generator.training.probe import ProbeSet, conditioned_ce, factors_ce, probe_set
from generator.training.prompts import microbatches, output_token_ce

__all__ = ["ce_gap", "mean_adapter", "pick_tasks"]


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


Factors = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]  # A[m] (k, L, r, d_in), B[m] (k, L, d_out, r)


def mean_adapter(samples: Sequence[Factors]) -> tuple[Factors, float]:
    """The mean dW = mean_s B_s A_s of several adapters per row, truncated by SVD to their rank r
    (B = U_r S_r, A = V_r^T), and the share of the mean's energy (sum of S^2) the truncation keeps."""
    A0, _ = samples[0]
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    kept = []
    for m in A0:
        r = A0[m].shape[-2]
        dW = torch.stack([b[m].float() @ a[m].float() for a, b in samples]).mean(0)  # (k, L, d_out, d_in)
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        B[m] = (U[..., :r] * S[..., None, :r]).to(A0[m].dtype)
        A[m] = Vh[..., :r, :].to(A0[m].dtype)
        kept.append(float(((S[..., :r] ** 2).sum(-1) / (S**2).sum(-1)).mean()))
    return (A, B), sum(kept) / len(kept)


def _dw_cosine(x: Factors, y: Factors) -> float:
    """Mean over rows and locations of the cosine between two adapters' dW (from the factors)."""
    return float(torch.stack([delta_cosine(x[0][m].double(), x[1][m].double(), y[0][m].double(), y[1][m].double()).mean()
                              for m in x[0]]).mean())


@torch.no_grad()
def seed_spread(model, sampler: dict, probe: ProbeSet, base, multi: MultiLoRA, pad_id: int, seeds: int) -> dict:
    """What the sampler's noise does on one probe: CE under seeds 1..seeds-1 (seed 0 is *right*),
    the dW cosine between seeds, and CE under the seeds' mean adapter and under x_T = 0."""
    if not hasattr(model, "factors_from_noise"):
        raise ValueError("--seeds needs a LoRAGen checkpoint (a sampler with noise); this generator has none")
    device = next(base.parameters()).device
    cond = probe.cond.to(device)
    samples = [model.sft_factors(cond, torch.Generator().manual_seed(s), sampler["steps"], sampler["guidance"])
               for s in range(seeds)]
    ce_seeds = [factors_ce(*f, probe, base, multi, pad_id) for f in samples[1:]]
    mean, kept = mean_adapter(samples)
    zero = torch.zeros((cond.shape[0], model.num_tokens, model.lae_cfg.d_z), device=device, dtype=cond.dtype)
    pairs = [(i, j) for i in range(seeds) for j in range(i + 1, seeds)]
    return {
        "ce_seeds": [round(float(c.mean()), 4) for c in ce_seeds],
        "cos_between_seeds": round(sum(_dw_cosine(samples[i], samples[j]) for i, j in pairs) / len(pairs), 4),
        "ce_seed_mean_adapter": round(float(factors_ce(*mean, probe, base, multi, pad_id).mean()), 4),
        "seed_mean_energy_kept": round(kept, 4),
        "ce_zero_noise": round(float(factors_ce(
            *model.factors_from_noise(cond, zero, sampler["steps"], sampler["guidance"]), probe, base, multi, pad_id
        ).mean()), 4),
    }


def ce_gap(
    generator: str | Path, tasks: Sequence[Task], splits: TaskSplits, num_tasks: int = 16, examples: int = 4,
    steps: int | None = None, guidance: float | None = None, device: str = "cpu", seeds: int = 0,
) -> dict:
    """The measurement on the checkpoint's training tasks and on validation tasks (see the module)."""
    if seeds == 1 or seeds < 0:
        raise ValueError(f"--seeds must be 0 (off) or at least 2, got {seeds}")
    gen = Generator.load(generator, cuda_graphs=False)
    trained = list(gen.extra.get("library", {}).get("tasks") or splits.train)
    sampler = {**gen.sampler, **({"steps": steps} if steps else {}), **({"guidance": guidance} if guidance else {})}
    base, tok, _ = load_base_model(device)  # float32 on a CPU, bf16 on CUDA, as SFT trains
    encoder = shared_encoder(device)
    model = gen.model.to(device).eval()
    sets = {"train": (pick_tasks(tasks, trained, num_tasks), False),
            "validation": (pick_tasks(tasks, splits.validation, num_tasks), True)}
    probes = {k: probe_set(ts, tok, encoder, examples, system_prompt=True, held_out=held) for k, (ts, held) in sets.items()}
    bar = tqdm(total=(3 + bool(seeds)) * len(probes), desc="ce-gap (base, right, random[, seeds] per set)")
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
            spread = seed_spread(model, sampler, p, base, multi, tok.pad_token_id, seeds) if seeds else None
            if spread:
                bar.update()
            out["sets"][name] = {
                "instances": "train" if name == "train" else "test",
                "ce_right": round(float(right.mean()), 4), "ce_random": round(float(rand.mean()), 4),
                "ce_base": round(float(base_ce[name].mean()), 4), "gap": round(float((rand - right).mean()), 4),
                "tasks_gap_over_half_nat": int(((rand - right) > 0.5).sum()),
                "embeddings": embedding_spread(sets[name][0], encoder),
                **({"seeds": spread} if spread else {}),
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
    if any("seeds" in s for s in result["sets"].values()):
        lines += ["", "What the sampler's noise does (`--seeds`): the same CE under other seeds' adapters (*right* is "
                  "seed 0), under the mean dW of the seeds' adapters (truncated to their rank), and under DDIM from "
                  "x_T = 0; and the cosine of dW between two seeds' adapters of one description.", "",
                  "| set | right (seed 0) | other seeds | mean over seeds | mean adapter (energy kept) | x_T = 0 "
                  "| dW cosine between seeds |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, s in result["sets"].items():
            sd = s["seeds"]
            every = [s["ce_right"], *sd["ce_seeds"]]
            lines.append(f"| {name} | {s['ce_right']:.3f} | {', '.join(f'{c:.3f}' for c in sd['ce_seeds'])} | "
                         f"{sum(every) / len(every):.3f} | {sd['ce_seed_mean_adapter']:.3f} "
                         f"({sd['seed_mean_energy_kept']:.3f}) | {sd['ce_zero_noise']:.3f} | {sd['cos_between_seeds']:.3f} |")
    lines += ["", f"`{result['command']}` at commit `{result['commit']}` on {result['machine']}, {result['date']}.", ""]
    m.write_text("\n".join(lines))
    return [j, m]
