"""T2L trained by SFT through the real base model: a tiny run on two real SNI tasks, the
checkpoint it writes, and the time limit that stops a run early and lets it resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from generator import Generator
from generator.config import T2LConfig, TargetSpec, TrainConfig
from generator.data.library import save_task
from generator.data.synthetic import synthetic_adapters
from generator.training.sft import SFTConfig, train_t2l_sft
from generator.data.sni import load_tasks
from generator.training.train import STATE_FILE

from .fixtures_generator import base_model_dir  # noqa: F401  (fixture)

TASKS_DIR = Path(__file__).resolve().parents[1] / "data" / "sni" / "tasks"
NAMES = ["task1146_country_capital", "task1508_wordnet_antonyms"]


@pytest.fixture(scope="module")
def sni_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real tasks with their own descriptions; the factors only fit the standardiser."""
    root = tmp_path_factory.mktemp("sni_library")
    adapters = synthetic_adapters(TargetSpec.smollm2(), len(NAMES), torch.Generator().manual_seed(0))
    for task, adapter in zip(load_tasks(TASKS_DIR, NAMES), adapters):
        save_task(root, task.name, adapter, task.descriptions[:4])
    return root


def _train(library: Path, out: Path, **kw) -> Generator:
    return train_t2l_sft(
        TASKS_DIR, library, out, model_cfg=T2LConfig(latent_size=32, head_in=32),
        cfg=TrainConfig(steps=2, lr=1e-3, checkpoint_every=0),
        sft=SFTConfig(tasks_per_step=2, examples_per_task=2), device="cpu", progress=False, **kw,
    )


def test_sft_writes_a_t2l_checkpoint(base_model_dir, sni_library, tmp_path):  # noqa: F811
    gen = _train(sni_library, tmp_path / "ck")
    assert gen.kind == "t2l" and gen.extra["training"] == "sft" and gen.extra["stopped_at"] is None
    assert torch.isfinite(torch.tensor(gen.extra["final"]["sft_loss"]))
    assert not (tmp_path / "ck" / STATE_FILE).exists()  # finished: no training state left behind
    loaded = Generator.load(tmp_path / "ck")
    assert loaded.fingerprint == gen.fingerprint
    assert loaded.generate(["Name the capital city of a country."])[0].target == gen.target


def test_time_limit_stops_early_keeps_a_checkpoint_and_resumes(base_model_dir, sni_library, tmp_path):  # noqa: F811
    cut = _train(sni_library, tmp_path / "ck", max_seconds=0)  # the limit is spent on set-up
    assert cut.extra["stopped_at"] == 0
    assert (tmp_path / "ck" / "model.safetensors").is_file() and (tmp_path / "ck" / STATE_FILE).is_file()
    done = _train(sni_library, tmp_path / "ck", resume=True)
    assert done.extra["stopped_at"] is None and done.fingerprint != cut.fingerprint
    assert not (tmp_path / "ck" / STATE_FILE).exists()
