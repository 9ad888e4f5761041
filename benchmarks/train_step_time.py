"""Milliseconds per optimiser step of the LAE, the DiT and T2L at SmolLM2 shapes, on random data.

Sizes a training run before it is started on a lent GPU (no model files or encoder needed):

    python benchmarks/train_step_time.py [cuda|cpu] [steps]

Batches as in benchmarks/quality/gpu_pipeline.sh: 256 LAE tokens per module, 128 descriptions
per DiT or T2L step, a library of 100 synthetic adapters with 1000 random description embeddings.
Measured on an H100 (2026-11-23): LAE 35.1 ms, DiT 20.8 ms, T2L 16.9 ms per step.
"""

from __future__ import annotations

import tempfile
import time

import torch

from generator.adapter import stack_adapters
from generator.config import TargetSpec, TrainConfig
from generator.data.synthetic import synthetic_adapters
from generator.training.train import TrainingData, train_loragen, train_t2l

WARMUP = 10  # steps excluded from the timing (allocator, kernel selection)


def main(device: str = "cuda", steps: int = 60) -> dict[str, float]:
    target = TargetSpec.smollm2()
    A, B = stack_adapters(synthetic_adapters(target, 100, torch.Generator().manual_seed(0)))
    num_desc = 1000
    cond = torch.nn.functional.normalize(torch.randn(num_desc, 384), dim=-1)
    data = TrainingData(target, [f"t{i}" for i in range(100)], A, B, cond, torch.arange(num_desc) % 100,
                        [f"d{i}" for i in range(num_desc)]).to(device)
    marks: dict[tuple[str, int], float] = {}

    def mark(stage: str, step: int) -> None:
        if step in (WARMUP, steps):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            marks[(stage, step)] = time.perf_counter()

    cfg = TrainConfig(steps=steps, diffusion_steps=steps, batch_size=128, tokens_per_step=256, checkpoint_every=0)
    with tempfile.TemporaryDirectory() as tmp:
        train_loragen(data, f"{tmp}/loragen", cfg=cfg, progress=False, callback=mark)
        train_t2l(data, f"{tmp}/t2l", cfg=cfg, progress=False, callback=mark)
    ms = {s: 1000 * (marks[(s, steps)] - marks[(s, WARMUP)]) / (steps - WARMUP) for s in ("lae", "dit", "t2l")}
    for stage, v in ms.items():
        print(f"{device}: {stage} {v:.1f} ms per step")
    return ms


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python benchmarks/train_step_time.py", description=__doc__.split("\n")[0])
    ap.add_argument("device", nargs="?", default="cuda", help="torch device (default cuda)")
    ap.add_argument("steps", nargs="?", type=int, default=60, help=f"steps per stage, more than {WARMUP} (default 60)")
    a = ap.parse_args()
    if a.steps <= WARMUP:
        ap.error(f"steps must be more than the {WARMUP} warm-up steps")
    main(a.device, a.steps)
