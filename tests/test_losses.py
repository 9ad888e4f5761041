"""Weight-space losses from factors vs the explicitly multiplied dW = B A (LoRAGen Eq. 2, 3, 8)."""

from __future__ import annotations

import pytest
import torch

from generator.models.losses import (
    delta_cosine,
    delta_singular_values,
    direction_loss,
    energy_topk_mask,
    frobenius_inner,
    kl_divergence,
    moe_balance_loss,
    spectral_loss,
)


def _factors(g: torch.Generator, n: int = 5, r: int = 4, d_in: int = 13, d_out: int = 7):
    A = torch.randn(n, r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(n, d_out, r, generator=g, dtype=torch.float64)
    return A, B


def test_frobenius_inner_and_cosine_match_explicit_products():
    g = torch.Generator().manual_seed(0)
    A1, B1 = _factors(g)
    A2, B2 = _factors(g)
    W1, W2 = B1 @ A1, B2 @ A2
    assert torch.allclose(frobenius_inner(A1, B1, A2, B2), (W1 * W2).sum((-2, -1)))
    explicit = torch.nn.functional.cosine_similarity(W1.flatten(1), W2.flatten(1), dim=1)
    assert torch.allclose(delta_cosine(A1, B1, A2, B2), explicit)
    assert torch.allclose(direction_loss(A1, B1, A2, B2), (1 - explicit).mean())


def test_direction_loss_is_invariant_to_the_factorisation():
    g = torch.Generator().manual_seed(1)
    A1, B1 = _factors(g)
    A2, B2 = _factors(g)
    R = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)  # invertible
    before = direction_loss(A1, B1, A2, B2)
    after = direction_loss(torch.linalg.solve(R, A1), B1 @ R, A2, B2)  # (B R, R^-1 A)
    assert torch.allclose(before, after)
    assert direction_loss(torch.linalg.solve(R, A1), B1 @ R, A1, B1).abs() < 1e-12
    # ...while the factors themselves moved a lot: a loss on A and B would not be invariant.
    assert (torch.linalg.solve(R, A1) - A1).abs().max() > 0.1


def test_singular_values_from_cholesky_core_match_svd_of_explicit_product():
    g = torch.Generator().manual_seed(2)
    A, B = _factors(g)
    assert torch.allclose(delta_singular_values(A, B), torch.linalg.svdvals(B @ A)[..., :4])


def test_spectral_loss_matches_explicit_formula():
    g = torch.Generator().manual_seed(3)
    A1, B1 = _factors(g)
    A2, B2 = _factors(g)
    rho = 0.85
    S_pred, S_true = torch.linalg.svdvals(B1 @ A1)[..., :4], torch.linalg.svdvals(B2 @ A2)[..., :4]
    expected = []
    for sp, st in zip(S_pred, S_true):
        energy = st**2 / (st**2).sum()
        k = int((energy.cumsum(0) < rho).sum()) + 1  # smallest k reaching rho
        w = st[:k] / st[:k].sum()
        expected.append((w * (sp[:k] - st[:k]) ** 2).sum())
    assert torch.allclose(spectral_loss(A1, B1, A2, B2, rho=rho), torch.stack(expected).mean())
    assert spectral_loss(A2, B2, A2, B2) < 1e-20
    R = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
    assert torch.allclose(spectral_loss(torch.linalg.solve(R, A1), B1 @ R, A2, B2), spectral_loss(A1, B1, A2, B2))


def test_energy_topk_mask():
    S = torch.tensor([[3.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # energies 9,1,1,0 / 1,1,1,1
    mask = energy_topk_mask(S, rho=0.85)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]


def test_losses_have_gradients_through_factors():
    g = torch.Generator().manual_seed(4)
    A1, B1 = _factors(g)
    A2, B2 = _factors(g)
    A1.requires_grad_(True)
    B1.requires_grad_(True)
    (direction_loss(A1, B1, A2, B2) + spectral_loss(A1, B1, A2, B2)).backward()
    assert A1.grad.abs().sum() > 0 and B1.grad.abs().sum() > 0 and torch.isfinite(A1.grad).all()


def test_kl_divergence():
    mu, logvar = torch.zeros(3, 8), torch.zeros(3, 8)
    assert kl_divergence(mu, logvar) == 0
    mu[0, 0] = 2.0
    assert torch.isclose(kl_divergence(mu, logvar), torch.tensor(2.0 / 3))  # 0.5 * 4 on one of 3 tokens


@pytest.mark.parametrize("E", [2, 4, 8])
def test_balance_loss_rises_when_routing_collapses(E):
    N = 64
    uniform = moe_balance_loss(torch.full((N, E), 1 / E), (torch.arange(N) % E)[:, None])
    probs = torch.zeros(N, E)
    probs[:, 0] = 1.0
    collapsed = moe_balance_loss(probs, torch.zeros(N, 1, dtype=torch.long))
    assert torch.isclose(uniform, torch.tensor(1.0)) and torch.isclose(collapsed, torch.tensor(float(E)))
    half = probs.clone()
    half[: N // 2] = 1 / E
    partial = moe_balance_loss(half, torch.cat([torch.arange(N // 2) % E, torch.zeros(N // 2, dtype=torch.long)])[:, None])
    assert uniform < partial < collapsed
