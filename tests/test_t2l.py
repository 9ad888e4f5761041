"""T2L hypernetwork baseline: shapes, standardisation, and learning a small library."""

from __future__ import annotations

import pytest
import torch

from generator.config import T2LConfig, TargetSpec, TrainConfig
from generator.models.t2l import T2L

SMALL = T2LConfig(latent_size=64, head_in=64, dropout=0.0)


def test_forward_shapes_cover_every_location():
    target = TargetSpec.smollm2()
    model = T2L(target, SMALL).eval()
    A, B = model.generate(torch.randn(3, 384))
    assert A["q_proj"].shape == (3, 30, 8, 576) and B["q_proj"].shape == (3, 30, 576, 8)
    assert A["v_proj"].shape == (3, 30, 8, 576) and B["v_proj"].shape == (3, 30, 192, 8)
    # Different descriptions -> different adapters; modules get different outputs.
    assert not torch.allclose(A["q_proj"][0], A["q_proj"][1])


def test_standardizer_roundtrip():
    target = TargetSpec.smollm2(modules=("v_proj",))
    model = T2L(target, SMALL)
    A = {"v_proj": torch.randn(5, 30, 8, 576) * 0.1 + 1.0}
    B = {"v_proj": torch.randn(5, 30, 192, 8) * 0.01}
    model.standardizer.fit(A, B)
    nA, nB = model.standardizer.normalize(A, B)
    assert abs(nA["v_proj"].mean().item()) < 1e-4 and abs(nB["v_proj"].std().item() - 1) < 0.05
    rA, rB = model.standardizer.denormalize(nA, nB)
    assert torch.allclose(rA["v_proj"], A["v_proj"], atol=1e-5) and torch.allclose(rB["v_proj"], B["v_proj"], atol=1e-6)


@pytest.fixture(scope="module")
def trained_t2l(synthetic_library, tmp_path_factory):
    from generator.training.train import load_training_data, train_t2l

    torch.set_num_threads(1)
    data = load_training_data(synthetic_library)
    gen = train_t2l(data, tmp_path_factory.mktemp("t2l"), SMALL,
                    TrainConfig(steps=150, batch_size=8, lr=3e-3, checkpoint_every=0), progress=False)
    return gen, data


def test_t2l_learns_its_library(trained_t2l):
    gen, data = trained_t2l
    assert gen.kind == "t2l" and gen.extra["final"]["l1"] < 0.6
    # One description per task: its generated adapter is closest to its own task's adapter.
    first = [int((data.desc_task == t).nonzero()[0]) for t in range(data.num_tasks)]
    adapters = gen.generate([data.descriptions[i] for i in first])
    targets = _library_adapters(data)
    cos = torch.stack([torch.stack([a.cosine_to(b).mean() for b in targets]) for a in adapters])  # (gen, target)
    hits = (cos.argmax(1) == torch.arange(len(adapters))).float().mean()
    assert hits >= 0.75, cos  # a short CPU run: most tasks are already told apart
    assert cos.diagonal().mean() > cos.mean() + 0.2


def _library_adapters(data):
    from generator.adapter import unstack_adapters

    return unstack_adapters(data.target, data.A, data.B)


def test_t2l_is_deterministic_and_seed_independent(trained_t2l):
    gen, data = trained_t2l
    a = gen.generate([data.descriptions[0]], seed=0)[0]
    b = gen.generate([data.descriptions[0]], seed=5)[0]
    assert torch.equal(a.B["q_proj"], b.B["q_proj"])  # T2L is a deterministic function of the description
