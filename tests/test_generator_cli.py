"""`python -m generator train | generate` end to end, and resumable training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from generator import Generator, LoRAAdapter

from .fixtures_generator import TINY_CONFIGS


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "generator", *args], capture_output=True, text=True, timeout=600,
                          check=False) if not check else _checked(args)


def _checked(args) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "generator", *args], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_cli_train_loragen_then_generate(synthetic_library, tmp_path):
    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps(TINY_CONFIGS))
    ckpt = tmp_path / "ckpt"
    out = _checked(["train", "--kind", "loragen", "--library", str(synthetic_library), "--out", str(ckpt),
                    "--steps", "20", "--diffusion-steps", "20", "--tokens-per-step", "16", "--batch-size", "4",
                    "--model-config", str(cfg), "--checkpoint-every", "10"])
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["kind"] == "loragen" and info["fingerprint"] == Generator.load(ckpt).fingerprint
    assert not (ckpt / "train_state.pt").exists()  # removed once the checkpoint is complete

    adapter_dir = tmp_path / "adapter"
    out = _checked(["generate", "--checkpoint", str(ckpt), "--description", "Summarize legal contracts.",
                    "--seed", "3", "--out", str(adapter_dir)])
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(info["seconds"]) == {"encode", "diffuse", "decode"}
    adapter = LoRAAdapter.load_peft(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    same = Generator.load(ckpt).generate(["Summarize legal contracts."], seed=3)[0]
    assert adapter.cosine_to(same).min() > 0.9999


def test_cli_reports_bad_input_clearly(tmp_path):
    p = _cli("generate", "--checkpoint", str(tmp_path / "missing"), "--description", "x", "--out", str(tmp_path / "o"),
             check=False)
    assert p.returncode == 2 and "not a generator checkpoint" in p.stderr
    p = _cli("train", "--kind", "t2l", "--library", str(tmp_path / "nolib"), "--out", str(tmp_path / "c"), check=False)
    assert p.returncode == 2 and "not found" in p.stderr


def test_cli_train_refuses_validation_and_test_tasks(synthetic_library, tmp_path):
    import shutil

    from generator.data.sni import load_splits

    lib = tmp_path / "lib"
    shutil.copytree(synthetic_library, lib)
    first = sorted(p for p in lib.iterdir() if p.is_dir())[0]
    first.rename(lib / load_splits(Path(__file__).resolve().parents[1] / "data" / "sni" / "tasks").validation[0])
    p = _cli("train", "--kind", "t2l", "--library", str(lib), "--out", str(tmp_path / "c"), "--steps", "1", check=False)
    assert p.returncode == 2 and "validation or test tasks" in p.stderr and not (tmp_path / "c").exists()


def test_cli_never_replaces_a_checkpoint_or_adapter(synthetic_library, tmp_path):
    """A finished checkpoint is not trained over, an unfinished run only resumed, an adapter folder
    not written into, a soup not written over its own source; impossible numbers are usage errors."""
    ckpt = tmp_path / "ckpt"
    _checked(["train", "--kind", "t2l", "--library", str(synthetic_library), "--out", str(ckpt), "--steps", "2",
              "--batch-size", "2"])
    before = Generator.load(ckpt).fingerprint
    for resume in ([], ["--resume"]):
        p = _cli("train", "--kind", "t2l", "--library", str(synthetic_library), "--out", str(ckpt), "--steps", "1",
                 *resume, check=False)
        assert p.returncode == 2 and "already holds a finished checkpoint" in p.stderr
    (ckpt.parent / "run").mkdir()
    (ckpt.parent / "run" / "train_state.pt").write_bytes(b"")
    p = _cli("train", "--kind", "t2l", "--library", str(synthetic_library), "--out", str(ckpt.parent / "run"),
             check=False)
    assert p.returncode == 2 and "unfinished run" in p.stderr
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "keep.txt").write_text("mine")
    p = _cli("generate", "--checkpoint", str(ckpt), "--description", "Sort a list.", "--out", str(tmp_path / "adapter"),
             check=False)
    assert p.returncode == 2 and "not an empty folder" in p.stderr
    p = subprocess.run([sys.executable, "-m", "generator.soup", "--out", str(ckpt), str(ckpt), str(ckpt)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "is not an empty folder" in p.stderr
    assert Generator.load(ckpt).fingerprint == before and (tmp_path / "adapter" / "keep.txt").read_text() == "mine"
    for bad in (["--steps", "-5"], ["--batch-size", "0"], ["--device", "bogus"], ["--max-descriptions", "-1"]):
        p = _cli("train", "--kind", "t2l", "--library", str(synthetic_library), "--out", str(tmp_path / "new"), *bad,
                 check=False)
        assert p.returncode == 2 and bad[0] in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "generator.training.oracles", "pack", str(tmp_path / "typo"),
                        str(tmp_path / "shards")], capture_output=True, text=True, timeout=600)
    assert p.returncode == 1 and "not found" in p.stderr and "Traceback" not in p.stderr


def test_interrupted_training_resumes_to_the_same_weights(synthetic_library, tmp_path):
    from generator.config import T2LConfig, TrainConfig
    from generator.training.train import STATE_FILE, load_training_data, train_t2l

    data = load_training_data(synthetic_library)
    small = T2LConfig(latent_size=32, head_in=32)  # dropout on: the RNG state must be restored too
    cfg = TrainConfig(steps=10, batch_size=4, checkpoint_every=4)
    full = train_t2l(data, tmp_path / "full", small, cfg, progress=False)

    def stop_at_6(stage: str, step: int) -> None:
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_t2l(data, tmp_path / "cut", small, cfg, progress=False, callback=stop_at_6)
    assert (tmp_path / "cut" / STATE_FILE).is_file()
    retrained = load_training_data(synthetic_library)  # same tasks and descriptions, other oracle weights
    retrained.B = {m: b + 0.01 for m, b in retrained.B.items()}
    with pytest.raises(ValueError, match="belongs to a different training run"):
        train_t2l(retrained, tmp_path / "cut", small, cfg, progress=False, resume=True)
    resumed = train_t2l(data, tmp_path / "cut", small, cfg, progress=False, resume=True)
    assert resumed.fingerprint == full.fingerprint


def test_loragen_resumed_in_its_second_stage_writes_the_same_checkpoint(synthetic_library, tmp_path):
    from generator.config import DiffusionConfig, LAEConfig, TrainConfig
    from generator.training.train import load_training_data, train_loragen

    data = load_training_data(synthetic_library)
    lae, diff = LAEConfig.from_dict(TINY_CONFIGS["lae"]), DiffusionConfig.from_dict(TINY_CONFIGS["diffusion"])
    cfg = TrainConfig(steps=6, diffusion_steps=8, tokens_per_step=16, batch_size=4, checkpoint_every=2)
    full = train_loragen(data, tmp_path / "full", lae, diff, cfg, progress=False, snapshots=(4, 8))

    def stop_in_dit(stage: str, step: int) -> None:
        if stage == "dit" and step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_loragen(data, tmp_path / "cut", lae, diff, cfg, progress=False, callback=stop_in_dit, snapshots=(4, 8))
    resumed = train_loragen(data, tmp_path / "cut", lae, diff, cfg, progress=False, resume=True, snapshots=(4, 8))
    assert set(resumed.extra["final"]) == set(full.extra["final"])  # the LAE's logs survive the resume
    assert resumed.fingerprint == full.fingerprint
    for step in (4, 8):
        snap = f"snapshots/dit-{step}"
        assert Generator.load(tmp_path / "cut" / snap).fingerprint == Generator.load(tmp_path / "full" / snap).fingerprint
