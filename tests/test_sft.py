"""Generators trained by SFT through the real base model: tiny runs on two real SNI tasks, the
checkpoints they write, the time limit that stops a run early and lets it resume, LoRAGen
SFT's gradient reaching the denoiser through every sampler step, and one step's loss and
gradient (`sft_backward`, with and without the contrastive term) against a plain autograd
reference without micro-batches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pytest
import torch

from generator import Generator
from generator.config import T2LConfig, TargetSpec, TrainConfig
from generator.data.library import save_task
from generator.data.sni import add_label_names, load_splits, load_tasks
from generator.data.synthetic import synthetic_adapters
from generator.training.multilora import MultiLoRA
from generator.training.prompts import microbatches, output_token_ce
from generator.training.sft import SFTConfig, draw_descriptions, load_sft_tasks, main, sft_backward, train_sft
from generator.training.train import STATE_FILE

from .fixtures_generator import base_model_dir, synthetic_library, tiny_generator_ckpt  # noqa: F401  (fixtures)

TASKS_DIR = Path(__file__).resolve().parents[1] / "data" / "sni" / "tasks"
NAMES = ["task1146_country_capital", "task1508_wordnet_antonyms"]
TINY = dict(cfg=TrainConfig(steps=2, lr=1e-3, checkpoint_every=0), device="cpu", progress=False)


@pytest.fixture(scope="module")
def sni_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real tasks with their own descriptions; the factors only fit the standardiser."""
    root = tmp_path_factory.mktemp("sni_library")
    adapters = synthetic_adapters(TargetSpec.smollm2(), len(NAMES), torch.Generator().manual_seed(0))
    for task, adapter in zip(load_tasks(TASKS_DIR, NAMES), adapters):
        save_task(root, task.name, adapter, task.descriptions[:4])
    return root


def _train_t2l(library: Path, out: Path, **kw) -> Generator:
    return train_sft(out, "t2l", TASKS_DIR, NAMES, library=library, model_cfg=T2LConfig(latent_size=32, head_in=32),
                     sft=SFTConfig(tasks_per_step=2, examples_per_task=2), **TINY, **kw)


def test_sft_writes_a_t2l_checkpoint(base_model_dir, sni_library, tmp_path):  # noqa: F811
    gen = _train_t2l(sni_library, tmp_path / "ck")
    assert gen.kind == "t2l" and gen.extra["training"] == "sft" and gen.extra["stopped_at"] is None
    assert gen.extra["library"]["tasks"] == NAMES
    assert torch.isfinite(torch.tensor(gen.extra["final"]["sft_loss"]))
    assert set(gen.extra["final"]) == {"sft_loss"} and gen.extra["sft"]["contrast_weight"] == 0.0  # plain SFT
    assert not (tmp_path / "ck" / STATE_FILE).exists()  # finished: no training state left behind
    loaded = Generator.load(tmp_path / "ck")
    assert loaded.fingerprint == gen.fingerprint
    assert loaded.generate(["Name the capital city of a country."])[0].target == gen.target


def test_time_limit_stops_early_keeps_a_checkpoint_and_resumes(base_model_dir, sni_library, tmp_path):  # noqa: F811
    cut = _train_t2l(sni_library, tmp_path / "ck", max_seconds=0)  # the limit is spent on set-up
    assert cut.extra["stopped_at"] == 0
    assert (tmp_path / "ck" / "model.safetensors").is_file() and (tmp_path / "ck" / STATE_FILE).is_file()
    done = _train_t2l(sni_library, tmp_path / "ck", resume=True)
    assert done.extra["stopped_at"] is None and done.fingerprint != cut.fingerprint
    assert not (tmp_path / "ck" / STATE_FILE).exists()


def test_train_descriptions_only():
    """SFT conditions on train descriptions: never on a task's evaluation descriptions."""
    from generator.api import shared_encoder
    from generator.data.sni import split_descriptions

    data = load_sft_tasks(TASKS_DIR, NAMES, shared_encoder("cpu"))
    held_out = {d for t in data.tasks for d in split_descriptions(t)[1]}
    assert data.descriptions and not held_out & set(data.descriptions)
    assert data.cond.shape == (len(data.descriptions), 384)
    assert sorted(set(data.desc_task.tolist())) == [0, 1]


