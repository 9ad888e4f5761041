"""Many LoRA adapters in one batched base model: each batch row picks its own adapter.

Every targeted `nn.Linear` (e.g. `q_proj`, `v_proj` of each layer) is wrapped in a
`MultiLoRALinear` holding a stack of N adapters' factors, `A: (N, r, d_in)`, `B: (N, d_out, r)`.
Before a forward pass the caller sets one adapter index per batch row (`MultiLoRA.use(index)`);
each row then computes

    y = W x + scaling * B[index] @ (A[index] @ x)

so N tasks train (or generate) in one batch, one kernel launch per module instead of N. An index
of -1 means "no adapter" (the base model) for that row. Gradients reach only the rows' own
adapters, so training N adapters together equals training each alone (up to float rounding).

Pure torch: works with any Hugging Face causal LM whose target modules are `nn.Linear`, and with
`model.generate` (greedy decoding keeps rows in place, so the index stays valid over the steps).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..adapter import LoRAAdapter
from ..config import TargetSpec

__all__ = ["MultiLoRALinear", "MultiLoRA", "init_lora_"]


class MultiLoRALinear(nn.Module):
    """A frozen linear layer plus N LoRA adapters, chosen per batch row by `self.index`."""

    def __init__(self, base: nn.Linear, num_adapters: int, rank: int, scaling: float, dtype: torch.dtype):
        super().__init__()
        self.base = base
        self.scaling = scaling
        d_in, d_out = base.in_features, base.out_features
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(num_adapters, rank, d_in, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_adapters, d_out, rank, device=dev, dtype=dtype))
        self.index: Tensor | None = None  # (b,) long, set by MultiLoRA.use(); None = base only
        self._cached: tuple[Tensor, Tensor] | None = None  # rows' (A^T, scaled B^T) while not training
        self.factors: tuple[Tensor, Tensor] | None = None  # per-row (A (b, r, d_in), B (b, d_out, r)), e.g. from a hypernetwork

    def rows_factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(A^T (b, d_in, r), scaling * B^T (b, r, d_out)) of the rows' adapters; zero for index -1."""
        index = self.index
        safe = index.clamp(min=0)
        scale = (self.scaling * (index >= 0).to(dtype)).view(-1, 1, 1)  # (b, 1, 1)
        A_t = self.lora_A[safe].to(dtype).transpose(1, 2)  # (b, d_in, r)
        B_t = self.lora_B[safe].to(dtype).transpose(1, 2) * scale  # (b, r, d_out)
        return A_t, B_t

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.factors is not None:  # factors given per row (differentiable), not slots
            A, B = self.factors
            h = x.unsqueeze(1) if x.dim() == 2 else x  # (b, s, d_in)
            h = torch.bmm(torch.bmm(h, A.to(x.dtype).transpose(1, 2)), B.to(x.dtype).transpose(1, 2))  # (b, s, d_out)
            return y + self.scaling * (h.squeeze(1) if x.dim() == 2 else h)
        if self.index is None:
            return y
        if x.shape[0] != self.index.shape[0]:
            raise RuntimeError(f"batch has {x.shape[0]} rows but {self.index.shape[0]} adapter indices were set")
        if torch.is_grad_enabled():
            A_t, B_t = self.rows_factors(x.dtype)
        else:  # generation: gather once per batch, reuse at every decoding step
            if self._cached is None or self._cached[0].dtype != x.dtype:
                self._cached = self.rows_factors(x.dtype)
            A_t, B_t = self._cached
        squeeze = x.dim() == 2
        h = x.unsqueeze(1) if squeeze else x  # (b, s, d_in)
        h = torch.bmm(torch.bmm(h, A_t), B_t)  # (b, s, r) -> (b, s, d_out)
        return y + (h.squeeze(1) if squeeze else h)


