"""The LoRAGen stage-2 denoiser: a diffusion transformer (DiT, Peebles & Xie 2023) over latent tokens.

One token per adapter location (module m, layer l), carrying that location's LAE latent z_{m,l}.
Each token gets learned module and layer embeddings (its "position"); the sequence is processed by
DiT blocks with adaLN-Zero conditioning on c = embed(timestep) + embed(description). The
description embedding is replaced by a learned null embedding when dropped (classifier-free
guidance). The model predicts v (see `diffusion.py`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import DiffusionConfig


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, per sample. x: (N, P, D); shift, scale: (N, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


# ----------------------------------------------------------------------------------------------
# Embedding layers


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (N, D): sinusoidal features then an MLP."""

    def __init__(self, d: int, freq_dim: int = 128) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1))


class ConditionEmbedder(nn.Module):
    """Description embeddings -> (N, D), with a learned null embedding for dropped conditions."""

    def __init__(self, d_cond: int, d: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_cond, d), nn.SiLU(), nn.Linear(d, d))
        self.null = nn.Parameter(torch.zeros(d))

    def forward(self, cond: Tensor, drop: Tensor | None = None) -> Tensor:
        """drop: (N,) bool, True where the description is replaced by the null embedding."""
        c = self.mlp(cond)
        if drop is not None:
            c = torch.where(drop[:, None], self.null.expand_as(c), c)
        return c


# ----------------------------------------------------------------------------------------------
# Core DiT model


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: shift/scale/gate for attention and MLP from c."""

    def __init__(self, d: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(d, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift_a, scale_a)
        x = x + gate_a[:, None] * self.attn(h, h, h, need_weights=False)[0]
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map back to the latent size."""

    def __init__(self, d: int, d_out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, d_out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Denoiser over the P = M * L latent tokens of one adapter: (x_t, t, cond) -> v."""

    def __init__(self, d_z: int, num_modules: int, num_layers: int, cfg: DiffusionConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.num_modules, self.num_layers = num_modules, num_layers
        self.x_embed = nn.Linear(d_z, d)
        self.module_emb = nn.Parameter(torch.randn(num_modules, d) * 0.02)
        self.layer_emb = nn.Parameter(torch.randn(num_layers, d) * 0.02)
        self.t_embed = TimestepEmbedder(d)
        self.c_embed = ConditionEmbedder(cfg.d_cond, d)
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final = FinalLayer(d, d_z)
        self._init_weights()

    def _init_weights(self) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        for block in self.blocks:  # adaLN-Zero: every residual branch starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def pos_embed(self) -> Tensor:
        """(P, D): module embedding + layer embedding per token, module-major like TargetSpec.locations."""
        return (self.module_emb[:, None] + self.layer_emb[None]).reshape(-1, self.module_emb.shape[-1])

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, drop: Tensor | None = None) -> Tensor:
        """x: (N, P, d_z), t: (N,), cond: (N, d_cond) -> v: (N, P, d_z)."""
        h = self.x_embed(x) + self.pos_embed()[None]
        c = self.t_embed(t) + self.c_embed(cond, drop)
        for block in self.blocks:
            h = block(h, c)
        return self.final(h, c)