LABELLED = "task477_cls_english_dvd_classification"  # a closed label set: POS / NEG


def test_named_labels_add_a_labelled_version_of_each_closed_label_description(base_model_dir, tiny_generator_ckpt,  # noqa: F811
                                                                               tmp_path):
    """With named labels, each description of a closed-label task gets a second version naming
    the labels (embedded like the others, same task), an open task's none; plain draws never pick
    one, and a run with every closed-label draw labelled trains and records the setting."""
    from generator.api import shared_encoder

    names = [NAMES[0], LABELLED]
    plain = load_sft_tasks(TASKS_DIR, names, shared_encoder("cpu"))
    data = load_sft_tasks(TASKS_DIR, names, shared_encoder("cpu"), named_labels=True)
    assert plain.num_plain == len(plain.descriptions) and data.num_plain == len(plain.descriptions)
    assert data.descriptions[: data.num_plain] == plain.descriptions
    for d, j in enumerate(data.labelled):
        if data.tasks[int(data.desc_task[d])].name == LABELLED:
            assert data.descriptions[j] == add_label_names(data.descriptions[d], ["NEG", "POS"])
            assert data.descriptions[j].endswith(' Answer with one of: "NEG", "POS".')
            assert int(data.desc_task[j]) == int(data.desc_task[d])
        else:
            assert j == -1
    assert len(data.descriptions) == data.num_plain + sum(j >= 0 for j in data.labelled)
    assert data.cond.shape == (len(data.descriptions), 384)
    with pytest.raises(ValueError, match="probability"):
        SFTConfig(name_labels=1.5)
    sft = SFTConfig(tasks_per_step=2, examples_per_task=2, system_prompt=True, sampler_steps=2, name_labels=1.0)
    gen = train_sft(tmp_path / "ck", "loragen", TASKS_DIR, names, init=tiny_generator_ckpt, sft=sft, **TINY)
    assert gen.extra["sft"]["name_labels"] == 1.0 and torch.isfinite(torch.tensor(gen.extra["final"]["sft_loss"]))


def test_description_draws_with_and_without_named_labels() -> None:
    """P = 0 draws exactly as before named labels (the same indices and the same generator state
    after); P = 1 takes every labelled version there is; other P, about that share."""
    descs_of = [torch.tensor([0, 1, 2]), torch.tensor([3, 4])]
    labelled = [5, 6, 7, -1, -1]  # task 0's descriptions have labelled versions, task 1's none
    chosen = [0, 1, 0, 1, 0]
    g, before = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    old = [int(descs_of[t][torch.randint(len(descs_of[t]), (1,), generator=before)]) for t in chosen]
    assert draw_descriptions(chosen, descs_of, labelled, 0.0, g) == old
    assert torch.equal(g.get_state(), before.get_state())
    all_named = draw_descriptions(chosen, descs_of, labelled, 1.0, torch.Generator().manual_seed(3))
    assert all_named == [labelled[d] if labelled[d] >= 0 else d for d in old]
    g = torch.Generator().manual_seed(0)
    draws = [d for _ in range(400) for d in draw_descriptions([0], descs_of, labelled, 0.5, g)]
    assert 0.4 < sum(d >= 5 for d in draws) / len(draws) < 0.6


