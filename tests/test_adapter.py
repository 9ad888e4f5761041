"""LoRAAdapter <-> PEFT folder, TargetSpec, and library folders."""

from __future__ import annotations

import json

import pytest
import torch

from generator.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAAdapter
from generator.config import TargetSpec
from generator.data.library import load_library, save_task
from generator.data.synthetic import make_synthetic_library, synthetic_adapters


def _small_target() -> TargetSpec:
    return TargetSpec(
        base_model="tiny",
        modules=("q_proj", "v_proj"),
        num_layers=3,
        rank=2,
        alpha=4.0,
        shapes={"q_proj": (6, 6), "v_proj": (6, 4)},
        module_paths={"q_proj": "model.layers.{layer}.self_attn.q_proj", "v_proj": "model.layers.{layer}.self_attn.v_proj"},
    )


def _random_adapter(target: TargetSpec, seed: int = 0) -> LoRAAdapter:
    g = torch.Generator().manual_seed(seed)
    return synthetic_adapters(target, 1, g)[0]


def test_target_spec_json_roundtrip_and_locations():
    t = TargetSpec.smollm2()
    assert TargetSpec.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    assert t.num_locations == 60 and t.locations[0] == ("q_proj", 0) and t.locations[30] == ("v_proj", 0)
    assert t.shapes["v_proj"] == (576, 192) and t.scaling == 2.0
    with pytest.raises(ValueError):
        TargetSpec.smollm2(modules=("nope",))


def test_target_from_model_matches_smollm2(base_model_dir):
    spec = TargetSpec.from_model(base_model_dir, ("q_proj", "v_proj"), rank=8, alpha=16.0,
                                 base_model=TargetSpec.smollm2().base_model)
    assert spec == TargetSpec.smollm2()


def test_peft_files_roundtrip_exact_and_standard_names():
    t = _small_target()
    a = _random_adapter(t)
    files = a.to_peft_files()
    assert set(files) == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    config = json.loads(files[ADAPTER_CONFIG])
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4
    assert config["base_model_name_or_path"] == "tiny" and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    from safetensors.torch import load

    tensors = load(files[ADAPTER_WEIGHTS])
    assert tensors["base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"].shape == (4, 2)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 6)
    b = LoRAAdapter.from_peft_files(files)
    assert b.target == t
    for m in t.modules:
        assert torch.equal(a.A[m], b.A[m]) and torch.equal(a.B[m], b.B[m])
    # The same bytes every time (content addressing in the store relies on it).
    assert a.to_peft_files() == files


