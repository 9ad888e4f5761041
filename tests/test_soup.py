"""Weight averaging of generator checkpoints (`generator.soup`) on the tiny LoRAGen checkpoint."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from generator import Generator
from generator.models import build_model
from generator.soup import average


def _moved(a: Generator, scale: float, buffers: bool = False, sampler: dict | None = None) -> Generator:
    """`a` with every parameter (and, with `buffers`, every buffer) moved by seeded noise."""
    params = {n for n, _ in a.model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    state = {k: v + scale * torch.randn(v.shape, generator=g) if (k in params or buffers) and v.is_floating_point()
             else v for k, v in a.model.state_dict().items()}
    model = copy.deepcopy(a.model)
    model.load_state_dict(state)
    return Generator(a.kind, a.target, model, a.configs, sampler or a.sampler, "cpu", a.extra)


@pytest.fixture(scope="module")
def two_ckpts(tiny_generator_ckpt, tmp_path_factory):
    """The tiny checkpoint and a copy with its parameters (not its buffers) moved, served at guidance 3."""
    a = Generator.load(tiny_generator_ckpt)
    b_dir = tmp_path_factory.mktemp("soup_b")
    _moved(a, 0.01, sampler={**a.sampler, "guidance": 3.0}).save(b_dir)
    return tiny_generator_ckpt, b_dir


def test_soup_is_the_parameter_mean_and_a_checkpoint(two_ckpts, tmp_path):
    a_dir, b_dir = two_ckpts
    a, b = Generator.load(a_dir), Generator.load(b_dir)
    soup = average([a_dir, b_dir])
    sa, sb, ss = a.model.state_dict(), b.model.state_dict(), soup.model.state_dict()
    params = {n for n, _ in a.model.named_parameters()}
    assert set(ss) == set(sa) and params < set(ss)  # the model has buffers too
    for k in ss:
        want = (sa[k] + sb[k]) / 2 if k in params else sa[k]
        assert not torch.equal(sa[k], sb[k]) or k not in params, k  # the fixture moved every parameter
        assert torch.allclose(ss[k], want, atol=1e-6), k
    assert soup.sampler == a.sampler  # the first checkpoint's, not the second's guidance 3
    assert soup.extra["training"] == "soup" and "probe" not in soup.extra and "sft" not in soup.extra
    assert [s["fingerprint"] for s in soup.extra["soup"]] == [a.fingerprint, b.fingerprint]
    soup.save(tmp_path / "soup")
    loaded = Generator.load(tmp_path / "soup")  # the fingerprint checks out against the weights
    assert loaded.fingerprint == soup.fingerprint
    d = "Classify the sentiment of a movie review as positive or negative."
    assert loaded.generate([d], seed=0)[0].to_peft_files() == soup.generate([d], seed=0)[0].to_peft_files()


def test_soup_of_one_checkpoint_with_itself_keeps_its_adapters(two_ckpts):
    a_dir, _ = two_ckpts
    a, soup = Generator.load(a_dir), average([a_dir, a_dir])
    d = "Extract the person's name from the sentence."
    x, y = a.generate([d], seed=3)[0], soup.generate([d], seed=3)[0]
    assert torch.allclose(x.B["q_proj"], y.B["q_proj"], atol=1e-6)


def test_soup_refuses_other_models_and_single_checkpoints(two_ckpts, tmp_path):
    a_dir, _ = two_ckpts
    a = Generator.load(a_dir)
    configs = copy.deepcopy(a.configs)
    configs["diffusion"]["d_model"] = 32
    other = Generator(a.kind, a.target, build_model(a.kind, a.target, configs), configs, a.sampler, "cpu")
    other.save(tmp_path / "other")
    with pytest.raises(ValueError, match="not the same model"):
        average([a_dir, tmp_path / "other"])
    with pytest.raises(ValueError, match="at least two"):
        average([a_dir])
    _moved(a, 0.01, buffers=True).save(tmp_path / "other_start")  # other latent statistics
    with pytest.raises(ValueError, match="does not share a starting point"):
        average([a_dir, tmp_path / "other_start"])


def test_soup_cli_writes_a_loadable_checkpoint(two_ckpts, tmp_path):
    a_dir, b_dir = two_ckpts
    r = subprocess.run([sys.executable, "-m", "generator.soup", "--out", str(tmp_path / "s"), str(a_dir), str(b_dir)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert Generator.load(out["checkpoint"]).fingerprint == out["fingerprint"]
    assert out["sources"] == [Generator.load(a_dir).fingerprint[:12], Generator.load(b_dir).fingerprint[:12]]


def test_soup_cli_reports_a_missing_checkpoint_clearly(two_ckpts, tmp_path):
    a_dir, _ = two_ckpts
    r = subprocess.run([sys.executable, "-m", "generator.soup", "--out", str(tmp_path / "s"), str(a_dir),
                        str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "error:" in r.stderr and "not a generator checkpoint" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "s").exists()
