"""LoRAGen stage 1: the LoRA autoencoder (LAE) with a module-aware mixture-of-experts decoder.

Each location (module m, layer l) of an adapter is one token. The encoder maps its factors to a
diagonal Gaussian q(z | A, B) with z in R^{d_z}; the decoder maps the structural embedding
s = [z; e_m; e_l] back to factors with, per module, one MoE head for A and one for B ("a
separate expert pool per output head"). A head routes each token with top-K softmax gating at
temperature tau and runs the chosen experts (MLPs, SiLU) (LoRAGen Sec. 3.2, App. A.6).

Loss (LoRAGen Eq. 2-8): w_dir * direction + w_spec * spectral (both on dW = B A, from factors)
+ beta * KL + lambda_moe * load balancing.

Choices where the paper is silent or the budget differs (documented deviations):
* Standardisation: factors enter and leave the LAE as residuals from the library's per-location
  mean factors, divided by one scale per (module, layer, A|B). Real libraries trained from one
  initialisation share most of A; the decoder then spends its capacity on what differs.
* Encoder: A's rows and B's columns are first projected to `d_struct`-dim features by a per-module
  linear map, then an MLP gives (mu, logvar); a flat (r * d) input layer would be ~4M parameters.
* Expert hidden width: 64 by default, not the paper's 256. With direct A/B outputs at SmolLM2
  shapes (r * d = 4608 per head), 256 would make the decoder ~16M parameters (> the 30 MB budget).
* Spectral loss on dW divided by the target's Frobenius norm, so that its scale is comparable
  across locations (see `losses.spectral_loss` for the loss itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapter import factor_stats
from ..config import LAEConfig, TargetSpec
from .losses import delta_norm, direction_loss, kl_divergence, moe_balance_loss, spectral_loss


# ----------------------------------------------------------------------------------------------
# Mixture of experts


class MoEHead(nn.Module):
    """Top-K softmax-gated mixture of MLP experts: (N, d_in) -> (N, d_out)."""

    def __init__(self, d_in: int, d_out: int, num_experts: int, top_k: int, hidden: int, tau: float) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"need 1 <= top_k <= num_experts, got {top_k}, {num_experts}")
        self.top_k, self.tau = top_k, tau
        self.router = nn.Linear(d_in, num_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, d_out)) for _ in range(num_experts)
        )

    def route(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h: (N, d_in) -> gates (N, K) summing to 1, expert indices (N, K), router probs (N, E)."""
        logits = self.router(h) / self.tau
        top_val, top_idx = logits.topk(self.top_k, dim=-1)
        return F.softmax(top_val, dim=-1), top_idx, F.softmax(logits, dim=-1)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Returns outputs (N, d_out) and the load-balancing loss of this head (scalar)."""
        gates, idx, probs = self.route(h)
        if h.is_cuda:  # dense: every expert on every token, weighted by its gate (0 if not chosen);
            # a few wasted FLOPs instead of a host sync per expert for the sparse dispatch below
            weight = h.new_zeros(probs.shape).scatter_add(1, idx, gates)  # (N, E)
            out = sum(weight[:, e : e + 1] * expert(h) for e, expert in enumerate(self.experts))
            return out, moe_balance_loss(probs, idx)
        if self.top_k == 1:  # each token has one expert and gate softmax([x]) = 1: copy, nothing to add
            out = h.new_empty(h.shape[0], self.experts[0][-1].out_features)
            for e, expert in enumerate(self.experts):
                rows = (idx[:, 0] == e).nonzero(as_tuple=True)[0]
                if rows.numel():
                    out.index_copy_(0, rows, expert(h[rows]))
            return out, moe_balance_loss(probs, idx)
        out = h.new_zeros(h.shape[0], self.experts[0][-1].out_features)
        for j in range(self.top_k):
            for e, expert in enumerate(self.experts):
                rows = (idx[:, j] == e).nonzero(as_tuple=True)[0]
                if rows.numel():
                    out.index_add_(0, rows, gates[rows, j : j + 1] * expert(h[rows]))
        return out, moe_balance_loss(probs, idx)


# ----------------------------------------------------------------------------------------------
# Encoder and decoder


class LocationEncoder(nn.Module):
    """Factors of one module at n locations -> (mu, logvar), each (n, d_z)."""

    def __init__(self, d_in: int, d_out: int, rank: int, cfg: LAEConfig) -> None:
        super().__init__()
        self.proj_a = nn.Linear(d_in, cfg.d_struct, bias=False)  # rows of A
        self.proj_b = nn.Linear(d_out, cfg.d_struct, bias=False)  # columns of B
        self.mlp = nn.Sequential(
            nn.Linear(2 * rank * cfg.d_struct + cfg.d_struct, cfg.enc_hidden), nn.SiLU(),
            nn.Linear(cfg.enc_hidden, cfg.enc_hidden), nn.SiLU(),
            nn.Linear(cfg.enc_hidden, 2 * cfg.d_z),
        )

    def forward(self, A: Tensor, B: Tensor, e_l: Tensor) -> tuple[Tensor, Tensor]:
        """A: (n, r, d_in), B: (n, d_out, r) standardised; e_l: (n, d_struct)."""
        fa = self.proj_a(A).flatten(1)  # (n, r * d_struct)
        fb = self.proj_b(B.transpose(-1, -2)).flatten(1)  # (n, r * d_struct)
        mu, logvar = self.mlp(torch.cat([fa, fb, e_l], -1)).chunk(2, dim=-1)
        return mu, logvar.clamp(-12.0, 6.0)


class LoRAAutoencoder(nn.Module):
    """Encoder q(z | A, B) per location and the module-aware MoE decoder, with standardisation buffers.

    The LAE is per location, so training batches are sets of locations ("tokens") drawn from
    many adapters (`*_tokens` methods); `encode` / `decode` handle whole adapters.
    """

    def __init__(self, target: TargetSpec, cfg: LAEConfig) -> None:
        super().__init__()
        self.target, self.cfg = target, cfg
        L, r = target.num_layers, target.rank
        self.module_emb = nn.Parameter(torch.randn(len(target.modules), cfg.d_struct) * 0.5)  # e_m
        self.layer_emb = nn.Parameter(torch.randn(L, cfg.d_struct) * 0.5)  # e_l
        self.encoders = nn.ModuleDict(
            {m: LocationEncoder(*target.shapes[m], r, cfg) for m in target.modules}
        )
        d_s = cfg.d_z + 2 * cfg.d_struct
        moe = dict(num_experts=cfg.num_experts, top_k=cfg.top_k, hidden=cfg.expert_hidden, tau=cfg.tau)
        self.heads_a = nn.ModuleDict({m: MoEHead(d_s, r * target.shapes[m][0], **moe) for m in target.modules})
        self.heads_b = nn.ModuleDict({m: MoEHead(d_s, target.shapes[m][1] * r, **moe) for m in target.modules})
        for m in target.modules:
            d_in, d_out = target.shapes[m]
            self.register_buffer(f"A_mean_{m}", torch.zeros(L, r, d_in))
            self.register_buffer(f"B_mean_{m}", torch.zeros(L, d_out, r))
            self.register_buffer(f"A_scale_{m}", torch.ones(L))
            self.register_buffer(f"B_scale_{m}", torch.ones(L))

    # -- standardisation ----------------------------------------------------------------------

    @torch.no_grad()
    def fit_scales(self, A: dict[str, Tensor], B: dict[str, Tensor]) -> None:
        """Library statistics; A[m]: (T, L, r, d_in), B[m]: (T, L, d_out, r)."""
        for m in self.target.modules:
            for name, X in (("A", A[m]), ("B", B[m])):
                mean, scale = factor_stats(X)
                getattr(self, f"{name}_mean_{m}").copy_(mean)
                getattr(self, f"{name}_scale_{m}").copy_(scale)

    def library_stats(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The library's statistics, keyed "A_<module>" / "B_<module>": (mean, scale per layer)."""
        return {f"{name}_{m}": (getattr(self, f"{name}_mean_{m}"), getattr(self, f"{name}_scale_{m}"))
                for m in self.target.modules for name in ("A", "B")}

    def _stats(self, name: str, m: str, layers: Tensor | None) -> tuple[Tensor, Tensor]:
        """Mean (n, ., .) and scale (n, 1, 1) of `name` in {"A", "B"} at the given layers; with
        layers None, every layer in order: (L, ., .) and (L, 1, 1), views of the buffers."""
        mean, scale = getattr(self, f"{name}_mean_{m}"), getattr(self, f"{name}_scale_{m}")
        if layers is None:
            return mean, scale[:, None, None]
        return mean[layers], scale[layers][:, None, None]

    # -- token level --------------------------------------------------------------------------

    def encode_tokens(self, m: str, A: Tensor, B: Tensor, layers: Tensor) -> tuple[Tensor, Tensor]:
        """Adapter-scale A (n, r, d_in), B (n, d_out, r) of module m at `layers` (n,) -> mu, logvar (n, d_z)."""
        mu_a, s_a = self._stats("A", m, layers)
        mu_b, s_b = self._stats("B", m, layers)
        return self.encoders[m]((A - mu_a) / s_a, (B - mu_b) / s_b, self.layer_emb[layers])

    def decode_tokens(self, m: str, z: Tensor, layers: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """z (n, d_z) of module m at `layers` (n,) -> adapter-scale A (n, r, d_in), B (n, d_out, r), aux loss.

        layers None: z holds whole adapters, n = N * L tokens in layer order (what `decode` passes);
        the layer statistics then broadcast over the N adapters instead of being gathered per token.
        """
        i = self.target.modules.index(m)
        d_in, d_out = self.target.shapes[m]
        n, r, L = z.shape[0], self.target.rank, self.target.num_layers
        e_l = self.layer_emb[layers] if layers is not None else self.layer_emb.repeat(n // L, 1)
        s = torch.cat([z, self.module_emb[i].expand(n, -1), e_l], -1)  # [z; e_m; e_l]
        ya, aux_a = self.heads_a[m](s)
        yb, aux_b = self.heads_b[m](s)
        mu_a, s_a = self._stats("A", m, layers)
        mu_b, s_b = self._stats("B", m, layers)
        lead = (n,) if layers is not None else (n // L, L)
        A = ya.view(*lead, r, d_in).mul_(s_a).add_(mu_a).view(n, r, d_in)  # in place: ya is the heads' own
        B = yb.view(*lead, d_out, r).mul_(s_b).add_(mu_b).view(n, d_out, r)
        return A, B, (aux_a + aux_b) / 2

    # -- whole adapters -----------------------------------------------------------------------

    def encode(self, A: dict[str, Tensor], B: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """A[m] (N, L, r, d_in), B[m] (N, L, d_out, r) -> mu, logvar: (N, P, d_z), module-major tokens."""
        L = self.target.num_layers
        mus, logvars = [], []
        for m in self.target.modules:
            N = A[m].shape[0]
            layers = torch.arange(L, device=A[m].device).repeat(N)
            mu, lv = self.encode_tokens(m, A[m].flatten(0, 1), B[m].flatten(0, 1), layers)
            mus.append(mu.view(N, L, -1))
            logvars.append(lv.view(N, L, -1))
        return torch.cat(mus, 1), torch.cat(logvars, 1)

    @torch.no_grad()
    def encode_mean(self, A: dict[str, Tensor], B: dict[str, Tensor], batch: int = 64) -> Tensor:
        """Posterior means of many adapters, (N, P, d_z)."""
        n = next(iter(A.values())).shape[0]
        chunks = [self.encode({m: A[m][i : i + batch] for m in A}, {m: B[m][i : i + batch] for m in B})[0]
                  for i in range(0, n, batch)]
        return torch.cat(chunks)

    def decode(self, z: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """z: (N, P, d_z) -> adapter-scale A[m] (N, L, r, d_in), B[m] (N, L, d_out, r), MoE aux loss."""
        t = self.target
        N, L = z.shape[0], t.num_layers
        A: dict[str, Tensor] = {}
        B: dict[str, Tensor] = {}
        aux = z.new_zeros(())
        for i, m in enumerate(t.modules):
            zm = z[:, i * L : (i + 1) * L].reshape(N * L, -1)  # (N * L, d_z)
            a, b, x = self.decode_tokens(m, zm, None)
            A[m], B[m] = a.view(N, L, *a.shape[1:]), b.view(N, L, *b.shape[1:])
            aux = aux + x
        return A, B, aux / len(t.modules)

    # -- training objective -------------------------------------------------------------------

    def loss(
        self, tokens: dict[str, tuple[Tensor, Tensor, Tensor]], generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """LAE objective on a batch of locations: tokens[m] = (A (n, r, d_in), B (n, d_out, r), layers (n,))."""
        cfg = self.cfg
        d_terms, s_terms, kl_terms, aux_terms = [], [], [], []
        for m, (A, B, layers) in tokens.items():
            mu, logvar = self.encode_tokens(m, A, B, layers)
            eps = torch.randn(mu.shape, generator=generator).to(mu)
            A_hat, B_hat, aux = self.decode_tokens(m, mu + (0.5 * logvar).exp() * eps, layers)
            # Compare in standardised units (per-location scales) so that all locations weigh alike.
            _, s_a = self._stats("A", m, layers)
            _, s_b = self._stats("B", m, layers)
            a_t, b_t, a_p, b_p = A / s_a, B / s_b, A_hat / s_a, B_hat / s_b
            d_terms.append(direction_loss(a_p, b_p, a_t, b_t))
            if cfg.w_spectral:  # (the ablation without it skips its cost too)
                k = delta_norm(a_t, b_t).detach().clamp_min(1e-12)[:, None, None]  # ||dW_true||_F
                s_terms.append(spectral_loss(a_p, b_p / k, a_t, b_t / k, rho=cfg.rho))
            else:
                s_terms.append(A.new_zeros(()))
            kl_terms.append(kl_divergence(mu, logvar))
            aux_terms.append(aux)
        l_dir, l_spec = torch.stack(d_terms).mean(), torch.stack(s_terms).mean()
        l_kl, l_aux = torch.stack(kl_terms).mean(), torch.stack(aux_terms).mean()
        loss = cfg.w_direction * l_dir + cfg.w_spectral * l_spec + cfg.beta_kl * l_kl + cfg.lambda_moe * l_aux
        logs = {"dir": l_dir.item(), "spec": l_spec.item(), "kl": l_kl.item(), "moe": l_aux.item()}
        return loss, logs

    @torch.no_grad()
    def reconstruct(self, A: dict[str, Tensor], B: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Decode of the posterior mean (no sampling)."""
        A_hat, B_hat, _ = self.decode(self.encode_mean(A, B))
        return A_hat, B_hat