def test_user_style_descriptions_follow_the_train_descriptions(base_model_dir, tiny_generator_ckpt, tmp_path):  # noqa: F811
    """With user-style descriptions, each training task's two from the splits file follow the
    train descriptions (embedded, owned by their task); a validation or test task is refused (its
    user-style descriptions are what rows are scored on); a run drawing only user-style
    descriptions trains and records the setting."""
    from generator.api import shared_encoder

    splits = load_splits(TASKS_DIR)
    plain = load_sft_tasks(TASKS_DIR, NAMES, shared_encoder("cpu"))
    data = load_sft_tasks(TASKS_DIR, NAMES, shared_encoder("cpu"), user_style=True)
    assert data.num_plain == plain.num_plain and data.descriptions[: data.num_plain] == plain.descriptions
    for i, name in enumerate(NAMES):
        assert [data.descriptions[j] for j in data.user_of[i]] == list(splits.user_descriptions[name])
        assert all(int(data.desc_task[j]) == i for j in data.user_of[i])
    assert len(data.descriptions) == data.num_plain + 4 and data.cond.shape == (len(data.descriptions), 384)
    with pytest.raises(ValueError, match="must not be trained on"):
        load_sft_tasks(TASKS_DIR, [NAMES[0], splits.test[0]], shared_encoder("cpu"), user_style=True)
    with pytest.raises(ValueError, match="user_style is a probability"):
        SFTConfig(user_style=-0.1)
    sft = SFTConfig(tasks_per_step=2, examples_per_task=2, system_prompt=True, sampler_steps=2, user_style=1.0)
    gen = train_sft(tmp_path / "ck", "loragen", TASKS_DIR, NAMES, init=tiny_generator_ckpt, sft=sft, **TINY)
    assert gen.extra["sft"]["user_style"] == 1.0 and torch.isfinite(torch.tensor(gen.extra["final"]["sft_loss"]))


def test_description_draws_with_user_style() -> None:
    """P = 0 draws exactly as without the option (same indices, same generator state after); P = 1
    takes one of the task's user-style descriptions wherever it has some, each of them; other P,
    about that share."""
    descs_of = [torch.tensor([0, 1, 2]), torch.tensor([3, 4])]
    labelled = [-1] * 5
    user_of = [[5, 6], []]  # task 0 has two user-style descriptions, task 1 none
    chosen = [0, 1, 0, 1, 0]
    g, before = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    old = draw_descriptions(chosen, descs_of, labelled, 0.0, before)
    assert draw_descriptions(chosen, descs_of, labelled, 0.0, g, user_of, 0.0) == old
    assert torch.equal(g.get_state(), before.get_state())
    g = torch.Generator().manual_seed(0)
    draws = [draw_descriptions(chosen, descs_of, labelled, 0.0, g, user_of, 1.0) for _ in range(50)]
    assert all(d[0] in (5, 6) and d[2] in (5, 6) and d[1] in (3, 4) and d[3] in (3, 4) for d in draws)
    assert {d[0] for d in draws} == {5, 6}
    g = torch.Generator().manual_seed(0)
    half = [d for _ in range(400) for d in draw_descriptions([0], descs_of, labelled, 0.0, g, user_of, 0.5)]
    assert 0.4 < sum(d >= 5 for d in half) / len(half) < 0.6


