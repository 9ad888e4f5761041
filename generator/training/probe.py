"""The description probe: does the generator's conditioning carry over to tasks it never trained on?

A probe set is a few tasks (validation tasks in SFT) with a fixed handful of their examples, one
description of each (an evaluation description: never seen in training) and, as a control, a random
string of the same length (`random_description`). The probe is the output tokens' mean
cross-entropy of each task's examples under the adapter generated from its description
(`ce_right`) and under the adapter generated from the random string (`ce_random`), with the same
prompts (with `system_prompt`, the task's own description as the system prompt in both, as `serve`
sends it), so their gap is what the adapter's conditioning adds, in nats per output token.

SFT lowers the training tasks' CE; the probe says whether the description still matters where it
matters to users. On checkpoint 330e027ea79f (40 tasks x 4 examples each, 5 DDIM steps) the gap
was 1.08 nats on training tasks and 0.41 on validation tasks: on an unseen task the description did
less than half of what it does on a training task (e8f7b1c045c0, the default before the soup of
2026-12-06: 0.83 and 0.46; `benchmarks/results/quality_ce_gap.md`).
`python -m generator.training.sft --probe-every N` logs the probe (`probe_ce_right`,
`probe_ce_random`, `probe_gap`) every N steps; `python -m benchmarks.quality ce-gap` measures a
checkpoint on training and validation tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..data.sni import Task, random_description, split_descriptions, split_instances
from ..encoder import DescriptionEncoder
from .multilora import MultiLoRA
from .oracles import OracleConfig
from .prompts import encode_example, microbatches, output_token_ce

__all__ = ["ProbeSet", "probe_set", "conditioned_ce", "factors_ce", "run_probe"]

Seq = tuple[list[int], int]  # prompt + output ids, prompt length


@dataclass
class ProbeSet:
    """Tasks, their probe descriptions and controls (embedded), and the examples scored."""

    names: list[str]
    descriptions: list[str]  # one evaluation description per task
    controls: list[str]  # a random string of the same length per task
    cond: torch.Tensor  # (k, d_cond) the descriptions, embedded
    control_cond: torch.Tensor  # (k, d_cond) the controls, embedded
    seqs: list[list[Seq]]  # per task: its examples, tokenised with the task's description as system prompt (or none)


def probe_set(
    tasks: Sequence[Task], tokenizer, encoder: DescriptionEncoder, examples_per_task: int = 8,
    system_prompt: bool = True, held_out: bool = True,
) -> ProbeSet:
    """A probe over `tasks`: each task's first evaluation description and the first
    `examples_per_task` of its test instances (`held_out`; else of its train instances, for a
    probe of training tasks). Deterministic: the same tasks give the same probe."""
    if not tasks:
        raise ValueError("a probe needs at least one task")
    ocfg = OracleConfig()
    descriptions, seqs = [], []
    for t in tasks:
        evals = split_descriptions(t)[1]
        if not evals:
            raise ValueError(f"task {t.name} has no evaluation description")
        d = evals[0]
        train, test = split_instances(t)
        chosen = (test if held_out else train)[:examples_per_task]
        if not chosen:
            raise ValueError(f"task {t.name} has no {'test' if held_out else 'train'} instances")
        descriptions.append(d)
        seqs.append([_joined(encode_example(tokenizer, x.input, x.outputs[0], ocfg.max_input_tokens,
                                            ocfg.max_output_tokens, d if system_prompt else None)) for x in chosen])
    controls = [random_description(t.name, 0, 0, len(d)) for t, d in zip(tasks, descriptions)]
    return ProbeSet([t.name for t in tasks], descriptions, controls, encoder.encode(descriptions),
                    encoder.encode(controls), seqs)


def _joined(example: tuple[list[int], list[int]]) -> Seq:
    prompt, output = example
    return prompt + output, len(prompt)


@torch.no_grad()
def conditioned_ce(
    model: torch.nn.Module, sampler: dict, cond: torch.Tensor, probe: ProbeSet, base: torch.nn.Module,
    multi: MultiLoRA, pad_id: int, seed: int = 0, tokens_per_microbatch: int = 32768,
) -> torch.Tensor:
    """(k,) each probe task's mean output-token CE under the adapter generated from row j of
    `cond` (k, d_cond), made as SFT makes it (`sft_factors`, fresh noise from `seed`)."""
    device = next(base.parameters()).device
    g = torch.Generator().manual_seed(seed)
    A, B = model.sft_factors(cond.to(device), g, sampler["steps"], sampler["guidance"])
    return factors_ce(A, B, probe, base, multi, pad_id, tokens_per_microbatch)


@torch.no_grad()
def factors_ce(
    A: dict[str, torch.Tensor], B: dict[str, torch.Tensor], probe: ProbeSet, base: torch.nn.Module,
    multi: MultiLoRA, pad_id: int, tokens_per_microbatch: int = 32768,
) -> torch.Tensor:
    """(k,) each probe task's mean output-token CE under its adapter: row j of the factors
    A[m] (k, L, r, d_in), B[m] (k, L, d_out, r)."""
    device = next(base.parameters()).device
    rows = [(j, seq) for j, seqs in enumerate(probe.seqs) for seq in seqs]
    sums, counts = torch.zeros(len(probe.seqs), device=device), torch.zeros(len(probe.seqs), device=device)
    for group in microbatches([len(r[1][0]) for r in rows], tokens_per_microbatch):
        which = torch.tensor([rows[i][0] for i in group], device=device)
        with multi.use_factors({m: a[which] for m, a in A.items()}, {m: b[which] for m, b in B.items()}):
            ce, row = output_token_ce(base, [rows[i][1] for i in group], pad_id)
        sums.index_add_(0, which[row], ce.float())
        counts.index_add_(0, which[row], torch.ones_like(ce, dtype=torch.float))
    return (sums / counts).cpu()


def run_probe(
    model: torch.nn.Module, sampler: dict, probe: ProbeSet, base: torch.nn.Module, multi: MultiLoRA, pad_id: int,
) -> dict[str, float]:
    """The probe's means over its tasks: `probe_ce_right`, `probe_ce_random`, `probe_gap` (their
    difference: what the description adds). The model is put in eval mode for it and back after."""
    was_training = model.training
    model.eval()
    try:
        right = conditioned_ce(model, sampler, probe.cond, probe, base, multi, pad_id)
        control = conditioned_ce(model, sampler, probe.control_cond, probe, base, multi, pad_id)
    finally:
        model.train(was_training)
    return {"probe_ce_right": float(right.mean()), "probe_ce_random": float(control.mean()),
            "probe_gap": float((control - right).mean())}
