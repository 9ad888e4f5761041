"""A LoRA adapter as factor tensors, and its standard PEFT folder form.

For each location (module m, layer l) an adapter holds A (r, d_in) and B (d_out, r); the weight
update is dW = (alpha / r) * B @ A (PEFT's convention). Factors are stacked per module:
`A[m]: (L, r, d_in)`, `B[m]: (L, d_out, r)`.

The PEFT folder is `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` (r, d_in) and `...lora_B.weight` (d_out, r), which
peft and vLLM load. `to_peft_files()` returns the folder as bytes (what crosses process
boundaries); only `json` and `safetensors` are needed, not peft.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from safetensors.torch import load as st_load

from .config import TargetSpec

__all__ = [
    "TargetSpec", "LoRAAdapter", "AdapterFiles", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS",
    "write_peft_files", "stack_adapters", "unstack_adapters",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
AdapterFiles = dict[str, bytes]

logger = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_LAYER_RE = re.compile(r"^(?P<pre>.*\.)(?P<layer>\d+)(?P<post>\..*)$")


@dataclass
class LoRAAdapter:
    """LoRA factors for every location of a `TargetSpec`."""

    target: TargetSpec
    A: dict[str, torch.Tensor]  # module -> (L, r, d_in)
    B: dict[str, torch.Tensor]  # module -> (L, d_out, r)

    def __post_init__(self) -> None:
        t = self.target
        for m in t.modules:
            d_in, d_out = t.shapes[m]
            if m not in self.A or m not in self.B:
                raise ValueError(f"adapter lacks factors for module {m!r}")
            if tuple(self.A[m].shape) != (t.num_layers, t.rank, d_in):
                raise ValueError(f"A[{m}] has shape {tuple(self.A[m].shape)}, want {(t.num_layers, t.rank, d_in)}")
            if tuple(self.B[m].shape) != (t.num_layers, d_out, t.rank):
                raise ValueError(f"B[{m}] has shape {tuple(self.B[m].shape)}, want {(t.num_layers, d_out, t.rank)}")

    # ------------------------------------------------------------------------------------------
    # Weight space

    def delta(self, module: str, layer: int) -> torch.Tensor:
        """dW = scaling * B @ A for one location, (d_out, d_in)."""
        return self.target.scaling * (self.B[module][layer] @ self.A[module][layer])

    def cosine_to(self, other: "LoRAAdapter") -> torch.Tensor:
        """Cosine similarity of dW to `other`'s dW at every location, (num_locations,), module-major.

        Computed from the factors (see `losses.frobenius_inner`), never materialising dW.
        """
        from .models.losses import delta_cosine

        if other.target.modules != self.target.modules or other.target.num_layers != self.target.num_layers:
            raise ValueError("adapters target different locations")
        return torch.cat(
            [
                delta_cosine(self.A[m].double(), self.B[m].double(), other.A[m].double(), other.B[m].double())
                for m in self.target.modules
            ]
        ).float()

    def to(self, dtype: torch.dtype) -> "LoRAAdapter":
        return LoRAAdapter(
            self.target,
            {m: a.to(dtype) for m, a in self.A.items()},
            {m: b.to(dtype) for m, b in self.B.items()},
        )

    # ------------------------------------------------------------------------------------------
    # PEFT form

    def peft_config(self, base_model_name_or_path: str | None = None) -> dict:
        """The `adapter_config.json` content (a standard peft LoraConfig for a causal LM)."""
        return peft_config(self.target, base_model_name_or_path)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT tensor names -> contiguous float32 tensors."""
        out: dict[str, torch.Tensor] = {}
        for m in self.target.modules:
            a = self.A[m].detach().to("cpu", torch.float32)
            b = self.B[m].detach().to("cpu", torch.float32)
            for l in range(self.target.num_layers):
                prefix = f"base_model.model.{self.target.path(m, l)}"
                out[f"{prefix}.lora_A.weight"] = a[l].contiguous()
                out[f"{prefix}.lora_B.weight"] = b[l].contiguous()
        return out

    def to_peft_files(self, base_model_name_or_path: str | None = None) -> AdapterFiles:
        """The PEFT folder as {file name: bytes}."""
        return {ADAPTER_CONFIG: _peft_config_bytes(self.target, base_model_name_or_path),
                ADAPTER_WEIGHTS: self.safetensors_bytes()}

    def safetensors_bytes(self) -> bytes:
        """`adapter_model.safetensors` written straight from the stacked factors.

        The same tensors as `safetensors.torch.save(self.state_dict())`, but each module's
        stacked A (L, r, d_in) and B (L, d_out, r) goes into the file's data section whole (its
        layers are consecutive there, as in memory) instead of as 2L small tensors, and every
        byte is copied once: `bytes.join` writes the header and the factors' own buffers straight
        into the result (a zeroed bytearray filled and then copied to `bytes` took 2.5-3x as long,
        `benchmarks/results/serialise_cpu.md`). The header is the same for every adapter of a
        target, so it is made once per target (`_safetensors_head`; building it took as long as
        copying the data).
        """
        head, size = _safetensors_head(self.target)
        parts: list[bytes | np.ndarray] = [head]
        for m in self.target.modules:  # the factors have the target's shapes (checked in __post_init__)
            for x in (self.A[m], self.B[m]):
                parts.append(x.detach().to("cpu", torch.float32).contiguous().view(-1).view(torch.uint8).numpy())
        out = b"".join(parts)
        assert len(out) == len(head) + size
        return out

    def save_peft(self, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
        """Write the PEFT folder (files written atomically, each via a temporary + rename)."""
        return write_peft_files(self.to_peft_files(base_model_name_or_path), out_dir)

    @classmethod
    def from_peft_files(cls, files: Mapping[str, bytes]) -> "LoRAAdapter":
        """Parse a PEFT folder given as bytes; raises ValueError on anything unsupported."""
        if ADAPTER_CONFIG not in files or ADAPTER_WEIGHTS not in files:
            raise ValueError(f"a PEFT adapter needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
        try:
            config = json.loads(files[ADAPTER_CONFIG])
        except ValueError as e:
            raise ValueError(f"{ADAPTER_CONFIG} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{ADAPTER_CONFIG} is not a JSON object")
        if config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"not a LoRA adapter: peft_type={config.get('peft_type')!r}")
        if config.get("use_dora"):
            raise ValueError("unsupported LoRA variant: use_dora")
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise ValueError("per-module rank/alpha patterns are not supported")
        try:
            rank, alpha = int(config["r"]), float(config["lora_alpha"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{ADAPTER_CONFIG} needs integer 'r' and numeric 'lora_alpha' ({e!r})") from None
        if config.get("use_rslora"):
            alpha = alpha * math.sqrt(rank)  # rsLoRA scaling alpha/sqrt(r) == (alpha*sqrt(r))/r
        try:
            tensors = st_load(bytes(files[ADAPTER_WEIGHTS]))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{ADAPTER_WEIGHTS} is not a valid safetensors file: {e}") from None

        # path template -> {layer: {"A"/"B": tensor}}
        found: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for key, tensor in tensors.items():
            km = _KEY_RE.match(key)
            if km is None:
                raise ValueError(f"unexpected tensor in adapter: {key!r}")
            lm = _LAYER_RE.match(km.group("path"))
            if lm is None:
                raise ValueError(f"adapter module {km.group('path')!r} is not inside a numbered layer")
            template = f"{lm.group('pre')}{{layer}}{lm.group('post')}"
            found.setdefault(template, {}).setdefault(int(lm.group("layer")), {})[km.group("ab")] = tensor
        if not found:
            raise ValueError("adapter has no LoRA tensors")

        modules, shapes, paths, A, B = [], {}, {}, {}, {}
        num_layers = None
        for template in sorted(found):
            module = template.rsplit(".", 1)[-1]
            if module in paths:
                raise ValueError(f"module name {module!r} occurs under two paths")
            layers = found[template]
            n = max(layers) + 1
            if sorted(layers) != list(range(n)) or any(set(v) != {"A", "B"} for v in layers.values()):
                raise ValueError(f"module {module!r} does not have A and B in every layer 0..{n - 1}")
            if num_layers is not None and n != num_layers:
                raise ValueError("modules cover different numbers of layers")
            num_layers = n
            for ab in ("A", "B"):
                shapes_ab = {tuple(layers[l][ab].shape) for l in range(n)}
                if len(shapes_ab) != 1 or len(next(iter(shapes_ab))) != 2:
                    raise ValueError(f"module {module!r}: lora_{ab} must be one 2-D shape in every layer, "
                                     f"got {sorted(shapes_ab)}")
            a = torch.stack([layers[l]["A"].float() for l in range(n)])  # (L, r, d_in)
            b = torch.stack([layers[l]["B"].float() for l in range(n)])  # (L, d_out, r)
            if a.shape[1] != rank or b.shape[2] != rank:
                raise ValueError(f"module {module!r} has rank {a.shape[1]}, config says r={rank}")
            modules.append(module)
            shapes[module] = (int(a.shape[2]), int(b.shape[1]))
            paths[module] = template
            A[module], B[module] = a, b
        target = TargetSpec(
            base_model=str(config.get("base_model_name_or_path") or ""),
            modules=tuple(modules),
            num_layers=int(num_layers or 0),
            rank=rank,
            alpha=alpha,
            shapes=shapes,
            module_paths=paths,
        )
        return cls(target, A, B)

    @classmethod
    def load_peft(cls, path: str | Path) -> "LoRAAdapter":
        """Read a PEFT adapter folder."""
        path = Path(path)
        files = {}
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found")
            files[name] = (path / name).read_bytes()
        return cls.from_peft_files(files)

    def reorder(self, target: TargetSpec) -> "LoRAAdapter":
        """The same adapter described by `target` (same locations, possibly another module order)."""
        if set(target.modules) != set(self.target.modules) or target.num_layers != self.target.num_layers:
            raise ValueError("targets cover different locations")
        if target.rank != self.target.rank:
            raise ValueError(f"rank {self.target.rank} != target rank {target.rank}")
        for m in target.modules:
            if target.shapes[m] != self.target.shapes[m]:
                raise ValueError(f"module {m!r}: shape {self.target.shapes[m]} != target {target.shapes[m]}")
            if target.module_paths[m] != self.target.module_paths[m]:
                raise ValueError(f"module {m!r}: path {self.target.module_paths[m]!r} != target "
                                 f"{target.module_paths[m]!r} (an adapter of another model layout)")
        # Fold any alpha difference into B so dW is unchanged.
        k = self.target.scaling / target.scaling
        return LoRAAdapter(target, {m: self.A[m] for m in target.modules}, {m: self.B[m] * k for m in target.modules})


@functools.lru_cache(maxsize=16)
def _safetensors_head(target: TargetSpec) -> tuple[bytes, int]:
    """(u64 little-endian header size + JSON header padded with spaces to 8 bytes, data size) of
    every adapter of `target`: names -> dtype F32, shape, byte offsets, layers consecutive per
    module and factor, modules in the target's order, A before B."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for m in target.modules:
        d_in, d_out = target.shapes[m]
        for ab, shape in (("A", [target.rank, d_in]), ("B", [d_out, target.rank])):
            per_layer = shape[0] * shape[1] * 4
            for l in range(target.num_layers):
                name = f"base_model.model.{target.path(m, l)}.lora_{ab}.weight"
                header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + per_layer]}
                offset += per_layer
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % 8)
    return len(head).to_bytes(8, "little") + head, offset


def peft_config(t: TargetSpec, base_model_name_or_path: str | None = None) -> dict:
    """The `adapter_config.json` content of adapters of target `t` (a standard peft LoraConfig for a causal LM)."""
    alpha: int | float = int(t.alpha) if float(t.alpha).is_integer() else float(t.alpha)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or t.base_model,
        "r": t.rank,
        "lora_alpha": alpha,
        "target_modules": sorted(t.modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


@functools.lru_cache(maxsize=16)
def _peft_config_bytes(target: TargetSpec, base_model_name_or_path: str | None) -> bytes:
    """`adapter_config.json` of every adapter of `target`, as bytes (made once per target and name)."""
    return json.dumps(peft_config(target, base_model_name_or_path), indent=2, sort_keys=True).encode()


def write_peft_files(files: Mapping[str, bytes], out_dir: str | Path) -> Path:
    """Write {name: bytes} into `out_dir`, each file atomically (temporary file + rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad adapter file name {name!r}")
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out / name)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return out


def stack_adapters(adapters: list[LoRAAdapter]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Stack adapters of one target: A[m] (N, L, r, d_in), B[m] (N, L, d_out, r)."""
    if not adapters:
        raise ValueError("no adapters to stack")
    target = adapters[0].target
    A = {m: torch.stack([a.A[m].float() for a in adapters]) for m in target.modules}
    B = {m: torch.stack([a.B[m].float() for a in adapters]) for m in target.modules}
    return A, B


def factor_stats(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Library statistics of one stacked factor, X: (T, L, ...) -> mean (L, ...), std (L,).

    The mean is per element over the T tasks (zero for a single task, whose factor is then its
    own residual); the std is one scalar per layer, of the residuals from that mean (>= 1e-8).
    Both generators standardise their factors with these (`FactorStandardizer`, the LAE).
    """
    mean = X.mean(0) if X.shape[0] > 1 else torch.zeros_like(X[0])
    return mean, (X - mean).flatten(2).std(dim=(0, 2)).clamp_min(1e-8)


def _to_pinned_host(tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """float32 copies of CUDA `tensors` in one page-locked buffer (None where memory cannot be
    pinned: the caller copies to pageable memory instead)."""
    try:
        flat = torch.empty(sum(x.numel() for x in tensors), dtype=torch.float32, pin_memory=True)
    except RuntimeError as e:
        logger.warning("page-locked memory unavailable (%s): factors cross to the CPU unpinned", e)
        return None
    host, offset = [], 0
    for x in tensors:
        view = flat[offset:offset + x.numel()].view(x.shape)
        view.copy_(x.detach(), non_blocking=True)
        host.append(view)
        offset += x.numel()
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return host


def unstack_adapters(
    target: TargetSpec, A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor]
) -> list[LoRAAdapter]:
    """Inverse of `stack_adapters` (detached, contiguous, float32, on CPU).

    Each module's factors cross to the CPU in one copy for the whole batch; the adapters are
    views of those copies. From a GPU the copies land in one page-locked buffer: into pageable
    memory they ran at ~1.3 GB/s on an H100 host (45 ms of a batch of 32's 75 ms,
    `benchmarks/results/generation_latency_cuda_h100.json`). The buffer comes from torch's
    caching host allocator, so once the adapters are serialised and dropped (as the serving
    backends do) the next batch reuses it.
    """
    n = next(iter(A.values())).shape[0]
    src = [A[m] for m in target.modules] + [B[m] for m in target.modules]
    host = _to_pinned_host(src) if src[0].is_cuda else None
    if host is None:
        host = [x.detach().to("cpu", torch.float32).contiguous() for x in src]
    k = len(target.modules)
    A_cpu, B_cpu = dict(zip(target.modules, host[:k])), dict(zip(target.modules, host[k:]))
    return [LoRAAdapter(target, {m: A_cpu[m][i] for m in target.modules}, {m: B_cpu[m][i] for m in target.modules})
            for i in range(n)]