def test_loragen_sft_trains_the_denoiser_through_the_sampler(base_model_dir, tiny_generator_ckpt, tmp_path):  # noqa: F811
    """From a reconstruction-trained LoRAGen, with the contrastive term and the probe: the denoiser
    and decoder move, the LAE encoder (no part of generation) does not, the checkpoint serves with
    the sampler it was trained through and records the term's settings, its last step's CE gap and
    the last probe (also in probe.jsonl, one line per probed step); each snapshot step leaves a
    checkpoint of the weights at that step (the last one's are the final weights)."""
    init = Generator.load(tiny_generator_ckpt)
    sft = SFTConfig(tasks_per_step=2, examples_per_task=2, system_prompt=True, sampler_steps=3, guidance=2.0,
                    contrast_weight=1.0, contrast_margin=0.25)
    probe_task = load_splits(TASKS_DIR).validation[0]
    gen = train_sft(tmp_path / "ck", "loragen", TASKS_DIR, NAMES, init=tiny_generator_ckpt, sft=sft, **TINY,
                    probe_tasks=[probe_task], probe_every=1, snapshots=[1, 2])
    assert gen.kind == "loragen" and gen.extra["init"] == init.fingerprint
    snaps = {n: Generator.load(tmp_path / "ck" / "snapshots" / f"sft-{n}") for n in (1, 2)}
    assert {n: g.extra["snapshot"] for n, g in snaps.items()} == {1: {"sft_step": 1}, 2: {"sft_step": 2}}
    assert all(g.sampler == gen.sampler and g.extra["init"] == init.fingerprint for g in snaps.values())
    final_state, s1, s2 = gen.model.state_dict(), snaps[1].model.state_dict(), snaps[2].model.state_dict()
    assert all(torch.equal(s2[n], final_state[n]) for n in final_state)
    assert not all(torch.equal(s1[n], s2[n]) for n in s2), "the step-1 snapshot holds the final weights"
    probes = [json.loads(line) for line in (tmp_path / "ck" / "probe.jsonl").read_text().splitlines()]
    assert [p["step"] for p in probes] == [1, 2]  # every step, the last included
    assert gen.extra["probe"]["tasks"] == [probe_task]
    assert gen.extra["probe"]["probe_gap"] == pytest.approx(probes[-1]["probe_gap"], abs=1e-4)
    assert probes[-1]["probe_gap"] == pytest.approx(probes[-1]["probe_ce_random"] - probes[-1]["probe_ce_right"], abs=2e-4)
    assert gen.extra["sft"]["contrast_weight"] == 1.0 and gen.extra["sft"]["contrast_margin"] == 0.25
    final = gen.extra["final"]
    assert final["sft_ce_gap"] == pytest.approx(final["sft_ce_wrong"] - final["sft_ce_right"])
    assert final["sft_loss"] >= final["sft_ce_right"]
    assert gen.sampler == {"steps": 3, "guidance": 2.0}
    before, after = init.model.state_dict(), gen.model.state_dict()
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(n.startswith("dit.") for n in moved), "no gradient reached the denoiser"
    assert any(n.startswith("lae.heads_") for n in moved), "no gradient reached the LAE decoder"
    assert not any(n.startswith("lae.encoders.") for n in moved)
    loaded = Generator.load(tmp_path / "ck")
    assert loaded.fingerprint == gen.fingerprint and loaded.sampler == gen.sampler


def test_loragen_sft_trains_through_the_sampler_init_is_served_with(base_model_dir, tiny_generator_ckpt, tmp_path):  # noqa: F811
    """Sampler steps and guidance left unset: those of the starting checkpoint, not fixed defaults."""
    init = Generator.load(tiny_generator_ckpt).with_sampler(steps=2, guidance=1.5).save(tmp_path / "init")
    gen = train_sft(tmp_path / "ck", "loragen", TASKS_DIR, NAMES, init=init,
                    sft=SFTConfig(tasks_per_step=2, examples_per_task=2), **TINY | dict(cfg=TrainConfig(steps=1)))
    assert gen.sampler == {"steps": 2, "guidance": 1.5}
    assert gen.extra["sft"]["sampler_steps"] == 2 and gen.extra["sft"]["guidance"] == 1.5


@pytest.mark.parametrize("steps", [[0], [3]])
def test_snapshot_steps_outside_the_run_are_refused(tiny_generator_ckpt, tmp_path, steps):  # noqa: F811
    with pytest.raises(ValueError, match=r"snapshot steps must lie in 1\.\.2"):
        train_sft(tmp_path / "ck", "loragen", TASKS_DIR, NAMES, init=tiny_generator_ckpt, **TINY, snapshots=steps)


def test_probe_tasks_must_be_held_out(tiny_generator_ckpt, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="probe tasks must be held out, but 1 are training tasks"):
        train_sft(tmp_path / "ck", "loragen", TASKS_DIR, NAMES, init=tiny_generator_ckpt, **TINY,
                  probe_tasks=NAMES[:1], probe_every=1)


