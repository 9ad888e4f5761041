"""LoRAGen generation as CUDA graphs: sampling and decoding replayed with one launch per batch.

A generator pass is ~20 DiT steps of small kernels plus the LAE decoder: on a GPU it is bound by
kernel launches, not arithmetic. `GraphedGeneration` captures the whole of
`LoRAGen.generate_factors` (DDIM sampling + decoding) for a fixed batch size, sampler setting and
device once, then replays it: inputs are copied into the graph's static buffers and the outputs
copied out. Batches are padded up to the next bucket size (1, 2, 4, ..., `max_batch`); larger ones
run in chunks. Rows are independent in the model (attention is within an adapter's tokens), so
padding changes no real row beyond float rounding of differently shaped matmuls.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence, TypeVar

import torch
from torch import Tensor

from .loragen import LoRAGen

Factors = tuple[dict[str, Tensor], dict[str, Tensor]]
T = TypeVar("T")


def bucket(n: int, max_batch: int) -> int:
    """The smallest power of two >= n, capped at max_batch (which need not be a power of two)."""
    b = 1
    while b < n and b < max_batch:
        b *= 2
    return min(b, max_batch)


def capture(run: Callable[[], T], device: torch.device) -> tuple[torch.cuda.CUDAGraph, T]:
    """Capture `run` (reading and writing only static tensors) as a CUDA graph: two warm-up runs
    on a side stream first (allocations, cuBLAS handles and autotuning stay outside the capture).
    Returns the graph and the outputs of the captured run, which each replay overwrites."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):
            run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        out = run()
    return graph, out


class _Graph:
    """One captured pass: static inputs (cond, noise) -> static outputs (A, B)."""

    def __init__(self, model: LoRAGen, batch: int, d_cond: int, steps: int, guidance: float,
                 device: torch.device) -> None:
        self.cond = torch.zeros(batch, d_cond, device=device)
        self.noise = torch.zeros(batch, model.num_tokens, model.lae_cfg.d_z, device=device)

        def run() -> Factors:
            x0 = model.diffusion.ddim_sample(model.dit, self.cond, self.noise, steps=steps, guidance=guidance)
            A, B, _ = model.lae.decode(x0 * model.z_std + model.z_mean)
            return A, B

        self.graph, (self.A, self.B) = capture(run, device)

    def __call__(self, cond: Tensor, noise: Tensor) -> Factors:
        n = cond.shape[0]
        self.cond[:n].copy_(cond)
        self.noise[:n].copy_(noise)
        if n < self.cond.shape[0]:
            self.cond[n:].zero_()
            self.noise[n:].zero_()
        self.graph.replay()
        return {m: a[:n].clone() for m, a in self.A.items()}, {m: b[:n].clone() for m, b in self.B.items()}


class GraphedGeneration:
    """`LoRAGen.generate_factors` through CUDA graphs, one per (batch bucket, steps, guidance).

    Thread-safe: one lock around capture and replay (a graph's buffers are shared state), and
    the outputs are copied out before the lock is released. A capture runs in PyTorch's default
    (global) capture mode: CUDA work that other threads of the process start meanwhile can fail,
    so where several threads use the GPU, capture the graphs first (`warm_up`). The graphs read
    the model's parameters at their addresses at capture time; once the model has moved
    (`model.to`), `is_current()` is false and the instance must not be used.
    """

    def __init__(self, model: LoRAGen, max_batch: int = 32) -> None:
        if not isinstance(model, LoRAGen):
            raise TypeError("CUDA-graph generation is for LoRAGen models")
        self.model, self.max_batch = model, max_batch
        self.device = next(model.parameters()).device
        if self.device.type != "cuda":
            raise ValueError("CUDA-graph generation needs the model on a CUDA device")
        self._graphs: dict[tuple[int, int, float], _Graph] = {}
        self._lock = threading.Lock()
        self._addresses = self._parameter_addresses()

    def _parameter_addresses(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers()))

    def is_current(self) -> bool:
        """Whether the model's parameters and buffers are still where the graphs read them."""
        return self._parameter_addresses() == self._addresses

    def _graph(self, batch: int, steps: int, guidance: float) -> _Graph:
        """The graph for a batch of `batch` <= max_batch rows, captured on first use (lock held)."""
        key = (bucket(batch, self.max_batch), int(steps), float(guidance))
        if key not in self._graphs:
            d_cond = self.model.dit.c_embed.mlp[0].in_features
            self._graphs[key] = _Graph(self.model, key[0], d_cond, key[1], key[2], self.device)
        return self._graphs[key]

    def __call__(self, cond: Tensor, noise: Tensor, steps: int, guidance: float) -> Factors:
        """cond (N, d_cond), noise (N, P, d_z) on the device -> A[m] (N, L, r, d_in), B[m] (N, L, d_out, r)."""
        parts: list[Factors] = []
        with self._lock:
            for i in range(0, cond.shape[0], self.max_batch):
                c, z = cond[i : i + self.max_batch], noise[i : i + self.max_batch]
                parts.append(self._graph(c.shape[0], steps, guidance)(c, z))
        if len(parts) == 1:
            return parts[0]
        return ({m: torch.cat([p[0][m] for p in parts]) for m in parts[0][0]},
                {m: torch.cat([p[1][m] for p in parts]) for m in parts[0][1]})

    def warm_up(self, batch_sizes: Sequence[int], steps: int, guidance: float) -> None:
        """Capture the graphs of these batch sizes now (e.g. before a server's first request)."""
        with self._lock:
            for n in batch_sizes:
                self._graph(n, steps, guidance)