def init_lora_(A: Tensor, B: Tensor, generator: torch.Generator) -> None:
    """peft's default init for one adapter: A ~ kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(d_in)), B = 0.

    A: (L, r, d_in), B: (L, d_out, r); drawn on the CPU from `generator`, so reproducible anywhere.
    """
    bound = 1.0 / math.sqrt(A.shape[-1])
    a = torch.empty(A.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    with torch.no_grad():
        A.copy_(a.to(A.dtype))
        B.zero_()


class MultiLoRA:
    """Wraps the target modules of `model` (in place) with N-adapter `MultiLoRALinear`s.

    `target` says which modules (its `module_paths`), the rank and alpha. The adapters' factors are
    `dtype` (float32 for training: master weights; the forward casts to the activations' dtype).
    """

    def __init__(self, model: nn.Module, target: TargetSpec, num_adapters: int, dtype: torch.dtype = torch.float32):
        if num_adapters < 1:
            raise ValueError("num_adapters must be >= 1")
        self.model = model
        self.target = target
        self.num_adapters = num_adapters
        self.layers: dict[tuple[str, int], MultiLoRALinear] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        for module, layer in target.locations:
            path = target.path(module, layer)
            parent_path, _, leaf = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            base = getattr(parent, leaf)
            if isinstance(base, MultiLoRALinear):
                raise ValueError(f"{path} already carries a MultiLoRA")
            if not isinstance(base, nn.Linear):
                raise TypeError(f"{path} is {type(base).__name__}, not nn.Linear")
            d_in, d_out = target.shapes[module]
            if (base.in_features, base.out_features) != (d_in, d_out):
                raise ValueError(f"{path} is {base.in_features}->{base.out_features}, target says {d_in}->{d_out}")
            wrapped = MultiLoRALinear(base, num_adapters, target.rank, target.scaling, dtype)
            setattr(parent, leaf, wrapped)
            self.layers[(module, layer)] = wrapped

    def unload(self) -> None:
        """Put the plain linear layers back: the model is the base model again."""
        for (module, layer), wrapped in self.layers.items():
            parent_path, _, leaf = self.target.path(module, layer).rpartition(".")
            setattr(self.model.get_submodule(parent_path), leaf, wrapped.base)

    # -- which adapter each row uses ----------------------------------------------------------------

    def set_index(self, index: Tensor | Sequence[int] | None) -> None:
        """Adapter slot per batch row, (b,); -1 = no adapter; None = the base model for all rows."""
        if index is not None:
            dev = next(iter(self.layers.values())).lora_A.device
            index = torch.as_tensor(index, dtype=torch.long, device=dev)
            if index.dim() != 1:
                raise ValueError("index must be 1-D: one adapter slot per batch row")
            if index.numel() and int(index.max()) >= self.num_adapters:
                raise IndexError(f"adapter slot {int(index.max())} >= {self.num_adapters} slots")
        for lin in self.layers.values():
            lin.index = index
            lin._cached = None

    @contextmanager
    def use(self, index: Tensor | Sequence[int] | None) -> Iterator[None]:
        """`with multi.use(index): model(...)` runs each row with its adapter."""
        self.set_index(index)
        try:
            yield
        finally:
            self.set_index(None)

    @contextmanager
    def use_factors(self, A: dict[str, Tensor], B: dict[str, Tensor]) -> Iterator[None]:
        """`with multi.use_factors(A, B): model(...)`: row i uses A[m][i] (L, r, d_in), B[m][i] (L, d_out, r).

        The factors are used as given (gradients flow back into them): how a hypernetwork is
        trained through the base model.
        """
        for (m, layer), lin in self.layers.items():
            lin.factors = (A[m][:, layer], B[m][:, layer])
        try:
            yield
        finally:
            for lin in self.layers.values():
                lin.factors = None

    # -- the adapters' factors ------------------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        """All trainable factors (each stacked over the N slots on dim 0)."""
        return [p for lin in self.layers.values() for p in (lin.lora_A, lin.lora_B)]

    def init_slot(self, slot: int, generator: torch.Generator) -> None:
        """peft-default init of one slot, drawn from `generator` (module-major, layer order)."""
        for m in self.target.modules:
            L = self.target.num_layers
            d_in, d_out = self.target.shapes[m]
            A = torch.empty(L, self.target.rank, d_in)
            B = torch.empty(L, d_out, self.target.rank)
            init_lora_(A, B, generator)
            for layer in range(L):
                lin = self.layers[(m, layer)]
                with torch.no_grad():
                    lin.lora_A[slot].copy_(A[layer])
                    lin.lora_B[slot].copy_(B[layer])

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Put `adapter` into `slot` (its locations and rank must match the target's)."""
        a = adapter.reorder(self.target) if adapter.target.modules != self.target.modules else adapter
        if a.target.rank != self.target.rank or a.target.num_layers != self.target.num_layers:
            raise ValueError("adapter rank or layer count differs from the MultiLoRA target")
        k = a.target.scaling / self.target.scaling  # fold an alpha difference into B
        for m in self.target.modules:
            for layer in range(self.target.num_layers):
                lin = self.layers[(m, layer)]
                with torch.no_grad():
                    lin.lora_A[slot].copy_(a.A[m][layer])
                    lin.lora_B[slot].copy_(a.B[m][layer] * k)

    def adapter(self, slot: int) -> LoRAAdapter:
        """The factors of one slot as a `LoRAAdapter` (float32, on the CPU)."""
        A, B = {}, {}
        for m in self.target.modules:
            L = self.target.num_layers
            A[m] = torch.stack([self.layers[(m, l)].lora_A[slot].detach().float().cpu() for l in range(L)])
            B[m] = torch.stack([self.layers[(m, l)].lora_B[slot].detach().float().cpu() for l in range(L)])
        return LoRAAdapter(self.target, A, B)

    @torch.no_grad()
    def clip_grad_norm_per_slot_(self, max_norm: float) -> Tensor:
        """Clip each slot's gradient to `max_norm` (its norm over all its factors); returns the norms (N,).

        Slots are separate adapters, so each is clipped alone, as if trained alone.
        """
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:
            return torch.zeros(self.num_adapters)
        sq = sum(p.grad.float().pow(2).flatten(1).sum(1) for p in params)  # (N,)
        norms = sq.sqrt()
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(coef.view(-1, *([1] * (p.grad.dim() - 1))).to(p.grad.dtype))
        return norms