def test_t2l_from_scratch_copies_its_statistics_from_a_checkpoint(base_model_dir, tiny_generator_ckpt,  # noqa: F811
                                                                   tmp_path):
    """No oracle library: the standardiser takes the statistics a LoRAGen's LAE was fitted to,
    and a T2L made so passes the same ones on."""
    source = Generator.load(tiny_generator_ckpt)
    expected = source.model.lae.library_stats()
    assert not all(bool((std == 1).all()) for _, std in expected.values())  # fitted, not the initial ones
    kw = dict(model_cfg=T2LConfig(latent_size=32, head_in=32), sft=SFTConfig(tasks_per_step=2, examples_per_task=2),
              **TINY)
    first = train_sft(tmp_path / "a", "t2l", TASKS_DIR, NAMES, stats_from=tiny_generator_ckpt, **kw)
    second = train_sft(tmp_path / "b", "t2l", TASKS_DIR, NAMES, stats_from=tmp_path / "a", **kw)
    for gen in (first, second):
        got = gen.model.standardizer.library_stats()
        assert set(got) == set(expected)
        for key, (mean, std) in expected.items():
            assert torch.equal(got[key][0], mean) and torch.equal(got[key][1], std), key
    assert first.extra["stats_from"] == source.fingerprint and first.extra["init"] is None
    assert second.extra["stats_from"] == first.fingerprint
    assert Generator.load(tmp_path / "b").fingerprint == second.fingerprint


def test_t2l_from_scratch_takes_its_statistics_from_one_source(sni_library, tiny_generator_ckpt, tmp_path):  # noqa: F811
    for kw in ({}, {"library": sni_library, "stats_from": tiny_generator_ckpt}):
        with pytest.raises(ValueError, match="one of the two"):
            train_sft(tmp_path / "ck", "t2l", TASKS_DIR, NAMES, **kw, **TINY)
    with pytest.raises(ValueError, match="keeps init's statistics"):
        train_sft(tmp_path / "ck", "loragen", TASKS_DIR, NAMES, init=tiny_generator_ckpt, stats_from=tiny_generator_ckpt,
                  **TINY)


def test_loragen_sft_needs_a_starting_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="reconstruction-trained checkpoint"):
        train_sft(tmp_path / "ck", "loragen", TASKS_DIR, NAMES, **TINY)


def test_init_of_another_kind_is_refused(tiny_generator_ckpt, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="is a loragen checkpoint, not t2l"):
        train_sft(tmp_path / "ck", "t2l", TASKS_DIR, NAMES, init=tiny_generator_ckpt, **TINY)


# -- one step: sft_backward against a plain autograd reference ------------------------------------

K = 3  # tasks in the step; the wrong assignment pairs task j with task j + 1 mod 3
EXAMPLES = [  # (task, input, output): two per task, of different lengths, so micro-batches mix tasks
    (0, "What is the capital of France?", "Paris"),
    (0, "Name the capital city of the country Japan, please.", "Tokyo"),
    (1, "Give the antonym of the word: hot", "cold"),
    (1, "Give the antonym of the following adjective, one word only: generous", "stingy"),
    (2, "Translate to French: cat", "chat"),
    (2, "Translate this short English sentence to French: the house is big", "la maison est grande"),
]
TOKENS_PER_MICROBATCH = 32  # two rows a micro-batch: each task's rows land in different micro-batches


@pytest.fixture(scope="module")
def lora_base(base_model_dir):  # noqa: F811
    """(base model wrapped by a MultiLoRA, its rows (task, ids, prompt length), pad id, target)."""
    from generator.base_model import load_base_model

    base, tok, _ = load_base_model("cpu")
    target = TargetSpec.smollm2()
    multi = MultiLoRA(base, target, num_adapters=1)
    rows = []
    for j, x, y in EXAMPLES:  # plain text, no chat template: short rows, a fast test
        p, o = tok(x)["input_ids"], tok(" " + y)["input_ids"] + [tok.eos_token_id]
        rows.append((j, p + o, len(p)))
    yield base, multi, rows, tok.pad_token_id, target
    multi.unload()


