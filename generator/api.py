"""Public API: a trained generator loaded from its checkpoint folder, turning descriptions into adapters.

Checkpoint folder:
    config.json         kind, target, model configs, encoder, sampler settings, fingerprint
    model.safetensors   all weights and buffers of the generator (float32)

The fingerprint is a sha256 over the canonical JSON config (without the fingerprint) and every
tensor's name, dtype, shape and bytes; it changes when the weights change, and `load` checks it.

Determinism: the diffusion noise of each description comes from its own `torch.Generator`, seeded
by sha256(seed, description) and drawn on the CPU, so a description's adapter does not depend on
what else is in the batch (up to float rounding of batched matmuls) nor on the device's RNG.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save

from .adapter import LoRAAdapter, unstack_adapters, write_peft_files
from .config import SamplerConfig, TargetSpec
from .encoder import ENCODER_DIM, ENCODER_NAME, DescriptionEncoder, check_descriptions
from .models import KINDS, build_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1

_encoders: dict[str, DescriptionEncoder] = {}
_encoders_lock = threading.Lock()


def shared_encoder(device: str | torch.device = "cpu") -> DescriptionEncoder:
    """One DescriptionEncoder per device and process (it is ~90 MB)."""
    key = str(torch.device(device))
    with _encoders_lock:
        if key not in _encoders:
            _encoders[key] = DescriptionEncoder(device=key)
        return _encoders[key]


def noise_seed(seed: int, description: str) -> int:
    """64-bit (non-negative, < 2**63) seed of one description's noise: sha256(seed, description)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{description}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def compute_fingerprint(config: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    """sha256 over the config (fingerprint field excluded) and all tensors, hex."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in config.items() if k != "fingerprint"}, sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"\x00{name}\x00{t.dtype}\x00{tuple(t.shape)}\x00".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def mean_of_samples(
    A: dict[str, torch.Tensor], B: dict[str, torch.Tensor], k: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Factors of k samples per description, rows grouped by description (A[m] (N*k, L, r, d_in),
    B[m] (N*k, L, d_out, r)) -> rank-r factors of each description's mean dW = mean_j B_j A_j,
    its best rank-r approximation (Eckart-Young): the mean is [B_1 .. B_k] / k @ [A_1; ..; A_k], so
    QR of both stacked factors and an SVD of the (k*r, k*r) core give it without forming dW."""
    mA, mB = {}, {}
    for m in A:
        n, layers, r, d_in = A[m].shape[0] // k, A[m].shape[1], A[m].shape[2], A[m].shape[3]
        d_out = B[m].shape[2]
        a = A[m].float().reshape(n, k, layers, r, d_in).permute(0, 2, 1, 3, 4).reshape(n, layers, k * r, d_in)
        b = B[m].float().reshape(n, k, layers, d_out, r).permute(0, 2, 3, 1, 4).reshape(n, layers, d_out, k * r) / k
        qb, rb = torch.linalg.qr(b)                    # (n, L, d_out, kr), (n, L, kr, kr)
        qa, ra = torch.linalg.qr(a.transpose(-1, -2))  # (n, L, d_in, kr), (n, L, kr, kr)
        u, sv, vh = torch.linalg.svd(rb @ ra.transpose(-1, -2))  # dW = qb (u sv vh) qa^T
        root = sv[..., :r].sqrt()
        mB[m] = (qb @ u[..., :r] * root.unsqueeze(-2)).to(B[m].dtype)                  # (n, L, d_out, r)
        mA[m] = (root.unsqueeze(-1) * vh[..., :r, :] @ qa.transpose(-1, -2)).to(A[m].dtype)  # (n, L, r, d_in)
    return mA, mB


def check_guidance(guidance: Any) -> None:
    """A clear error for a guidance scale that would make NaN adapters (None: the checkpoint's,
    checked when it loaded). The number of steps is checked by the sampler itself."""
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance)):
        raise ValueError(f"sampler guidance must be a finite number, got {guidance!r}")


class Generator:
    """A trained generator (LoRAGen or T2L) on one device."""

    def __init__(
        self,
        kind: str,
        target: TargetSpec,
        model: torch.nn.Module,
        configs: dict[str, Any],
        sampler: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        extra: dict[str, Any] | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        if kind not in KINDS or getattr(model, "kind", None) != kind:
            raise ValueError(f"generator kind {kind!r} does not match its model ({type(model).__name__})")
        self.kind = kind
        self.target = target
        self.configs = configs
        self.sampler = {**SamplerConfig().to_dict(), **(sampler or {})}
        samples = self.sampler["samples"]
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"sampler samples must be an int >= 1, got {samples!r}")
        check_guidance(self.sampler["guidance"])
        if self.sampler["samples"] == 1:  # the default is not recorded (older fingerprints stay)
            del self.sampler["samples"]
        self.extra = dict(extra or {})
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self._encoder: DescriptionEncoder | None = None
        self.fingerprint = compute_fingerprint(self.config_dict(include_fingerprint=False), self.model.state_dict())
        self.cuda_graphs = cuda_graphs
        if self.device.type == "cuda" and hasattr(self.model, "use_cuda_graphs"):
            self.model.use_cuda_graphs(cuda_graphs)  # same adapters as eager up to float rounding

    # ------------------------------------------------------------------------------------------
    # Checkpoint

    def config_dict(self, include_fingerprint: bool = True) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "base_model": self.target.base_model,
            "target": self.target.to_dict(),
            "configs": self.configs,
            "encoder": {"name": ENCODER_NAME, "dim": ENCODER_DIM},
            "sampler": self.sampler,
            **({"extra": self.extra} if self.extra else {}),
        }
        if include_fingerprint:
            cfg["fingerprint"] = self.fingerprint
        return cfg

    def save(self, ckpt_dir: str | Path) -> Path:
        """Write config.json + model.safetensors (each file atomically)."""
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        files = {
            WEIGHTS_FILE: save(state, metadata={"format": "pt", "fingerprint": self.fingerprint}),
            CONFIG_FILE: json.dumps(self.config_dict(), indent=2, sort_keys=True).encode(),
        }
        return write_peft_files(files, ckpt_dir)  # weights first, config last: config marks completion

    @classmethod
    def load(cls, ckpt_dir: str | Path, device: str | torch.device = "cpu", cuda_graphs: bool = True) -> "Generator":
        """Load a checkpoint folder; raises FileNotFoundError / ValueError if it is missing or corrupt.

        On a CUDA device, LoRAGen generates through CUDA graphs unless `cuda_graphs=False`.
        """
        ckpt = Path(ckpt_dir)
        cfg_path, w_path = ckpt / CONFIG_FILE, ckpt / WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise FileNotFoundError(f"{ckpt} is not a generator checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
        got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
        if got != FORMAT_VERSION:
            raise ValueError(f"{ckpt}: unsupported checkpoint format {got!r}")
        try:
            target = TargetSpec.from_dict(cfg["target"])
            model = build_model(cfg["kind"], target, cfg["configs"])
            for part in ("sampler", "extra"):
                if not isinstance(cfg.get(part) or {}, dict):
                    raise TypeError(f"{part!r} must be an object")
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            raise ValueError(f"{cfg_path}: incomplete generator config ({type(e).__name__}: {e})") from None
        try:
            state = load_file(str(w_path))
        except Exception as e:
            raise ValueError(f"{w_path} is not a valid safetensors file: {e}") from None
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{w_path} does not hold the weights its config describes: {e}") from None
        gen = cls(cfg["kind"], target, model, cfg["configs"], cfg.get("sampler"), device, cfg.get("extra"), cuda_graphs)
        if cfg.get("fingerprint") != gen.fingerprint:
            raise ValueError(f"{ckpt}: fingerprint mismatch (corrupt or edited checkpoint)")
        return gen

    def with_sampler(self, **sampler: Any) -> "Generator":
        """The same weights with other sampler defaults (`steps`, `guidance`, `samples`): a new fingerprint.

        Both generators share the model (and its CUDA graphs, if on).
        """
        unknown = set(sampler) - set(SamplerConfig().to_dict())
        if unknown:
            raise ValueError(f"unknown sampler settings {sorted(unknown)}")
        return Generator(self.kind, self.target, self.model, self.configs, {**self.sampler, **sampler}, self.device,
                         self.extra, self.cuda_graphs)

    def warm_up(self) -> None:
        """Pay one-time costs before the first request: the description encoder's load and, on a
        GPU, the CUDA-graph capture of every batch-size bucket at this checkpoint's sampler and of
        the description encoder's common shapes."""
        self.generate(["Warm up the generator."], seed=0)
        self.encoder.warm_up()
        if hasattr(self.model, "warm_up"):
            self.model.warm_up(int(self.sampler["steps"]), float(self.sampler["guidance"]))

    # ------------------------------------------------------------------------------------------
    # Generation

    @property
    def encoder(self) -> DescriptionEncoder:
        """The description encoder: the process's shared one for this device unless one was set."""
        if self._encoder is None:
            self._encoder = shared_encoder(self.device)
        return self._encoder

    @encoder.setter
    def encoder(self, encoder: DescriptionEncoder) -> None:
        self._encoder = encoder

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @torch.inference_mode()
    def generate_factors(
        self,
        cond: torch.Tensor,
        descriptions: Sequence[str],
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        timings: dict[str, float] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Embeddings (N, 384) -> stacked factors A[m] (N, L, r, d_in), B[m] (N, L, d_out, r) on the device."""
        timings = timings if timings is not None else {}
        cond = cond.to(self.device)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        last = [time.perf_counter()]

        def mark(stage: str) -> None:
            sync()
            now = time.perf_counter()
            timings[stage] = now - last[0]
            last[0] = now

        check_guidance(guidance)
        k = self.sampler.get("samples", 1) if self.kind == "loragen" else 1  # T2L draws no noise
        if k > 1:  # k noises per description, the first the one a single sample uses: (N*k, d_cond)
            cond = cond.repeat_interleave(k, dim=0)
        gens = [torch.Generator().manual_seed(noise_seed(seed, d if j == 0 else f"{d}\x00sample {j}"))
                for d in descriptions for j in range(k)]
        A, B = self.model.generate_factors(
            cond, gens,
            steps=int(self.sampler["steps"] if steps is None else steps),
            guidance=float(self.sampler["guidance"] if guidance is None else guidance),
            mark=mark,
        )
        if k > 1:
            A, B = mean_of_samples(A, B, k)
            sync()
            timings["decode"] = timings.get("decode", 0.0) + (time.perf_counter() - last[0])
        return A, B

    def generate_timed(
        self, descriptions: Sequence[str], seed: int = 0, steps: int | None = None, guidance: float | None = None
    ) -> tuple[list[LoRAAdapter], dict[str, float]]:
        """Adapters for `descriptions` plus seconds spent: {"encode", "diffuse", "decode"}."""
        descriptions = check_descriptions(descriptions, caller="generate", allow_empty=False)
        if not descriptions:
            return [], {"encode": 0.0, "diffuse": 0.0, "decode": 0.0}
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        cond = self.encoder.encode(descriptions)
        timings["encode"] = time.perf_counter() - t0
        A, B = self.generate_factors(cond, descriptions, seed, steps, guidance, timings)
        t0 = time.perf_counter()
        adapters = unstack_adapters(self.target, A, B)
        timings["decode"] += time.perf_counter() - t0
        return adapters, timings

    def generate(
        self, descriptions: Sequence[str], seed: int = 0, steps: int | None = None, guidance: float | None = None
    ) -> list[LoRAAdapter]:
        """One adapter per description (same order). Same description + seed + checkpoint -> same adapter."""
        return self.generate_timed(descriptions, seed, steps, guidance)[0]


load_generator = Generator.load
