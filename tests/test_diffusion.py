"""Latent diffusion: schedule and v-prediction identities, exact DDIM with an oracle, the DiT, and
generation on the 32-adapter library."""

from __future__ import annotations

import pytest
import torch

from generator.config import DiffusionConfig
from generator.models.diffusion import GaussianDiffusion, initial_noise
from generator.models.dit import DiT


def test_linear_schedule_and_v_identities():
    d = GaussianDiffusion(500)
    a = d.alphas_cumprod
    assert a.shape == (500,) and (a[1:] < a[:-1]).all() and 0 < a[-1] < 0.01 and a[0] > 0.999
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 6, 3, generator=g), torch.randn(4, 6, 3, generator=g)
    t = torch.tensor([0, 10, 250, 499])
    xt, v = d.q_sample(x0, t, eps), d.v_target(x0, t, eps)
    at = a[t].float().view(-1, 1, 1)
    assert torch.allclose(at.sqrt() * xt - (1 - at).sqrt() * v, x0, atol=1e-5)  # x0 from (x_t, v)
    assert torch.allclose((1 - at).sqrt() * xt + at.sqrt() * v, eps, atol=1e-5)  # eps from (x_t, v)


@pytest.mark.parametrize("steps", [1, 5, 20, 500])
def test_ddim_with_an_oracle_denoiser_returns_the_data_exactly(steps):
    d = GaussianDiffusion(500)
    x0 = torch.randn(3, 7, 4, dtype=torch.float64)

    def oracle(x, t, cond, drop):  # the true v for this x0
        a = d.alphas_cumprod[t].view(-1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    noise = torch.randn(3, 7, 4, dtype=torch.float64)
    out = d.ddim_sample(oracle, torch.zeros(3, 2, dtype=torch.float64), noise, steps=steps)
    assert torch.allclose(out, x0, atol=1e-8)
    assert len(d.timesteps(steps)) == steps and d.timesteps(steps)[0] == 499 and d.timesteps(steps)[-1] in (0, 499)


def test_bad_step_count_is_rejected():
    with pytest.raises(ValueError):
        GaussianDiffusion(500).timesteps(0)
    with pytest.raises(ValueError):
        GaussianDiffusion(500).timesteps(501)


def test_classifier_free_guidance_combines_conditional_and_null_predictions():
    d = GaussianDiffusion(50)
    calls = []

    def model(x, t, cond, drop):
        calls.append(x.shape[0])
        return torch.where(drop[:, None, None], torch.zeros_like(x), torch.ones_like(x)) if drop is not None else torch.ones_like(x)

    x = torch.zeros(2, 3, 1)
    guided = d.ddim_sample(model, torch.zeros(2, 4), x, steps=1, guidance=3.0)  # v = 0 + 3 * (1 - 0)
    a = d.alphas_cumprod[49].float()
    assert calls == [4]  # conditional and null in one batched pass
    assert torch.allclose(guided, torch.full_like(x, float(-(1 - a).sqrt() * 3.0)), atol=1e-6)


def test_dit_starts_as_zero_and_sees_every_input():
    cfg = DiffusionConfig(d_model=32, depth=2, num_heads=2)
    dit = DiT(d_z=8, num_modules=2, num_layers=3, cfg=cfg)
    x, t, c = torch.randn(2, 6, 8), torch.tensor([3, 400]), torch.randn(2, 384)
    assert torch.equal(dit(x, t, c), torch.zeros(2, 6, 8))  # adaLN-Zero + zero final layer
    for p in dit.parameters():  # leave the zero init: every input must then matter
        torch.nn.init.normal_(p, std=0.1)
    out = dit(x, t, c)
    assert not torch.allclose(out, dit(x, t, torch.randn(2, 384)))  # description
    assert not torch.allclose(out, dit(x, torch.tensor([100, 10]), c))  # timestep
    assert not torch.allclose(out, dit(x, t, c, drop=torch.tensor([True, True])))  # null condition
    x2 = x.clone()
    x2[:, 0] += 1
    assert not torch.allclose(out[:, 5], dit(x2, t, c)[:, 5])  # attention mixes tokens


def test_initial_noise_depends_only_on_each_generator():
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    both = initial_noise((4, 2), [g(1), g(2)])
    assert torch.equal(both[1], initial_noise((4, 2), [g(2)])[0])


def test_generated_adapter_is_closest_to_its_own_target(loragen32):
    gen, data = loragen32
    from generator.adapter import unstack_adapters

    targets = unstack_adapters(data.target, data.A, data.B)
    first = [int((data.desc_task == t).nonzero()[0]) for t in range(data.num_tasks)]
    adapters = gen.generate([data.descriptions[i] for i in first], seed=0)
    cos = torch.stack([torch.stack([a.cosine_to(b).mean() for b in targets]) for a in adapters])  # (gen, target)
    hits = cos.argmax(1) == torch.arange(data.num_tasks)
    # A short CPU training run: nearly every training description already yields an adapter
    # closer to its own target than to any of the 31 others (measured 30/32, own cos 0.87).
    assert hits.float().mean() >= 0.85, cos.argmax(1)
    assert cos.diagonal().mean() >= 0.75 and cos.diagonal().mean() > cos.mean() + 0.3
    # Few sampler steps reach the quality of the full 500-step sampler.
    few = gen.generate([data.descriptions[first[0]]], seed=0, steps=10)[0]
    full = gen.generate([data.descriptions[first[0]]], seed=0, steps=500)[0]
    assert few.cosine_to(targets[0]).mean() > full.cosine_to(targets[0]).mean() - 0.05