def _generator_params(target: TargetSpec, seed: int = 0) -> list[torch.Tensor]:
    """A stand-in generator: its parameters are the k tasks' factors (A of every module, then B)."""
    g = torch.Generator().manual_seed(seed)
    L, r = target.num_layers, target.rank
    As = [(torch.rand(K, L, r, target.shapes[m][0], generator=g) * 2 - 1) / target.shapes[m][0] ** 0.5
          for m in target.modules]
    Bs = [torch.randn(K, L, target.shapes[m][1], r, generator=g) * 0.02 for m in target.modules]
    Bs[-1][1] *= 10  # task 1's v_proj adapter is harmful: task 0, scored under it, has a large positive gap
    return [t.requires_grad_() for t in As + Bs]


def _factors(params: list[torch.Tensor], target: TargetSpec) -> tuple[dict, dict]:
    n = len(target.modules)
    return ({m: p * 1.0 for m, p in zip(target.modules, params[:n])},
            {m: p * 1.0 for m, p in zip(target.modules, params[n:])})


def _reference_ce(lora_base, params, perm: list[int] | None) -> torch.Tensor:
    """(K,) each task's mean output-token CE, task j under the factors of task perm[j] (None: its
    own), in one batch with plain autograd: no micro-batches, no detached copies, no surrogate."""
    base, multi, rows, pad, target = lora_base
    A, B = _factors(params, target)
    task = torch.tensor([j for j, _, _ in rows])
    src = task if perm is None else torch.tensor(perm)[task]
    with multi.use_factors({m: a[src] for m, a in A.items()}, {m: b[src] for m, b in B.items()}):
        ce, row = output_token_ce(base, [(ids, p) for _, ids, p in rows], pad)
    return torch.zeros(K).index_add(0, task[row], ce) / torch.bincount(task[row], minlength=K)


def _step(lora_base, params, sft: SFTConfig) -> tuple[list[torch.Tensor], dict[str, float]]:
    """sft_backward's logs and the gradient its surrogate pushes into the generator's parameters."""
    base, multi, rows, pad, target = lora_base
    A, B = _factors(params, target)
    surrogate, logs = sft_backward(base, multi, A, B, rows, sft, pad)
    return list(torch.autograd.grad(surrogate, params)), logs


def _largest(grads: Sequence[torch.Tensor]) -> float:
    return max(float(g.abs().max()) for g in grads)


def _assert_grads_close(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> None:
    """Equal up to float rounding (micro-batches pad differently): within 1e-4 of the largest entry (+ 0.1%)."""
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4 * _largest(want))


WRONG = [(j + 1) % K for j in range(K)]


def test_sft_step_without_contrast_is_plain_sft(lora_base):
    """Weight 0 is SFT as before: the loss is the mean over tasks of each task's mean output-token
    CE, its gradient the reference's, although each task's rows are split over micro-batches; one
    pass only (no wrong-assignment logs); and it is the same step with the term's settings changed."""
    rows = lora_base[2]
    group_of = {i: n for n, g in enumerate(microbatches([len(r[1]) for r in rows], TOKENS_PER_MICROBATCH)) for i in g}
    assert all(len({group_of[i] for i, r in enumerate(rows) if r[0] == j}) == 2 for j in range(K)), \
        "each task's two rows should be in different micro-batches"
    params = _generator_params(lora_base[4])
    ref = _reference_ce(lora_base, params, None).mean()
    ref_grad = torch.autograd.grad(ref, params)
    grad, logs = _step(lora_base, params, SFTConfig(tokens_per_microbatch=TOKENS_PER_MICROBATCH))
    assert set(logs) == {"sft_loss"}
    assert logs["sft_loss"] == pytest.approx(float(ref.detach()), rel=1e-5)
    _assert_grads_close(grad, ref_grad)
    grad2, logs2 = _step(lora_base, params, SFTConfig(tokens_per_microbatch=TOKENS_PER_MICROBATCH, contrast_margin=3.0))
    assert logs2 == logs and all(torch.equal(a, b) for a, b in zip(grad, grad2))


