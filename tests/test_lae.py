"""The LoRA autoencoder: MoE gating and load balancing, and reconstruction of a 32-adapter library."""

from __future__ import annotations

import pytest
import torch

from generator.config import LAEConfig, TargetSpec
from generator.models.lae import LoRAAutoencoder, MoEHead


def test_gates_of_chosen_experts_sum_to_one():
    torch.manual_seed(0)
    for k in (1, 2, 3):
        head = MoEHead(d_in=12, d_out=5, num_experts=4, top_k=k, hidden=8, tau=1.5)
        gates, idx, probs = head.route(torch.randn(50, 12))
        assert gates.shape == idx.shape == (50, k)
        assert torch.allclose(gates.sum(-1), torch.ones(50)) and (gates > 0).all()
        assert torch.allclose(probs.sum(-1), torch.ones(50))
        assert (idx.unique(dim=1) == idx).all() if k == 1 else all(len(set(r)) == k for r in idx.tolist())


@pytest.mark.parametrize("k", [1, 2])
def test_moe_output_is_the_gated_sum_of_chosen_experts(k: int):
    """Top-2 sums its experts by gate; top-1 (its own path) copies each row from its one expert."""
    torch.manual_seed(k)
    head = MoEHead(d_in=6, d_out=3, num_experts=4, top_k=k, hidden=4, tau=1.5)
    h = torch.randn(40, 6)
    out, aux = head(h)
    gates, idx, _ = head.route(h)
    assert len(idx.unique()) > 1  # the rows go to several experts
    expected = torch.stack([
        sum(gates[n, j] * head.experts[int(idx[n, j])](h[n]) for j in range(k)) for n in range(40)
    ])
    assert torch.allclose(out, expected, atol=1e-6) and aux >= 1.0 - 1e-6


def test_balance_loss_of_a_head_rises_when_its_router_collapses():
    torch.manual_seed(2)
    head = MoEHead(d_in=6, d_out=3, num_experts=4, top_k=1, hidden=4, tau=1.5)
    h = torch.randn(256, 6)
    _, balanced = head(h)
    with torch.no_grad():
        head.router.weight.zero_()
        head.router.bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    _, collapsed = head(h)
    assert collapsed > balanced + 1.0 and collapsed <= 4.0 + 1e-6


def test_encode_decode_shapes_and_module_major_tokens():
    target = TargetSpec.smollm2()
    lae = LoRAAutoencoder(target, LAEConfig())
    A = {m: torch.randn(2, 30, 8, target.shapes[m][0]) for m in target.modules}
    B = {m: torch.randn(2, 30, target.shapes[m][1], 8) for m in target.modules}
    mu, logvar = lae.encode(A, B)
    assert mu.shape == logvar.shape == (2, 60, 64)
    A_hat, B_hat, aux = lae.decode(mu)
    assert A_hat["v_proj"].shape == (2, 30, 8, 576) and B_hat["v_proj"].shape == (2, 30, 192, 8)
    # Token 30 is (v_proj, layer 0): changing v_proj's layer-0 input changes only that token.
    A2 = {m: a.clone() for m, a in A.items()}
    A2["v_proj"][:, 0] += 1.0
    mu2, _ = lae.encode(A2, B)
    changed = (mu2 - mu).abs().amax(-1).amax(0) > 0
    assert changed.nonzero().flatten().tolist() == [30]


def test_decoding_whole_adapters_equals_decoding_their_tokens():
    """`decode` broadcasts the layer statistics over adapters; per-token decoding gathers them."""
    torch.manual_seed(4)
    target = TargetSpec.smollm2()
    lae = LoRAAutoencoder(target, LAEConfig())
    L = target.num_layers
    with torch.no_grad():
        for name, buf in lae.named_buffers():  # statistics that differ by layer
            buf.copy_(torch.randn_like(buf) if "mean" in name else torch.rand_like(buf) + 0.5)
        z = torch.randn(3, 2 * L, 64)
        A, B, _ = lae.decode(z)
        for i, m in enumerate(target.modules):
            layers = torch.arange(L).repeat(3)
            a, b, _ = lae.decode_tokens(m, z[:, i * L : (i + 1) * L].reshape(3 * L, -1), layers)
            assert torch.equal(A[m], a.view(3, L, *a.shape[1:])) and torch.equal(B[m], b.view(3, L, *b.shape[1:]))


def test_lae_reconstructs_a_32_adapter_library(loragen32):
    gen, data = loragen32
    lae = gen.model.lae
    A_hat, B_hat = lae.reconstruct(data.A, data.B)
    from generator.models.losses import delta_cosine

    cos = torch.cat([delta_cosine(A_hat[m].double(), B_hat[m].double(), data.A[m].double(), data.B[m].double()).flatten()
                     for m in data.target.modules])  # every (adapter, location)
    assert cos.numel() == 32 * 60
    assert cos.mean() >= 0.9, cos.mean()
    assert cos.quantile(0.05) >= 0.75, cos.quantile(0.05)
    # Magnitudes too, not only directions (the spectral loss): ||dW_hat|| / ||dW|| near 1.
    from generator.models.losses import delta_norm

    ratio = torch.cat([(delta_norm(A_hat[m], B_hat[m]) / delta_norm(data.A[m], data.B[m])).flatten()
                       for m in data.target.modules])
    assert (ratio.median() - 1).abs() < 0.15
