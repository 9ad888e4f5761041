"""The description probe (generator/training/probe.py), SFT's conditioning noise and the ce-gap benchmark."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from generator.config import TargetSpec
from generator.data.sni import load_splits, load_tasks, random_description, split_descriptions
from generator.training.multilora import MultiLoRA
from generator.training.probe import conditioned_ce, probe_set, run_probe
from generator.training.prompts import output_token_ce
from generator.training.sft import SFTConfig, noisy_cond

from .fixtures_generator import base_model_dir  # noqa: F401  (fixture)

TASKS_DIR = Path(__file__).resolve().parents[1] / "data" / "sni" / "tasks"
NAMES = ["task1146_country_capital", "task1508_wordnet_antonyms"]


class FactorTable(torch.nn.Module):
    """A stand-in generator whose factors are a fixed table: row j of `cond` gets table row
    round(cond[j, 0]) (so a test picks which task's factors each row uses)."""

    def __init__(self, target: TargetSpec, k: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        L, r = target.num_layers, target.rank
        self.A = {m: (torch.rand(k, L, r, target.shapes[m][0], generator=g) * 2 - 1) / target.shapes[m][0] ** 0.5
                  for m in target.modules}
        self.B = {m: torch.randn(k, L, target.shapes[m][1], r, generator=g) * 0.05 for m in target.modules}

    def sft_factors(self, cond, generator, steps, guidance):
        idx = cond[:, 0].round().long()
        return {m: a[idx] for m, a in self.A.items()}, {m: b[idx] for m, b in self.B.items()}


@pytest.fixture(scope="module")
def probed(base_model_dir):  # noqa: F811
    """(base, tokenizer, MultiLoRA over it, a probe of two real tasks, target)."""
    from generator.api import shared_encoder
    from generator.base_model import load_base_model

    base, tok, _ = load_base_model("cpu")
    target = TargetSpec.smollm2()
    probe = probe_set(load_tasks(TASKS_DIR, NAMES), tok, shared_encoder("cpu"), examples_per_task=3)
    multi = MultiLoRA(base, target, num_adapters=1)
    yield base, tok, multi, probe, target
    multi.unload()


def test_a_probe_holds_evaluation_descriptions_test_examples_and_random_controls(probed):
    _, tok, _, probe, _ = probed
    tasks = load_tasks(TASKS_DIR, NAMES)
    assert probe.names == NAMES
    assert probe.descriptions == [split_descriptions(t)[1][0] for t in tasks]  # never seen in training
    assert probe.controls == [random_description(t.name, 0, 0, len(d)) for t, d in zip(tasks, probe.descriptions)]
    assert all(len(c) == len(d) and c != d for c, d in zip(probe.controls, probe.descriptions))
    assert probe.cond.shape == probe.control_cond.shape == (2, 384)
    assert [len(s) for s in probe.seqs] == [3, 3]
    ids, p_len = probe.seqs[0][0]
    assert probe.descriptions[0] in tok.decode(ids[:p_len])  # the description as the system prompt
    assert ids[-1] == tok.eos_token_id and p_len < len(ids)


def test_conditioned_ce_is_each_tasks_mean_over_its_output_tokens(probed):
    """Against a plain reference, one task at a time: each row's factors follow its cond row (here
    task 0 is scored under factor row 1 and task 1 under row 0), micro-batches (one row each here)
    mixing the tasks change nothing, and the mean is over a task's tokens, not its examples."""
    base, tok, multi, probe, target = probed
    model = FactorTable(target, 2)
    cond = torch.tensor([[1.0], [0.0]])
    got = conditioned_ce(model, {"steps": 1, "guidance": 1.0}, cond, probe, base, multi, tok.pad_token_id,
                         tokens_per_microbatch=1)
    want = []
    for j, src in enumerate([1, 0]):
        with multi.use_factors({m: a[[src] * 3] for m, a in model.A.items()}, {m: b[[src] * 3] for m, b in model.B.items()}):
            ce, _ = output_token_ce(base, probe.seqs[j], tok.pad_token_id)
        want.append(ce.mean())
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-4, atol=1e-5)
    same = conditioned_ce(model, {"steps": 1, "guidance": 1.0}, torch.tensor([[0.0], [1.0]]), probe, base, multi,
                          tok.pad_token_id)
    assert not torch.allclose(same, got, atol=1e-3)  # the factors matter: another assignment, other CEs


def test_run_probe_reports_the_gap_and_restores_training_mode(probed):
    base, tok, multi, probe, target = probed
    model = FactorTable(target, 2)
    probe = dataclasses.replace(probe, cond=torch.tensor([[0.0], [1.0]]), control_cond=torch.tensor([[1.0], [0.0]]))
    model.train()
    logs = run_probe(model, {"steps": 1, "guidance": 1.0}, probe, base, multi, tok.pad_token_id)
    assert model.training
    assert logs["probe_gap"] == pytest.approx(logs["probe_ce_random"] - logs["probe_ce_right"], abs=1e-5)
    assert logs["probe_gap"] != 0


def test_noisy_cond_keeps_unit_norm_at_the_documented_cosine():
    g = torch.Generator().manual_seed(0)
    c = torch.nn.functional.normalize(torch.randn(2000, 384, generator=g), dim=-1)
    assert noisy_cond(c, 0.0, g) is c
    for s in (0.5, 1.0):
        n = noisy_cond(c, s, torch.Generator().manual_seed(1))
        torch.testing.assert_close(n.norm(dim=-1), torch.ones(2000))
        assert float((n * c).sum(-1).mean()) == pytest.approx(1 / math.sqrt(1 + s * s), abs=0.01)
        assert torch.equal(n, noisy_cond(c, s, torch.Generator().manual_seed(1)))  # reproducible from the seed


def test_negative_cond_noise_is_refused():
    with pytest.raises(ValueError, match="cond_noise must be >= 0"):
        SFTConfig(cond_noise=-0.1)


def test_ce_gap_on_the_shipped_checkpoint(base_model_dir, tmp_path):  # noqa: F811
    """One training and one validation task, one example each: the result's numbers agree with
    each other, the files are written, and the training task's description matters (its adapter
    beats a random string's by well over a nat: the shipped checkpoint learned its training tasks)."""
    from benchmarks.quality.ce_gap import ce_gap, pick_tasks, write

    tasks = load_tasks(TASKS_DIR)
    splits = load_splits(TASKS_DIR)
    result = ce_gap(Path(__file__).resolve().parents[1] / "generator" / "checkpoints" / "default", tasks, splits,
                    num_tasks=1, examples=1, seeds=2)
    assert set(result["sets"]) == {"train", "validation"}
    (v_name,) = result["sets"]["validation"]["tasks"]
    assert v_name in splits.validation and v_name == pick_tasks(tasks, splits.validation, 1)[0].name
    for s in result["sets"].values():
        (t,) = s["tasks"].values()
        assert s["gap"] == pytest.approx(t["random"] - t["right"], abs=1e-3)
        assert 0 < s["embeddings"]["cosine_same_task"] <= 1
        sd = s["seeds"]  # seeds=2: seed 1 besides seed 0, their mean adapter, x_T = 0
        assert len(sd["ce_seeds"]) == 1 and all(math.isfinite(sd[k]) for k in ("ce_seed_mean_adapter", "ce_zero_noise"))
        assert -1 <= sd["cos_between_seeds"] < 0.999  # two seeds make two different adapters
        assert 0.5 < sd["seed_mean_energy_kept"] <= 1.0
    assert result["sets"]["train"]["gap"] > 1.0
    j, m = write(result, tmp_path / "gap")
    assert json.loads(j.read_text())["fingerprint"] == result["fingerprint"]
    assert "| validation | test instances | 1 |" in m.read_text() and "x_T = 0" in m.read_text()
    with pytest.raises(ValueError, match="not in the task folder"):
        pick_tasks(tasks, ["task_nobody_made"], 1)
    with pytest.raises(ValueError, match="at least 2"):
        ce_gap("unused", tasks, splits, seeds=1)


def test_mean_adapter_is_the_rank_r_svd_of_the_mean_delta():
    from benchmarks.quality.ce_gap import mean_adapter

    target = TargetSpec.smollm2()
    table = FactorTable(target, 2)  # the table's shapes; other factors per "seed"

    def draw(x: torch.Tensor, seed: int) -> torch.Tensor:
        return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))

    samples = [({m: draw(a, 2 * s) for m, a in table.A.items()}, {m: draw(b, 2 * s + 1) for m, b in table.B.items()})
               for s in range(3)]
    (A, B), kept = mean_adapter(samples)
    m = target.modules[0]
    mean = torch.stack([b[m] @ a[m] for a, b in samples]).mean(0)
    U, S, Vh = torch.linalg.svd(mean, full_matrices=False)
    r = target.rank
    best = (U[..., :r] * S[..., None, :r]) @ Vh[..., :r, :]  # the best rank-r approximation (Eckart-Young)
    assert A[m].shape == samples[0][0][m].shape and B[m].shape == samples[0][1][m].shape
    assert torch.allclose(B[m] @ A[m], best, atol=1e-5)
    assert 0 < kept < 1  # three rank-r adapters with other factors: their mean has rank up to 3r
    (A1, B1), kept1 = mean_adapter(samples[:1])  # one adapter: its own dW back, all of it
    one = samples[0][1][m] @ samples[0][0][m]
    assert torch.allclose(B1[m] @ A1[m], one, rtol=1e-4, atol=1e-4 * float(one.abs().max())) and kept1 == pytest.approx(1.0)
