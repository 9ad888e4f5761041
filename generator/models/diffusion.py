"""Gaussian diffusion over latents: linear beta schedule, v-prediction, deterministic DDIM sampling.

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),  abar_t = prod_{s<=t} (1 - beta_s)
    v_t          = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0          (Salimans & Ho, 2022)

The denoiser predicts v; x_0 and eps follow from (x_t, v) exactly. Sampling is DDIM with eta = 0
(Song et al., 2021) on an evenly spaced subset of `steps` of the T training timesteps (DiT's
`respace` idea: fewer steps, same model), with classifier-free guidance
v = v_null + w (v_cond - v_null) computed in one batched pass. This module holds no weights.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

Denoiser = Callable[..., Tensor]  # (x_t, t, cond, drop) -> v


class GaussianDiffusion:
    """Schedule and sampler for T timesteps with betas linear in [beta_start, beta_end]."""

    def __init__(self, num_timesteps: int = 500, beta_start: float = 1e-4, beta_end: float = 2e-2) -> None:
        self.T = num_timesteps
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0)  # abar_t, (T,)
        self._on_device: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def schedule(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """abar (T,) on `device` in `dtype`, copied there once (sampling then never copies from the
        host, so that it can be captured as a CUDA graph)."""
        key = (torch.device(device), dtype)
        if key not in self._on_device:
            self._on_device[key] = self.alphas_cumprod.to(device=key[0], dtype=dtype)
        return self._on_device[key]

    def _abar(self, t: Tensor, like: Tensor) -> Tensor:
        """abar at integer timesteps t (N,), shaped to broadcast against `like` (N, ...)."""
        a = self.schedule(like.device, like.dtype)[t]
        return a.view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        a = self._abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def v_target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        a = self._abar(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def training_loss(
        self, model: Denoiser, x0: Tensor, cond: Tensor, drop_prob: float, generator: torch.Generator | None = None
    ) -> Tensor:
        """MSE between predicted and true v at uniformly drawn timesteps; drops conditions w.p. drop_prob."""
        N = x0.shape[0]
        t = torch.randint(self.T, (N,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        drop = (torch.rand(N, generator=generator) < drop_prob).to(x0.device)
        v = model(self.q_sample(x0, t, noise), t, cond, drop)
        return (v - self.v_target(x0, t, noise)).square().mean()

    def timesteps(self, steps: int) -> list[int]:
        """Evenly spaced timesteps from T-1 down to 0, `steps` of them."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"sampler steps must be in [1, {self.T}], got {steps}")
        ts = torch.linspace(self.T - 1, 0, steps).round().long().tolist()
        return list(dict.fromkeys(ts))  # drop duplicates, keep order

    def ddim_sample(
        self,
        model: Denoiser,
        cond: Tensor,
        noise: Tensor,
        steps: int,
        guidance: float = 1.0,
    ) -> Tensor:
        """Deterministic DDIM (eta = 0) from x_T = noise (N, ...) to x_0, conditioned on cond (N, d_cond).

        Differentiable (SFT trains through the whole chain); sampling callers run it without grad.
        """
        N = noise.shape[0]
        x = noise
        ts = self.timesteps(steps)
        abar = self.schedule(x.device, x.dtype)
        use_cfg = guidance != 1.0
        drop = None
        if use_cfg:
            cond2 = torch.cat([cond, cond])
            drop = torch.arange(2 * N, device=x.device) >= N  # the second half: the null condition
        for i, t in enumerate(ts):
            a_t = abar[t]
            a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), dtype=x.dtype, device=x.device)
            t_batch = torch.full((N,), t, dtype=torch.long, device=x.device)
            if use_cfg:
                v_c, v_u = model(torch.cat([x, x]), torch.cat([t_batch, t_batch]), cond2, drop).chunk(2)
                v = v_u + guidance * (v_c - v_u)
            else:
                v = model(x, t_batch, cond, None)
            x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * v
            eps = (1 - a_t).sqrt() * x + a_t.sqrt() * v
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x


def initial_noise(shape: Sequence[int], generators: Sequence[torch.Generator]) -> Tensor:
    """x_T for a batch: row i drawn on the CPU from generators[i] (batch-composition independent)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])
