"""The description encoder: all-MiniLM-L6-v2 from the PyPI package, mean pooled, unit norm."""

from __future__ import annotations

import pytest
import torch

from generator.encoder import DescriptionEncoder, mean_pool


@pytest.fixture(scope="module")
def encoder() -> DescriptionEncoder:
    return DescriptionEncoder()


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_embeddings_are_unit_vectors_and_semantic(encoder):
    e = encoder.encode([
        "Translate English sentences into French.",
        "Convert English text to French.",
        "Solve grade-school math word problems.",
    ])
    assert e.shape == (3, 384) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_cache_and_batch_independence(encoder):
    alone = encoder.encode(["Summarize legal contracts."])
    encoder.clear_cache()
    batched = encoder.encode(["A much longer description that forces padding in the batch.", "Summarize legal contracts."])
    assert torch.allclose(alone[0], batched[1], atol=1e-5)
    assert encoder.is_cached("Summarize legal contracts.")
    assert torch.equal(encoder.encode(["Summarize legal contracts."])[0], batched[1])
    assert encoder.encode([]).shape == (0, 384)


def test_rejects_a_bare_string_and_non_strings(encoder):
    with pytest.raises(TypeError):
        encoder.encode("one string")
    with pytest.raises(TypeError):
        encoder.encode([b"bytes"])  # type: ignore[list-item]


def test_bulk_progress_bar_stays_out_of_log_files():
    """Embedding a training set (>= PROGRESS_FROM descriptions) shows a bar on a terminal only:
    with stderr to a file or pipe (training logs) nothing of it is written."""
    import subprocess
    import sys

    code = ("from generator.encoder import PROGRESS_FROM, DescriptionEncoder\n"
            "e = DescriptionEncoder(batch_size=512)\n"
            "print(e.encode([f'task {i}' for i in range(PROGRESS_FROM)]).shape)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "torch.Size([2048, 384])" in p.stdout
    assert "embedding descriptions" not in p.stderr
