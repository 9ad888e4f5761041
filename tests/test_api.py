"""The public API on the tiny LoRAGen checkpoint: load, generate, determinism, fingerprint, peft."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from generator import Generator, LoRAAdapter, TargetSpec
from generator.api import CONFIG_FILE, WEIGHTS_FILE, compute_fingerprint, mean_of_samples
from generator.models import build_model


@pytest.fixture(scope="module")
def gen(tiny_generator_ckpt) -> Generator:
    return Generator.load(tiny_generator_ckpt)


def test_checkpoint_describes_itself(gen, tiny_generator_ckpt):
    cfg = json.loads((tiny_generator_ckpt / CONFIG_FILE).read_text())
    assert cfg["kind"] == "loragen" and cfg["base_model"] == TargetSpec.smollm2().base_model
    assert cfg["target"]["modules"] == ["q_proj", "v_proj"] and cfg["target"]["rank"] == 8
    assert cfg["encoder"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert cfg["sampler"]["steps"] == 10 and cfg["fingerprint"] == gen.fingerprint
    assert gen.target == TargetSpec.smollm2()


def test_same_description_seed_checkpoint_gives_identical_adapter(gen):
    d = "Summarize restaurant reviews in one sentence."
    a, b = gen.generate([d], seed=7)[0], gen.generate([d], seed=7)[0]
    assert a.to_peft_files() == b.to_peft_files()
    c = gen.generate([d], seed=8)[0]
    assert not torch.equal(a.B["q_proj"], c.B["q_proj"])


def test_adapter_does_not_depend_on_batch_composition(gen):
    d = "Translate recipes into French."
    alone = gen.generate([d], seed=1)[0]
    batch = gen.generate(["Detect sarcasm in tweets.", d, "Count the verbs in poems."], seed=1)
    assert alone.cosine_to(batch[1]).min() > 0.9999
    assert torch.allclose(alone.B["v_proj"], batch[1].B["v_proj"], atol=1e-5, rtol=1e-4)


def test_generate_timed_reports_stages(gen):
    adapters, t = gen.generate_timed(["Write a title for news headlines."] * 2)
    assert len(adapters) == 2 and set(t) == {"encode", "diffuse", "decode"}
    assert all(v >= 0 for v in t.values()) and t["diffuse"] > 0
    assert gen.generate([]) == []


@pytest.mark.parametrize("bad, exc", [("a string", TypeError), ([b"bytes"], TypeError), ([""], ValueError), (["  "], ValueError)])
def test_bad_descriptions_raise(gen, bad, exc):
    with pytest.raises(exc):
        gen.generate(bad)


def test_zero_sampler_steps_is_an_error_not_the_default(gen):
    with pytest.raises(ValueError, match="sampler steps must be in"):
        gen.generate(["Write a title for news headlines."], steps=0)


@pytest.mark.parametrize("guidance", [float("nan"), float("inf"), "2"])
def test_a_guidance_that_would_make_nan_adapters_is_an_error(gen, guidance):
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        gen.generate(["Write a title for news headlines."], guidance=guidance)
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        gen.with_sampler(guidance=guidance)


def test_a_description_that_is_not_unicode_text_is_an_error(gen):
    with pytest.raises(ValueError, match="valid Unicode text"):
        gen.generate(["ok \ud800 text"])  # a lone surrogate, as JSON's "\ud800" decodes


def test_fingerprint_tracks_weights_and_load_detects_tampering(gen, tiny_generator_ckpt, tmp_path):
    state = {k: v.clone() for k, v in gen.model.state_dict().items()}
    base = compute_fingerprint(gen.config_dict(include_fingerprint=False), state)
    assert base == gen.fingerprint
    name = next(k for k in state if k.startswith("dit."))
    state[name] = state[name] + 1e-3
    assert compute_fingerprint(gen.config_dict(include_fingerprint=False), state) != base
    # Saving a changed model gives a new fingerprint; an edited checkpoint is refused.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_generator_ckpt, copy)
    cfg = json.loads((copy / CONFIG_FILE).read_text())
    cfg["sampler"]["steps"] = 3
    (copy / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="fingerprint"):
        Generator.load(copy)
    (copy / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError):
        Generator.load(copy)
    with pytest.raises(FileNotFoundError):
        Generator.load(tmp_path / "nothing")


def test_load_names_what_is_wrong_with_a_checkpoint(gen, tiny_generator_ckpt, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_generator_ckpt, copy)
    cfg = json.loads((copy / CONFIG_FILE).read_text())
    (copy / CONFIG_FILE).write_text(json.dumps({k: v for k, v in cfg.items() if k != "target"}))
    with pytest.raises(ValueError, match="incomplete generator config"):
        Generator.load(copy)
    cfg["configs"]["diffusion"]["depth"] += 1  # weights of another architecture
    (copy / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not hold the weights its config describes"):
        Generator.load(copy)
    (copy / CONFIG_FILE).write_text("[]")
    with pytest.raises(ValueError, match="unsupported checkpoint format"):
        Generator.load(copy)
    cfg["configs"]["diffusion"]["depth"] -= 1
    for part, bad in (("sampler", "x"), ("extra", [1, 2])):
        (copy / CONFIG_FILE).write_text(json.dumps({**cfg, part: bad}))
        with pytest.raises(ValueError, match="incomplete generator config"):
            Generator.load(copy)
    broken = json.loads(json.dumps(cfg))
    broken["target"]["shapes"][next(iter(broken["target"]["shapes"]))] = [8]  # one number for (d_in, d_out)
    (copy / CONFIG_FILE).write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="incomplete generator config"):
        Generator.load(copy)


def test_with_sampler_keeps_the_weights_and_changes_the_fingerprint(gen):
    other = gen.with_sampler(steps=5)
    assert other.model is gen.model and other.cuda_graphs == gen.cuda_graphs
    assert other.sampler["steps"] == 5 and gen.sampler["steps"] == 10 and other.fingerprint != gen.fingerprint
    with pytest.raises(ValueError, match="unknown sampler settings"):
        gen.with_sampler(temperature=0.5)


def test_mean_of_samples_is_the_best_rank_r_approximation_of_the_mean():
    torch.manual_seed(0)
    n, k, layers, r, d_in, d_out = 2, 4, 3, 8, 48, 24
    A = {"q": torch.randn(n * k, layers, r, d_in)}
    B = {"q": torch.randn(n * k, layers, d_out, r)}
    mA, mB = mean_of_samples(A, B, k)
    assert mA["q"].shape == (n, layers, r, d_in) and mB["q"].shape == (n, layers, d_out, r)
    dw = (B["q"] @ A["q"]).reshape(n, k, layers, d_out, d_in).mean(1)  # each description's mean dW
    u, sv, vh = torch.linalg.svd(dw)
    best = u[..., :r] @ torch.diag_embed(sv[..., :r]) @ vh[..., :r, :]  # Eckart-Young
    assert torch.allclose(mB["q"] @ mA["q"], best, atol=1e-4, rtol=1e-4)


def test_samples_average_noises_into_one_adapter_of_the_same_shape(gen, tmp_path):
    """`samples: k` is part of the checkpoint (a new fingerprint, saved and loaded); 1, the
    default, is not recorded, so older checkpoints keep their fingerprints."""
    assert "samples" not in gen.sampler and "samples" not in gen.config_dict()["sampler"]
    assert gen.with_sampler(samples=1).fingerprint == gen.fingerprint
    mean4 = gen.with_sampler(samples=4)
    assert mean4.fingerprint != gen.fingerprint and mean4.sampler["samples"] == 4
    d = "Classify the sentiment of product reviews."
    one, four = gen.generate([d], seed=3)[0], mean4.generate([d], seed=3)[0]
    assert four.target == one.target and four.A["q_proj"].shape == one.A["q_proj"].shape
    assert mean4.generate([d], seed=3)[0].to_peft_files() == four.to_peft_files()  # deterministic
    # Averaging cancels part of the seed's noise: the mean is smaller than one sample.
    norm = lambda a: (a.B["q_proj"] @ a.A["q_proj"]).norm()  # noqa: E731
    assert norm(four) < norm(one)
    loaded = Generator.load(mean4.save(tmp_path / "mean4"))
    assert loaded.fingerprint == mean4.fingerprint and loaded.generate([d], seed=3)[0].to_peft_files() == four.to_peft_files()
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="samples must be an int >= 1"):
            gen.with_sampler(samples=bad)


def test_default_checkpoint_fits_30mb(tmp_path):
    target = TargetSpec.smollm2()
    g = Generator("loragen", target, build_model("loragen", target, {}), {})
    g.save(tmp_path / "ckpt")
    size = sum(p.stat().st_size for p in (tmp_path / "ckpt").iterdir())
    assert size <= 30 * 2**20, size


def test_generated_adapter_loads_in_peft_and_changes_logits(gen, base_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = gen.generate(["Answer questions about movie plots."], seed=0)[0]
    folder = adapter.save_peft(tmp_path / "adapter", base_model_name_or_path=str(base_model_dir))
    assert LoRAAdapter.load_peft(folder).cosine_to(adapter).min() > 0.9999

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        base_logits = model(**ids).logits
        peft_model = PeftModel.from_pretrained(model, str(folder))
        lora_logits = peft_model(**ids).logits
    assert (lora_logits - base_logits).abs().max() > 1e-3
    # peft applies exactly our dW = (alpha / r) B A.
    layer = peft_model.base_model.model.model.layers[4].self_attn.v_proj
    assert torch.allclose(layer.get_delta_weight("default"), adapter.delta("v_proj", 4), atol=1e-6)
