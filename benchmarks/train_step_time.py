"""Milliseconds per optimiser step of the LAE, the DiT and T2L at SmolLM2 shapes, on random data.

Sizes a training run before it is started on a lent GPU (no model files or encoder needed):

    python benchmarks/train_step_time.py [cuda|cpu] [steps]

Batches as in benchmarks/quality/gpu_generators.sh (256 LAE tokens per module, 128 descriptions).
"""
import sys, time, torch
from generator.config import TargetSpec, TrainConfig
from generator.train import TrainingData, train_loragen, train_t2l
from generator.library import synthetic_adapters
from generator.adapter import stack_adapters

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 60
tgt = TargetSpec.smollm2()
g = torch.Generator().manual_seed(0)
A, B = stack_adapters(synthetic_adapters(tgt, 100, g))
D = 1000
data = TrainingData(tgt, [f"t{i}" for i in range(100)], A, B, torch.nn.functional.normalize(torch.randn(D, 384), dim=-1),
                    torch.arange(D) % 100, [f"d{i}" for i in range(D)]).to(dev)
marks = {}
def cb(stage, step):
    if step in (10, steps):
        if dev == "cuda": torch.cuda.synchronize()
        marks[(stage, step)] = time.perf_counter()
cfg = TrainConfig(steps=steps, diffusion_steps=steps, batch_size=128, tokens_per_step=256, checkpoint_every=0)
train_loragen(data, f"/tmp/step_time_{dev}_loragen", cfg=cfg, progress=False, callback=cb)
train_t2l(data, f"/tmp/step_time_{dev}_t2l", cfg=cfg, progress=False, callback=cb)
for stage in ("lae", "dit", "t2l"):
    ms = 1000 * (marks[(stage, steps)] - marks[(stage, 10)]) / (steps - 10)
    print(f"{dev}: {stage} {ms:.1f} ms per step")
