"""Text-to-LoRA (T2L, Charakorn et al., ICML 2025), the "M" hypernetwork: the baseline.

One forward pass maps a description embedding to all LoRA factors:

    task code  = LN(W_task e_desc)                         (latent/2)
    token(m,l) = [task code ; LN(E_layer[l]) ; LN(E_module[m])]          (latent)
    h          = ResMLP(Mixer(token))
    A or B     = Head_m(MLP(ResMLP(h + LN(E_AB[m, A|B]))))   one head per module, emitting
                                                             r x max(d_in, d_out), sliced to A or B

"M" means the head emits either A or B per pass, told apart by a learned A/B embedding (T2L's
`shared_AB_head`). Training is reconstruction of a library (T2L's "recon" mode): L1 between the
predicted and the library's factors, both standardised with the library's per-element mean and a
per-(module, layer) standard deviation (T2L standardises its targets the same way).
Deviations from T2L's code: the per-layer std is one scalar per (module, layer, A|B) rather than
per element (libraries here are small), and heads start from a small random init, not from a
peft initialisation.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapter import factor_stats
from ..config import T2LConfig, TargetSpec


class ResMLP(nn.Module):
    """x + MLP(LN(x)), SiLU, dropout (T2L's MLPResidualBlock)."""

    def __init__(self, d: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.SiLU(), nn.Dropout(dropout),
            nn.Linear(4 * d, d), nn.SiLU(), nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class T2LHypernetwork(nn.Module):
    """Description embedding (N, d_cond) -> standardised factors of every location."""

    def __init__(self, target: TargetSpec, cfg: T2LConfig) -> None:
        super().__init__()
        self.target, self.cfg = target, cfg
        d = cfg.latent_size
        self.task_encoder = nn.Sequential(nn.Linear(cfg.d_cond, d // 2), nn.LayerNorm(d // 2))
        self.layer_emb = nn.Sequential(nn.Embedding(target.num_layers, d // 4), nn.LayerNorm(d // 4))
        self.module_emb = nn.Sequential(nn.Embedding(len(target.modules), d - d // 2 - d // 4), nn.LayerNorm(d - d // 2 - d // 4))
        self.mixer = nn.Sequential(
            nn.Dropout(cfg.dropout), nn.Linear(d, 4 * d), nn.SiLU(), nn.Dropout(cfg.dropout),
            nn.Linear(4 * d, d), nn.SiLU(), nn.Dropout(cfg.dropout),
        )
        self.mlp1, self.mlp2 = ResMLP(d, cfg.dropout), ResMLP(d, cfg.dropout)
        self.mlp3 = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.SiLU(), nn.Dropout(cfg.dropout),
            nn.Linear(4 * d, cfg.head_in), nn.SiLU(),
        )
        self.ab_emb = nn.Parameter(torch.randn(len(target.modules), 2, d))  # per module: A, B
        self.ab_norm = nn.LayerNorm(d)
        r = target.rank
        self.heads = nn.ModuleDict(
            {m: nn.Linear(cfg.head_in, r * max(target.shapes[m])) for m in target.modules}
        )
        for head in self.heads.values():
            nn.init.normal_(head.weight, std=0.02 / cfg.head_in**0.5)
            nn.init.zeros_(head.bias)

    def forward(self, cond: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """cond: (N, d_cond) -> standardised A[m] (N, L, r, d_in), B[m] (N, L, d_out, r)."""
        t, r = self.target, self.target.rank
        N, L = cond.shape[0], t.num_layers
        task = self.task_encoder(cond)  # (N, d/2)
        layers = self.layer_emb(torch.arange(L, device=cond.device))  # (L, d/4)
        A: dict[str, Tensor] = {}
        B: dict[str, Tensor] = {}
        for i, m in enumerate(t.modules):
            d_in, d_out = t.shapes[m]
            mod = self.module_emb(torch.tensor([i], device=cond.device))  # (1, d/4)
            tok = torch.cat(
                [task[:, None].expand(N, L, -1), layers[None].expand(N, L, -1), mod[None].expand(N, L, -1)], dim=-1
            )  # (N, L, d)
            h = self.mlp1(self.mixer(tok))
            ab = self.ab_norm(self.ab_emb[i])  # (2, d)
            out_a = self.heads[m](self.mlp3(self.mlp2(h + ab[0])))  # (N, L, r * max_d)
            out_b = self.heads[m](self.mlp3(self.mlp2(h + ab[1])))
            A[m] = out_a.view(N, L, r, -1)[..., :d_in]  # (N, L, r, d_in)
            B[m] = out_b.view(N, L, r, -1)[..., :d_out].transpose(-1, -2)  # (N, L, d_out, r)
        return A, B


class FactorStandardizer(nn.Module):
    """Per-element mean and per-(module, layer) scalar std of a library's A and B (buffers)."""

    def __init__(self, target: TargetSpec) -> None:
        super().__init__()
        self.modules_ = target.modules
        L, r = target.num_layers, target.rank
        for m in target.modules:
            d_in, d_out = target.shapes[m]
            self.register_buffer(f"A_mean_{m}", torch.zeros(L, r, d_in))
            self.register_buffer(f"B_mean_{m}", torch.zeros(L, d_out, r))
            self.register_buffer(f"A_std_{m}", torch.ones(L))
            self.register_buffer(f"B_std_{m}", torch.ones(L))

    @torch.no_grad()
    def fit(self, A: dict[str, Tensor], B: dict[str, Tensor]) -> None:
        """A[m]: (T, L, r, d_in), B[m]: (T, L, d_out, r) over the library's T tasks."""
        for m in self.modules_:
            for name, X in (("A", A[m]), ("B", B[m])):
                mean, std = factor_stats(X)
                getattr(self, f"{name}_mean_{m}").copy_(mean)
                getattr(self, f"{name}_std_{m}").copy_(std)

    def library_stats(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The fitted statistics, keyed "A_<module>" / "B_<module>": (mean, std per layer)."""
        return {f"{name}_{m}": (getattr(self, f"{name}_mean_{m}"), getattr(self, f"{name}_std_{m}"))
                for m in self.modules_ for name in ("A", "B")}

    @torch.no_grad()
    def load_library_stats(self, stats: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Statistics fitted elsewhere to the same kind of library (`library_stats` of this class or
        of the LAE, which standardises with the same `factor_stats`), instead of `fit`."""
        for m in self.modules_:
            for name in ("A", "B"):
                mean, std = stats[f"{name}_{m}"]
                getattr(self, f"{name}_mean_{m}").copy_(mean)
                getattr(self, f"{name}_std_{m}").copy_(std)

    def _stats(self, name: str, m: str) -> tuple[Tensor, Tensor]:
        return getattr(self, f"{name}_mean_{m}"), getattr(self, f"{name}_std_{m}")[:, None, None]

    def normalize(self, A: dict[str, Tensor], B: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        out_a, out_b = {}, {}
        for m in self.modules_:
            mu, sd = self._stats("A", m)
            out_a[m] = (A[m] - mu) / sd
            mu, sd = self._stats("B", m)
            out_b[m] = (B[m] - mu) / sd
        return out_a, out_b

    def denormalize(self, A: dict[str, Tensor], B: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        out_a, out_b = {}, {}
        for m in self.modules_:
            mu, sd = self._stats("A", m)
            out_a[m] = A[m] * sd + mu
            mu, sd = self._stats("B", m)
            out_b[m] = B[m] * sd + mu
        return out_a, out_b


class T2L(nn.Module):
    """The T2L generator: hypernetwork + the library's standardisation (all in one state dict)."""

    kind = "t2l"

    def __init__(self, target: TargetSpec, cfg: T2LConfig) -> None:
        super().__init__()
        self.target, self.cfg = target, cfg
        self.hypernet = T2LHypernetwork(target, cfg)
        self.standardizer = FactorStandardizer(target)

    @classmethod
    def from_configs(cls, target: TargetSpec, configs: dict[str, Any]) -> "T2L":
        return cls(target, T2LConfig.from_dict(configs.get("t2l", {})))

    def sampler_defaults(self) -> dict[str, Any]:
        return {"steps": 1, "guidance": 1.0}  # one forward pass; nothing is sampled

    def loss(self, cond: Tensor, A: dict[str, Tensor], B: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """T2L reconstruction loss: mean L1 over standardised A and B of all modules."""
        pred_a, pred_b = self.hypernet(cond)
        tgt_a, tgt_b = self.standardizer.normalize(A, B)
        terms = [F.l1_loss(pred_a[m], tgt_a[m]) for m in self.target.modules]
        terms += [F.l1_loss(pred_b[m], tgt_b[m]) for m in self.target.modules]
        loss = torch.stack(terms).mean()
        return loss, {"l1": loss.item()}

    def sft_factors(
        self, cond: Tensor, generator: torch.Generator, steps: int, guidance: float
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """cond: (N, d_cond) -> A[m] (N, L, r, d_in), B[m] (N, L, d_out, r) in adapter scale, with
        gradients (SFT through the base model); no noise, steps or guidance."""
        return self.standardizer.denormalize(*self.hypernet(cond))

    def sft_parameters(self) -> list[nn.Parameter]:
        """What SFT trains: the hypernetwork (the standardiser is the library's statistics)."""
        return list(self.hypernet.parameters())

    @torch.no_grad()
    def generate(self, cond: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """cond: (N, d_cond) -> A[m] (N, L, r, d_in), B[m] (N, L, d_out, r) in adapter scale."""
        return self.standardizer.denormalize(*self.hypernet(cond))

    @torch.no_grad()
    def generate_factors(
        self, cond: Tensor, generators: Sequence[torch.Generator], steps: int, guidance: float,
        mark: Callable[[str], None] = lambda stage: None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """cond (N, d_cond) -> factors in one hypernetwork pass (no noise, steps or guidance)."""
        mark("diffuse")
        A, B = self.generate(cond)
        mark("decode")
        return A, B
