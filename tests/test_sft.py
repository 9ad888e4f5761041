"""Generators trained by SFT through the real base model: tiny runs on two real SNI tasks, the
checkpoints they write, the time limit that stops a run early and lets it resume, and LoRAGen
SFT's gradient reaching the denoiser through every sampler step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from generator import Generator
from generator.config import T2LConfig, TargetSpec, TrainConfig
from generator.data.library import save_task
from generator.data.sni import load_tasks
from generator.data.synthetic import synthetic_adapters
from generator.training.sft import SFTConfig, load_sft_tasks, train_sft
from generator.training.train import STATE_FILE

from .fixtures_generator import base_model_dir, synthetic_library, tiny_generator_ckpt  # noqa: F401  (fixtures)

TASKS_DIR = Path(__file__).resolve().parents[1] / "data" / "sni" / "tasks"
NAMES = ["task1146_country_capital", "task1508_wordnet_antonyms"]
TINY = dict(cfg=TrainConfig(steps=2, lr=1e-3, checkpoint_every=0), device="cpu", progress=False)


@pytest.fixture(scope="module")
def sni_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real tasks with their own descriptions; the factors only fit the standardiser."""
    root = tmp_path_factory.mktemp("sni_library")
    adapters = synthetic_adapters(TargetSpec.smollm2(), len(NAMES), torch.Generator().manual_seed(0))
    for task, adapter in zip(load_tasks(TASKS_DIR, NAMES), adapters):
        save_task(root, task.name, adapter, task.descriptions[:4])
    return root


def _train_t2l(library: Path, out: Path, **kw) -> Generator:
    return train_sft(out, "t2l", TASKS_DIR, NAMES, library=library, model_cfg=T2LConfig(latent_size=32, head_in=32),
                     sft=SFTConfig(tasks_per_step=2, examples_per_task=2), **TINY, **kw)


def test_sft_writes_a_t2l_checkpoint(base_model_dir, sni_library, tmp_path):  # noqa: F811
    gen = _train_t2l(sni_library, tmp_path / "ck")
    assert gen.kind == "t2l" and gen.extra["training"] == "sft" and gen.extra["stopped_at"] is None
    assert gen.extra["library"]["tasks"] == NAMES
    assert torch.isfinite(torch.tensor(gen.extra["final"]["sft_loss"]))
    assert not (tmp_path / "ck" / STATE_FILE).exists()  # finished: no training state left behind
    loaded = Generator.load(tmp_path / "ck")
    assert loaded.fingerprint == gen.fingerprint
    assert loaded.generate(["Name the capital city of a country."])[0].target == gen.target


def test_time_limit_stops_early_keeps_a_checkpoint_and_resumes(base_model_dir, sni_library, tmp_path):  # noqa: F811
    cut = _train_t2l(sni_library, tmp_path / "ck", max_seconds=0)  # the limit is spent on set-up
    assert cut.extra["stopped_at"] == 0
    assert (tmp_path / "ck" / "model.safetensors").is_file() and (tmp_path / "ck" / STATE_FILE).is_file()
    done = _train_t2l(sni_library, tmp_path / "ck", resume=True)
    assert done.extra["stopped_at"] is None and done.fingerprint != cut.fingerprint
    assert not (tmp_path / "ck" / STATE_FILE).exists()


def test_train_descriptions_only():
    """SFT conditions on train descriptions: never on a task's evaluation descriptions."""
    from generator.api import shared_encoder
    from generator.data.sni import split_descriptions

    data = load_sft_tasks(TASKS_DIR, NAMES, shared_encoder("cpu"))
    held_out = {d for t in data.tasks for d in split_descriptions(t)[1]}
    assert data.descriptions and not held_out & set(data.descriptions)
    assert data.cond.shape == (len(data.descriptions), 384)
    assert sorted(set(data.desc_task.tolist())) == [0, 1]


def test_loragen_sft_trains_the_denoiser_through_the_sampler(base_model_dir, tiny_generator_ckpt, tmp_path):  # noqa: F811
    """From a reconstruction-trained LoRAGen: the denoiser and decoder move, the LAE encoder (no
    part of generation) does not, the checkpoint serves with the sampler it was trained through."""
    init = Generator.load(tiny_generator_ckpt)
    sft = SFTConfig(tasks_per_step=2, examples_per_task=2, system_prompt=True, sampler_steps=3, guidance=2.0)
    gen = train_sft(tmp_path / "ck", "loragen", TASKS_DIR, NAMES, init=tiny_generator_ckpt, sft=sft, **TINY)
    assert gen.kind == "loragen" and gen.extra["init"] == init.fingerprint
    assert gen.sampler == {"steps": 3, "guidance": 2.0}
    before, after = init.model.state_dict(), gen.model.state_dict()
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(n.startswith("dit.") for n in moved), "no gradient reached the denoiser"
    assert any(n.startswith("lae.heads_") for n in moved), "no gradient reached the LAE decoder"
    assert not any(n.startswith("lae.encoders.") for n in moved)
    loaded = Generator.load(tmp_path / "ck")
    assert loaded.fingerprint == gen.fingerprint and loaded.sampler == gen.sampler


def test_loragen_sft_needs_a_starting_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="reconstruction-trained checkpoint"):
        train_sft(tmp_path / "ck", "loragen", TASKS_DIR, NAMES, **TINY)


def test_init_of_another_kind_is_refused(tiny_generator_ckpt, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="is a loragen checkpoint, not t2l"):
        train_sft(tmp_path / "ck", "t2l", TASKS_DIR, NAMES, init=tiny_generator_ckpt, **TINY)