def test_save_and_load_folder(tmp_path):
    a = _random_adapter(_small_target(), seed=3)
    out = a.save_peft(tmp_path / "ad", base_model_name_or_path="/models/x")
    assert json.loads((out / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "/models/x"
    b = LoRAAdapter.load_peft(out)
    assert torch.equal(a.delta("v_proj", 1), b.delta("v_proj", 1))
    assert b.target.base_model == "/models/x"


def test_delta_and_cosine_match_explicit_products():
    a, b = _random_adapter(_small_target(), 1), _random_adapter(_small_target(), 2)
    dw = a.delta("q_proj", 2)
    assert torch.allclose(dw, a.target.scaling * a.B["q_proj"][2] @ a.A["q_proj"][2])
    cos = a.cosine_to(b)
    explicit = torch.nn.functional.cosine_similarity(dw.flatten(), b.delta("q_proj", 2).flatten(), dim=0)
    assert cos.shape == (6,) and torch.allclose(cos[2], explicit, atol=1e-5)
    assert torch.allclose(a.cosine_to(a), torch.ones(6))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f.update({ADAPTER_CONFIG: b"{not json"}), "valid JSON"),
        (lambda f: f.update({ADAPTER_WEIGHTS: b"garbage"}), "safetensors"),
        (lambda f: f.pop(ADAPTER_WEIGHTS), "needs"),
        (lambda f: f.update({ADAPTER_CONFIG: json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True}).encode()}), "DoRA|use_dora"),
        (lambda f: f.update({ADAPTER_CONFIG: json.dumps({"peft_type": "LORA", "r": 3, "lora_alpha": 4}).encode()}), "rank"),
        (lambda f: f.update({ADAPTER_CONFIG: b"[1, 2]"}), "not a JSON object"),
        (lambda f: f.update({ADAPTER_CONFIG: json.dumps({"peft_type": "LORA", "r": 2}).encode()}), "'lora_alpha'"),
        (lambda f: f.update({ADAPTER_CONFIG: json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": None}).encode()}),
         "'lora_alpha'"),
        (lambda f: f.update({ADAPTER_CONFIG: json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": "NaN"}).encode()}),
         "alpha"),
    ],
)
def test_bad_peft_files_raise_clear_errors(mutate, message):
    files = _random_adapter(_small_target()).to_peft_files()
    mutate(files)
    with pytest.raises(ValueError, match=message):
        LoRAAdapter.from_peft_files(files)


def test_a_layer_of_another_shape_is_rejected():
    from safetensors.torch import load, save

    files = _random_adapter(_small_target()).to_peft_files()
    tensors = load(files[ADAPTER_WEIGHTS])
    tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"] = torch.randn(2, 5)
    files[ADAPTER_WEIGHTS] = save(tensors)
    with pytest.raises(ValueError, match="one 2-D shape in every layer"):
        LoRAAdapter.from_peft_files(files)


def test_missing_layer_is_rejected():
    from safetensors.torch import load, save

    files = _random_adapter(_small_target()).to_peft_files()
    tensors = load(files[ADAPTER_WEIGHTS])
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    files[ADAPTER_WEIGHTS] = save(tensors)
    with pytest.raises(ValueError, match="every layer"):
        LoRAAdapter.from_peft_files(files)


def test_library_roundtrip_and_validation(tmp_path):
    lib = make_synthetic_library(tmp_path / "lib", target=_small_target(), num_tasks=5, descriptions_per_task=3, seed=1)
    tasks = load_library(lib)
    assert [t.name for t in tasks] == [f"task_{i:03d}" for i in range(5)]
    assert all(len(t.descriptions) == 3 for t in tasks)
    assert len({t.descriptions[0] for t in tasks}) == 5  # every task has its own descriptions
    # Synthetic tasks are distinct adapters.
    assert tasks[0].adapter.cosine_to(tasks[1].adapter).mean() < 0.95
    with pytest.raises(ValueError, match="non-empty"):
        save_task(lib, "bad", tasks[0].adapter, [])
    with pytest.raises(ValueError, match="task name"):
        save_task(lib, "../escape", tasks[0].adapter, ["x"])
    (lib / "task_001" / "descriptions.json").write_text('"just a string"')
    with pytest.raises(ValueError, match="JSON list"):
        load_library(lib)


def test_library_rejects_mismatched_target(tmp_path):
    lib = make_synthetic_library(tmp_path / "lib", target=_small_target(), num_tasks=2, seed=0)
    other = TargetSpec.from_dict({**_small_target().to_dict(), "rank": 4})
    with pytest.raises(ValueError, match="does not match"):
        load_library(lib, target=other)
    # the same names and shapes under another model's layout: not the same locations
    moved = TargetSpec.from_dict({**_small_target().to_dict(), "module_paths": {
        "q_proj": "transformer.h.{layer}.attn.q_proj", "v_proj": "transformer.h.{layer}.attn.v_proj"}})
    with pytest.raises(ValueError, match="another model layout"):
        _random_adapter(_small_target()).reorder(moved)


def test_safetensors_bytes_hold_the_state_dict():
    """The weights file written straight from the stacked factors loads (safetensors validates the
    header, offsets and coverage) to exactly the tensors of state_dict()."""
    from safetensors.torch import load

    target = TargetSpec.smollm2()
    g = torch.Generator().manual_seed(0)
    A = {m: torch.randn(target.num_layers, target.rank, target.shapes[m][0], generator=g) for m in target.modules}
    B = {m: torch.randn(target.num_layers, target.shapes[m][1], target.rank, generator=g) for m in target.modules}
    adapter = LoRAAdapter(target, A, B)
    raw = adapter.safetensors_bytes()
    got, want = load(raw), adapter.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert int.from_bytes(raw[:8], "little") % 8 == 0  # header padded to 8 bytes


def test_files_made_once_per_target_describe_each_adapter_of_it():
    """The header and config are cached per target: equal targets share them (equal and
    equally hashed), a target that differs only in its base model or its shapes gets its own,
    and factors of other shapes than the target's never reach a header (refused when the adapter
    is made)."""
    from safetensors.torch import load

    t = _small_target()
    same = TargetSpec.from_dict(json.loads(json.dumps(t.to_dict())))
    assert same == t and hash(same) == hash(t) and same is not t
    a, b = _random_adapter(t, 0), _random_adapter(same, 1)
    fa, fb = a.to_peft_files(), b.to_peft_files()
    assert fa[ADAPTER_CONFIG] == fb[ADAPTER_CONFIG] and fa[ADAPTER_WEIGHTS] != fb[ADAPTER_WEIGHTS]
    for adapter, files in ((a, fa), (b, fb)):
        got, want = load(files[ADAPTER_WEIGHTS]), adapter.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    renamed = TargetSpec.from_dict({**t.to_dict(), "base_model": "other-model"})
    assert hash(renamed) != hash(t)
    assert json.loads(_random_adapter(renamed).to_peft_files()[ADAPTER_CONFIG])["base_model_name_or_path"] == "other-model"
    assert json.loads(a.to_peft_files("served-name")[ADAPTER_CONFIG])["base_model_name_or_path"] == "served-name"
    wider = TargetSpec.from_dict({**t.to_dict(), "shapes": {"q_proj": (6, 6), "v_proj": (6, 5)}})
    w = _random_adapter(wider)
    assert load(w.safetensors_bytes())["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (5, 2)
    with pytest.raises(ValueError, match=r"B\[v_proj\] has shape \(3, 5, 2\), want \(3, 4, 2\)"):
        LoRAAdapter(t, a.A, {**a.B, "v_proj": w.B["v_proj"]})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines that cannot pin memory")
def test_unpinnable_memory_falls_back_to_pageable_copies(caplog):
    """Where page-locked memory cannot be had (here: no accelerator), the pinned copy declines
    with a warning and `unstack_adapters` copies as before (its GPU path: tests/test_graphs.py)."""
    from generator.adapter import _to_pinned_host

    with caplog.at_level("WARNING", logger="generator.adapter"):
        assert _to_pinned_host([torch.ones(2, 3)]) is None
    assert "page-locked memory unavailable" in caplog.text
