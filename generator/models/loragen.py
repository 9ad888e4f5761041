"""LoRAGen (Huang et al., ICLR 2026): LAE (stage 1) + latent diffusion with a DiT (stage 2).

Generation: description embedding -> DDIM sampling of the normalised latent tokens (N, P, d_z)
with the DiT -> un-normalise -> LAE decoder -> factors. The latents the diffusion model learns
are the LAE posterior means of the library's adapters, normalised by their per-dimension mean
and one global std (the usual latent-diffusion "scale factor"), stored as buffers.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..config import DiffusionConfig, LAEConfig, TargetSpec
from .diffusion import GaussianDiffusion, initial_noise
from .dit import DiT
from .lae import LoRAAutoencoder


class LoRAGen(nn.Module):
    """The LoRAGen generator: all weights and buffers in one state dict."""

    kind = "loragen"

    def __init__(self, target: TargetSpec, lae_cfg: LAEConfig, diff_cfg: DiffusionConfig) -> None:
        super().__init__()
        self.target, self.lae_cfg, self.diff_cfg = target, lae_cfg, diff_cfg
        self.lae = LoRAAutoencoder(target, lae_cfg)
        self.dit = DiT(lae_cfg.d_z, len(target.modules), target.num_layers, diff_cfg)
        self.diffusion = GaussianDiffusion(diff_cfg.num_timesteps, diff_cfg.beta_start, diff_cfg.beta_end)
        self.register_buffer("z_mean", torch.zeros(lae_cfg.d_z))
        self.register_buffer("z_std", torch.ones(()))
        self._graphed = None  # GraphedGeneration while CUDA graphs are on (see use_cuda_graphs)

    @classmethod
    def from_configs(cls, target: TargetSpec, configs: dict[str, Any]) -> "LoRAGen":
        return cls(target, LAEConfig.from_dict(configs.get("lae", {})),
                   DiffusionConfig.from_dict(configs.get("diffusion", {})))

    def sampler_defaults(self) -> dict[str, Any]:
        return {"steps": self.diff_cfg.sample_steps, "guidance": self.diff_cfg.guidance}

    def use_cuda_graphs(self, enabled: bool = True, max_batch: int = 32) -> None:
        """Generate through CUDA graphs (`generator.models.graphs`) on the model's CUDA device.

        Graphs already captured are kept when called again with the same settings and the model
        where it was (e.g. by `Generator.with_sampler`, which shares the model); after a move of
        the model, generation is eager until this is called again.
        """
        from .graphs import GraphedGeneration

        if not enabled:
            self._graphed = None
            return
        current = self._graphed
        keep = (current is not None and current.max_batch == max_batch
                and current.device == next(self.parameters()).device and current.is_current())
        if not keep:
            self._graphed = GraphedGeneration(self, max_batch)

    def warm_up(self, steps: int, guidance: float, batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> None:
        """Capture the CUDA graphs of these batch sizes now (no-op without graphs)."""
        if self._graphed is not None:
            self._graphed.warm_up([b for b in batch_sizes if b <= self._graphed.max_batch], steps, guidance)

    @property
    def num_tokens(self) -> int:
        return self.target.num_locations

    @torch.no_grad()
    def fit_latent_scale(self, z: Tensor) -> None:
        """z: (T, P, d_z) posterior means of the library."""
        self.z_mean.copy_(z.mean(dim=(0, 1)))
        self.z_std.copy_((z - self.z_mean).std().clamp_min(1e-6))

    def diffusion_loss(
        self, z: Tensor, cond: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """v-prediction MSE on normalised latents z (N, P, d_z) given description embeddings (N, d_cond)."""
        x0 = (z - self.z_mean) / self.z_std
        loss = self.diffusion.training_loss(self.dit, x0, cond, self.diff_cfg.cond_dropout, generator)
        return loss, {"v_mse": loss.item()}

    @torch.no_grad()
    def sample_latents(
        self, cond: Tensor, generators: Sequence[torch.Generator], steps: int, guidance: float = 1.0
    ) -> Tensor:
        """cond: (N, d_cond) -> latents (N, P, d_z); noise of row i from generators[i]."""
        noise = initial_noise((self.num_tokens, self.lae_cfg.d_z), generators).to(cond)
        x0 = self.diffusion.ddim_sample(self.dit, cond, noise, steps=steps, guidance=guidance)
        return x0 * self.z_std + self.z_mean

    def sft_factors(
        self, cond: Tensor, generator: torch.Generator, steps: int, guidance: float
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Factors made as generation makes them (DDIM from fresh noise, then the LAE decoder), with
        gradients through every sampler step: SFT through the base model trains the generator as it
        is served. cond (N, d_cond) -> A[m] (N, L, r, d_in), B[m] (N, L, d_out, r)."""
        noise = torch.randn((cond.shape[0], self.num_tokens, self.lae_cfg.d_z), generator=generator).to(cond)
        return self.factors_from_noise(cond, noise, steps, guidance)

    def factors_from_noise(
        self, cond: Tensor, noise: Tensor, steps: int, guidance: float
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """DDIM from x_T = noise (N, P, d_z), then the LAE decoder; differentiable (grad mode is the caller's)."""
        x0 = self.diffusion.ddim_sample(self.dit, cond, noise, steps=steps, guidance=guidance)
        A, B, _ = self.lae.decode(x0 * self.z_std + self.z_mean)
        return A, B

    def sft_parameters(self) -> list[nn.Parameter]:
        """What SFT trains: the denoiser and the LAE decoder (its encoder plays no part in generation)."""
        return [p for name, p in self.named_parameters() if not name.startswith("lae.encoders.")]

    @torch.no_grad()
    def decode(self, z: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Latents (N, P, d_z) -> A[m] (N, L, r, d_in), B[m] (N, L, d_out, r)."""
        A, B, _ = self.lae.decode(z)
        return A, B

    @torch.no_grad()
    def generate_factors(
        self, cond: Tensor, generators: Sequence[torch.Generator], steps: int, guidance: float,
        mark: Callable[[str], None] = lambda stage: None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """cond (N, d_cond) -> factors: DDIM-sample latents ("diffuse"), then decode them ("decode")."""
        graphed = self._graphed
        if graphed is not None and cond.device == graphed.device and graphed.is_current():  # one graph launch
            noise = initial_noise((self.num_tokens, self.lae_cfg.d_z), generators).to(cond)
            A, B = graphed(cond, noise, steps, guidance)
            mark("diffuse")
            mark("decode")
            return A, B
        z = self.sample_latents(cond, generators, steps=steps, guidance=guidance)
        mark("diffuse")
        A, B = self.decode(z)
        mark("decode")
        return A, B
