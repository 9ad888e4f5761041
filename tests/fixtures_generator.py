"""Session-scoped fixtures of the generator package, shared by all test modules.

* `base_model_dir`: the converted SmolLM2-135M-Instruct folder (`ensure_base_model()`).
* `synthetic_library`: a small synthetic LoRA library (SmolLM2 shapes, q_proj + v_proj).
* `tiny_generator_ckpt`: a small generator checkpoint trained on that library in well under a
  minute on a 2-core CPU; serving tests load it with `generator.Generator.load`.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    from generator.base_model import ensure_base_model

    return ensure_base_model()


@pytest.fixture(scope="session")
def synthetic_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from generator.data.synthetic import make_synthetic_library

    return make_synthetic_library(tmp_path_factory.mktemp("library"), num_tasks=8, descriptions_per_task=2, seed=0)


# A small LoRAGen for tests that need *a* generator (serving, API, CLI): SmolLM2 target
# (q_proj, v_proj, 30 layers, r=8), small LAE and DiT, short training.
TINY_CONFIGS = {
    "lae": {"d_z": 16, "enc_hidden": 64, "expert_hidden": 32},
    "diffusion": {"d_model": 64, "depth": 2, "num_heads": 2, "sample_steps": 10},
}
TINY_TRAIN = {"steps": 120, "diffusion_steps": 120, "tokens_per_step": 32, "batch_size": 8, "lr": 3e-3,
              "checkpoint_every": 0}


@pytest.fixture(scope="session")
def tiny_generator_ckpt(tmp_path_factory: pytest.TempPathFactory, synthetic_library: Path) -> Path:
    """Checkpoint folder of a LoRAGen generator trained on `synthetic_library` (~10-30 s on 2 cores)."""
    import torch

    from generator.config import TrainConfig
    from generator.training.train import train

    out = tmp_path_factory.mktemp("tiny_generator")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train("loragen", synthetic_library, out, TrainConfig(**TINY_TRAIN), TINY_CONFIGS, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def library32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 synthetic adapters at SmolLM2 shapes (q_proj, v_proj, 30 layers, r=8), 2 descriptions each."""
    from generator.data.synthetic import make_synthetic_library

    return make_synthetic_library(tmp_path_factory.mktemp("library32"), num_tasks=32, descriptions_per_task=2, seed=1)


@pytest.fixture(scope="session")
def loragen32(tmp_path_factory: pytest.TempPathFactory, library32: Path):
    """LoRAGen (default LAE, smaller DiT) trained on `library32`: (Generator, TrainingData). ~1-2 min."""
    import torch

    from generator.config import DiffusionConfig, LAEConfig, TrainConfig
    from generator.training.train import load_training_data, train_loragen

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread beats two contending ones
    try:
        data = load_training_data(library32)
        gen = train_loragen(
            data, tmp_path_factory.mktemp("loragen32"), LAEConfig(),
            DiffusionConfig(d_model=96, depth=2, num_heads=2, sample_steps=20),
            TrainConfig(steps=400, diffusion_steps=1000, tokens_per_step=64, batch_size=32, lr=3e-3, checkpoint_every=0),
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    return gen, data
