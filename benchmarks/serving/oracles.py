"""Oracle adapters: task-specific LoRAs trained the ordinary way, the yardstick for generated ones.

From `--oracle-library DIR` (PEFT folders, one per task, as the Super-NaturalInstructions
work writes them) where given; where the library is missing or holds fewer adapters than the
run needs, random adapters of the same shape are written to a scratch folder instead, and
the results say how many of each were used. For latency only the shape matters (rank,
target modules, dtype); the weights' values do not change the work vLLM does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Oracle:
    """One oracle adapter folder and the name the benchmark serves it under."""

    name: str
    path: str
    random: bool


def library_adapters(library: Path) -> list[Path]:
    """Adapter folders (those holding adapter_config.json) under `library`, sorted by path."""
    return sorted(p.parent.resolve() for p in Path(library).rglob(ADAPTER_CONFIG))  # vLLM wants absolute paths


def adapter_shape(path: Path) -> dict:
    """Rank, alpha and target modules from a PEFT adapter_config.json."""
    cfg = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    modules = cfg.get("target_modules")
    return {"r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
            "target_modules": sorted(modules) if isinstance(modules, list) else modules}


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80] or "adapter"


def write_random_adapters(out_dir: Path, n: int, like: Path | None, generator_ckpt: Path | None,
                          base_model: str | None, seed: int, modules: Sequence[str] | None = None) -> list[Path]:
    """Write `n` random PEFT adapters of the oracle shape into `out_dir`.

    The shape is that of the adapter folder `like` (a library adapter) if given, else the
    generator checkpoint's target, else the project's default (SmolLM2, r=8 on ``modules``,
    default q_proj, v_proj).
    A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) as in LoRA's initialisation, B ~ N(0, 0.02^2), so the
    adapter changes the model a little, as a trained one does.
    """
    import torch

    from generator import LoRAAdapter, TargetSpec

    if like is not None:
        target = LoRAAdapter.load_peft(like).target
    elif generator_ckpt is not None:
        target = TargetSpec.from_dict(json.loads((Path(generator_ckpt) / "config.json").read_text())["target"])
    else:
        target = TargetSpec.smollm2(modules=tuple(modules or ("q_proj", "v_proj")))
    g = torch.Generator().manual_seed(seed)
    out: list[Path] = []
    for i in range(n):
        A, B = {}, {}
        for m in target.modules:
            d_in, d_out = target.shapes[m]
            bound = d_in ** -0.5
            A[m] = (torch.rand(target.num_layers, target.rank, d_in, generator=g) * 2 - 1) * bound
            B[m] = torch.randn(target.num_layers, d_out, target.rank, generator=g) * 0.02
        path = Path(out_dir) / f"random-{i:04d}"
        LoRAAdapter(target=target, A=A, B=B).save_peft(path, base_model_name_or_path=base_model)
        out.append(path)
    return out


def oracle_set(library: Path | None, n: int, scratch: Path, generator_ckpt: Path | None,
               base_model: str | None, seed: int) -> tuple[list[Oracle], dict]:
    """`n` oracles: library adapters first, then random ones of the same shape.

    Returns the oracles and a description of where they came from for the results.
    """
    real = library_adapters(library) if library is not None else []
    oracles = [Oracle(f"oracle-{_safe_name(p.name)}-{i}", str(p), False) for i, p in enumerate(real[:n])]
    n_random = n - len(oracles)
    if n_random > 0:
        paths = write_random_adapters(scratch, n_random, real[0] if real else None, generator_ckpt,
                                      base_model, seed)
        oracles += [Oracle(f"oracle-{p.name}", str(p), True) for p in paths]
    info = {
        "library": str(library) if library is not None else None,
        "library_adapters_found": len(real),
        "used_from_library": n - max(n_random, 0),
        "random_same_shape": max(n_random, 0),
        "shape": adapter_shape(Path(oracles[0].path)) if oracles else None,
        "note": ("all oracles are trained library adapters" if n_random <= 0 else
                 f"{max(n_random, 0)} of {n} oracles are random adapters of the same shape "
                 "(library missing or too small); latency depends on shape, not on values"),
    }
    return oracles, info