def test_contrast_term_loss_gap_and_gradient_through_the_wrong_assignment(lora_base):
    """Weight > 0: the loss is mean_j [CE_j(j) + w relu(m + CE_j(j) - CE_j(j+1))] with the hinge
    active for some tasks only (so it must be taken on whole tasks, not micro-batches), the gap is
    logged, and the gradient is the reference's, of which the wrong assignment's part is a large share."""
    params = _generator_params(lora_base[4])
    right, wrong = _reference_ce(lora_base, params, None), _reference_ce(lora_base, params, WRONG)
    d = (wrong - right).detach().sort().values  # CE_j(j+1) - CE_j(j), ascending; the hinge is active where < margin
    assert float(d[-1]) > 0
    margin = (max(float(d[-2]), 0.0) + float(d[-1])) / 2  # the largest gap is above it, the smallest below
    w = 0.7
    hinge = torch.relu(margin + right - wrong)
    active = (hinge > 0).float()
    assert 0 < float(active.mean()) < 1, "the case needs tasks on both sides of the margin"
    ref = (right + w * hinge).mean()
    ref_grad = torch.autograd.grad(ref, params, retain_graph=True)
    sft = SFTConfig(tokens_per_microbatch=TOKENS_PER_MICROBATCH, contrast_weight=w, contrast_margin=margin)
    grad, logs = _step(lora_base, params, sft)
    assert logs["sft_loss"] == pytest.approx(float(ref.detach()), rel=1e-5)
    assert logs["sft_ce_right"] == pytest.approx(float(right.detach().mean()), rel=1e-5)
    assert logs["sft_ce_wrong"] == pytest.approx(float(wrong.detach().mean()), rel=1e-5)
    assert logs["sft_ce_gap"] == pytest.approx(logs["sft_ce_wrong"] - logs["sft_ce_right"])
    assert logs["sft_hinge_active"] == pytest.approx(float(active.mean()))
    _assert_grads_close(grad, ref_grad)
    # What reaches the generator through the wrong assignment only: its largest entry is far above
    # the tolerance (1e-4 of the largest + 0.1%), so a step that dropped it, or took it with the
    # wrong sign or scale, would fail the check above.
    wrong_grad = torch.autograd.grad((-w * active * wrong).mean(), params)
    assert _largest(wrong_grad) > 0.05 * _largest(ref_grad)


def test_sft_step_needs_output_tokens_for_every_task(lora_base):
    base, multi, rows, pad, target = lora_base
    A, B = _factors(_generator_params(target), target)
    with pytest.raises(ValueError, match=r"tasks \[2\] have none"):
        sft_backward(base, multi, A, B, [r for r in rows if r[0] != 2], SFTConfig(contrast_weight=1.0), pad)


@pytest.mark.parametrize("kw, match", [
    (dict(contrast_weight=-0.1), "contrast_weight must be >= 0"),
    (dict(contrast_weight=float("nan")), "contrast_weight must be >= 0"),
    (dict(contrast_weight=1.0, contrast_margin=-0.5), "contrast_margin must be >= 0"),
    (dict(contrast_weight=1.0, tasks_per_step=1), "at least 2 tasks per step, got 1"),
])
def test_bad_contrast_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        SFTConfig(**kw)


def test_contrast_needs_two_training_tasks(tmp_path):
    """One training task: nothing to contrast with; refused before anything is loaded."""
    with pytest.raises(ValueError, match="at least 2 tasks per step, got 1"):
        train_sft(tmp_path / "ck", "t2l", TASKS_DIR, NAMES[:1], sft=SFTConfig(tasks_per_step=2, contrast_weight=1.0),
                  **TINY)
    assert not (tmp_path / "ck").exists()


def test_cli_refuses_a_negative_contrast_weight(tmp_path):
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit, match="error: contrast_weight must be >= 0"):
            main(["--out", str(tmp_path / "ck"), "--contrast-weight", "-1"])
    finally:
        torch.set_num_threads(threads)  # main sets --threads


def test_sft_refuses_validation_and_test_tasks() -> None:
    from generator.training.sft import load_sft_tasks

    splits = load_splits(TASKS_DIR)
    for held_out in (splits.validation[0], splits.test[0]):
        with pytest.raises(ValueError, match="validation or test tasks must not be trained on"):
            load_sft_tasks(TASKS_DIR, [splits.train[0], held_out], encoder=None)  # refused before any encoding
