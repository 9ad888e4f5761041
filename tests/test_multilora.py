"""MultiLoRA against peft on the real SmolLM2, and batched oracle training against training alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from generator.adapter import LoRAAdapter
from generator.config import TargetSpec
from generator.training.multilora import MultiLoRA
from generator.training.oracles import Job, OracleConfig, train_adapters


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from generator.base_model import ensure_base_model

    path = ensure_base_model()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path)), path


def _random_adapter(target: TargetSpec, seed: int) -> LoRAAdapter:
    g = torch.Generator().manual_seed(seed)
    A = {m: torch.randn(target.num_layers, target.rank, target.shapes[m][0], generator=g) * 0.05 for m in target.modules}
    B = {m: torch.randn(target.num_layers, target.shapes[m][1], target.rank, generator=g) * 0.05 for m in target.modules}
    return LoRAAdapter(target, A, B)


def test_rows_match_peft_per_adapter(smollm2, tmp_path):
    """Row i of one batched forward equals peft's forward with adapter i (and -1 equals the base)."""
    from peft import PeftModel

    model, tok, path = smollm2
    target = TargetSpec.smollm2()
    adapters = [_random_adapter(target, s) for s in (1, 2)]
    batch = tok(["Name a colour.", "What is 2 + 2? Answer:", "Hello"], return_tensors="pt", padding=True)

    with torch.no_grad():
        base = model(**batch).logits
    multi = MultiLoRA(model, target, num_adapters=2)
    try:
        for slot, a in enumerate(adapters):
            multi.load(slot, a)
        with torch.no_grad(), multi.use([1, 0, -1]):
            got = model(**batch).logits
        with torch.no_grad():  # no index set: the plain base model
            unset = model(**batch).logits
        # the same adapters given as per-row factors (how a hypernetwork is trained through the model)
        zero = {m: torch.zeros_like(adapters[0].A[m]) for m in target.modules}
        rows_A = {m: torch.stack([adapters[1].A[m], adapters[0].A[m], zero[m]]) for m in target.modules}
        rows_B = {m: torch.stack([adapters[1].B[m], adapters[0].B[m], torch.zeros_like(adapters[0].B[m])]) for m in target.modules}
        with torch.no_grad(), multi.use_factors(rows_A, rows_B):
            by_factors = model(**batch).logits
    finally:
        multi.unload()
    torch.testing.assert_close(unset, base)
    torch.testing.assert_close(by_factors, got, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], base[2])

    for row, slot in ((0, 1), (1, 0)):
        folder = adapters[slot].save_peft(tmp_path / f"a{slot}", base_model_name_or_path=str(path))
        peft_model = PeftModel.from_pretrained(model, str(folder)).eval()
        with torch.no_grad():
            want = peft_model(**batch).logits[row]
        peft_model.unload()  # restores the plain modules in `model`
        assert not torch.allclose(want, base[row], atol=1e-3)  # the adapter does change the output
        torch.testing.assert_close(got[row], want, atol=2e-4, rtol=1e-4)


def test_batched_training_equals_training_alone(smollm2):
    """Two adapters trained together equal each trained alone; the slot round-trips to a LoRAAdapter."""
    model, tok, path = smollm2
    target = TargetSpec.smollm2()
    cfg = OracleConfig(steps=2, batch_size=2, lr=1e-3)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    job_a = Job("a", [(ids("Capital of France?"), ids("Paris") + [2]), (ids("Capital of Peru?"), ids("Lima") + [2])], 2)
    job_b = Job("b", [(ids("Opposite of hot, please"), ids("cold") + [2]), (ids("Opposite of up"), ids("down") + [2])], 2)

    together, _ = train_adapters(model, [job_a, job_b], target, cfg, progress=False)
    alone_b, _ = train_adapters(model, [job_b], target, cfg, progress=False)
    for m in target.modules:
        assert together[1].B[m].abs().max() > 0  # it trained (B starts at zero)
        # Compare dW = B A: Adam's g / sqrt(v) step turns float rounding of near-zero gradients into
        # lr-sized differences of single factor entries, which dW averages out.
        for layer in (0, 29):
            got, want = together[1].delta(m, layer), alone_b[0].delta(m, layer)
            assert (got - want).norm() / want.norm() < 1e-2
    assert not torch.allclose(together[0].B["q_proj"], together[1].B["q_proj"])
    # the model is the plain base model again
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def test_library_travels_as_bf16_shards(tmp_path):
    """pack -> unpack keeps every adapter (bf16-rounded), its side files and the folder layout."""
    from generator.data.library import pack_library, unpack_library

    target = TargetSpec.smollm2()
    root = tmp_path / "oracles"
    for k, sub in enumerate(("library/task_a", "library/task_b", "held_out/task_c", "multitask")):
        folder = _random_adapter(target, k).save_peft(root / sub)
        if sub != "multitask":
            (folder / "descriptions.json").write_text(json.dumps([f"description {k}"]))
    shards = pack_library(root, tmp_path / "shards", num_shards=3)
    names = unpack_library(shards, tmp_path / "back")
    assert sorted(names) == ["held_out/task_c", "library/task_a", "library/task_b", "multitask"]
    got = LoRAAdapter.load_peft(tmp_path / "back" / "held_out" / "task_c")
    want = _random_adapter(target, 2)
    torch.testing.assert_close(got.B["v_proj"], want.B["v_proj"].bfloat16().float())
    assert json.loads((tmp_path / "back/library/task_b/descriptions.json").read_text()) == ["description 1"]
    assert not (tmp_path / "back/multitask/descriptions.json").exists()


def test_oracles_rerun_with_other_settings_is_refused(tmp_path):
    """A rerun trains only the missing tasks, so it must use the recipe the folder was made with."""
    from dataclasses import asdict

    from generator.data.library import append_run
    from generator.data.sni import load_splits
    from generator.training.oracles import OracleConfig, train_library

    tasks = Path(__file__).resolve().parents[1] / "data" / "sni" / "tasks"
    first = OracleConfig(steps=1)
    append_run(tmp_path, {"config": {**asdict(first), "modules": list(first.modules)}})
    with pytest.raises(ValueError, match=r"other settings \(rank, steps differ\)"):
        train_library(tasks, tmp_path, OracleConfig(steps=50, rank=4), only=[load_splits(tasks).train[0]])
