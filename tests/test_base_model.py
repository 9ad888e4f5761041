"""The converted base model: a plain bf16 safetensors folder with the end-of-turn fix."""

from __future__ import annotations

import json
import time

import pytest

from generator.base_model import BOS_ID, EOS_ID, PAD_ID, is_converted, ensure_base_model


def test_converted_folder_is_plain_bf16_with_eos_fix(base_model_dir):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    config = json.loads((base_model_dir / "config.json").read_text())
    gen = json.loads((base_model_dir / "generation_config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    for cfg in (config, gen):
        assert (cfg["eos_token_id"], cfg["pad_token_id"], cfg["bos_token_id"]) == (EOS_ID, PAD_ID, BOS_ID)
    tok = AutoTokenizer.from_pretrained(base_model_dir)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", EOS_ID)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", PAD_ID)
    # The chat template ends an assistant turn with the eos token.
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False)
    assert text.rstrip().endswith(tok.eos_token)
    with safe_open(str(base_model_dir / "model.safetensors"), "pt") as f:
        t = f.get_tensor("model.layers.0.self_attn.v_proj.weight")
    assert str(t.dtype) == "torch.bfloat16" and tuple(t.shape) == (192, 576)


def test_ensure_is_idempotent_and_fast_when_cached(base_model_dir):
    t0 = time.perf_counter()
    again = ensure_base_model()
    assert again == base_model_dir and is_converted(again)
    assert time.perf_counter() - t0 < 1.0


def test_folder_without_marker_is_not_complete(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not is_converted(tmp_path)
    (tmp_path / ".loragen-converted").write_text('{"version": -1}')
    assert not is_converted(tmp_path)


def test_a_conversion_held_elsewhere_is_waited_for_with_a_deadline(tmp_path):
    """A process stuck converting holds the lock: another waits at most wait_s, then says so."""
    import subprocess
    import sys

    from generator.base_model import MODEL_NAME

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from filelock import FileLock; "
        f"l = FileLock({str(tmp_path / (MODEL_NAME + '.lock'))!r}); l.acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="converting the base model"):
            ensure_base_model(tmp_path, wait_s=0.5)
        assert time.monotonic() - t0 < 5
    finally:
        holder.kill()
        holder.wait()
