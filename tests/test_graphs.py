"""CUDA-graph generation gives the eager path's adapters, and factors cross from the GPU to the
CPU intact (runs where a GPU is; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from generator.models.graphs import bucket

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph generation needs a GPU")


def test_buckets():
    assert [bucket(n, 32) for n in (1, 2, 3, 5, 16, 17, 32, 40)] == [1, 2, 4, 8, 16, 32, 32, 32]
    assert [bucket(n, 24) for n in (16, 17, 24)] == [16, 24, 24]  # never above max_batch


@cuda
@pytest.mark.parametrize("n", [1, 3, 32, 33])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_graphed_adapters_match_eager(n, guidance):
    from generator.api import Generator
    from loragen_vllm.defaults import default_generator_checkpoint

    ckpt = default_generator_checkpoint()
    graphed = Generator.load(ckpt, device="cuda")
    eager = Generator.load(ckpt, device="cuda", cuda_graphs=False)
    descriptions = [f"Task {i}: classify the sentiment of a review." for i in range(n)]
    for steps in (5, 20):
        a = graphed.generate(descriptions, seed=0, steps=steps, guidance=guidance)
        b = eager.generate(descriptions, seed=0, steps=steps, guidance=guidance)
        for x, y in zip(a, b):
            for m in x.target.modules:
                torch.testing.assert_close(x.A[m], y.A[m], atol=1e-4, rtol=1e-3)
                torch.testing.assert_close(x.B[m], y.B[m], atol=1e-4, rtol=1e-3)


@cuda
@pytest.mark.parametrize("n", [1, 32])
def test_unstack_from_the_gpu_gives_the_cpu_paths_bytes(n):
    """`unstack_adapters` copies CUDA factors through one page-locked buffer; the adapters and
    their safetensors bytes are those of the same factors unstacked on the CPU."""
    from generator.adapter import unstack_adapters
    from generator.api import Generator
    from loragen_vllm.defaults import default_generator_checkpoint

    target = Generator.load(default_generator_checkpoint(), device="cpu").target
    g = torch.Generator().manual_seed(n)
    A = {m: torch.randn(n, target.num_layers, target.rank, target.shapes[m][0], generator=g) for m in target.modules}
    B = {m: torch.randn(n, target.num_layers, target.shapes[m][1], target.rank, generator=g) for m in target.modules}
    on_gpu = unstack_adapters(target, {m: x.cuda() for m, x in A.items()}, {m: x.cuda() for m, x in B.items()})
    on_cpu = unstack_adapters(target, A, B)
    assert on_gpu[0].A[target.modules[0]].is_pinned()
    for x, y in zip(on_gpu, on_cpu, strict=True):
        assert x.safetensors_bytes() == y.safetensors_bytes()


@cuda
@pytest.mark.parametrize("n", [1, 3, 40])
def test_graphed_encoder_matches_eager(n):
    """The encoder's CUDA graphs (rows and tokens padded up to their buckets) give the eager
    embeddings, for short and long descriptions, and they were captured (no fallback)."""
    from generator.encoder import DescriptionEncoder

    graphed = DescriptionEncoder(device="cuda")
    eager = DescriptionEncoder(device="cuda", cuda_graphs=False)
    descriptions = [f"Task {i}: " + "classify the sentiment of a movie review " * (1 + i % 9) for i in range(n)]
    torch.testing.assert_close(graphed.encode(descriptions), eager.encode(descriptions), atol=1e-5, rtol=1e-4)
    assert graphed.cuda_graphs and graphed._graphs
