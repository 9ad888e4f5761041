"""LoRAGen: task description -> LoRA adapter weights (with the T2L hypernetwork as baseline).

Public API: `TargetSpec`, `LoRAAdapter`, `Generator`, `load_generator`, `ensure_base_model`,
`DescriptionEncoder` and the configs. Layers, each importing only the ones above it:

    api, config, adapter, encoder, base_model     the public surface (top level)
    models/      LoRAGen (LAE, DiT, diffusion), T2L, the weight-space losses; a registry by kind
    training/    generator training (reconstruction, SFT), oracle LoRAs, batched multi-LoRA, prompts
    data/        Super-NaturalInstructions tasks and splits, LoRA libraries (real and synthetic)

This package never imports the serving package `loragen_vllm`.
"""

from __future__ import annotations

from typing import Any

from .config import DiffusionConfig, LAEConfig, T2LConfig, TargetSpec, TrainConfig

__all__ = [
    "AdapterFiles",
    "DescriptionEncoder",
    "DiffusionConfig",
    "Generator",
    "LAEConfig",
    "LoRAAdapter",
    "T2LConfig",
    "TargetSpec",
    "TrainConfig",
    "ensure_base_model",
    "load_generator",
]

_LAZY = {  # torch and transformers load on first use (`generator.arg_types` is imported by CLIs that need neither)
    "AdapterFiles": ("adapter", "AdapterFiles"),
    "LoRAAdapter": ("adapter", "LoRAAdapter"),
    "Generator": ("api", "Generator"),
    "load_generator": ("api", "load_generator"),
    "DescriptionEncoder": ("encoder", "DescriptionEncoder"),
    "ensure_base_model": ("base_model", "ensure_base_model"),
}


def __getattr__(name: str) -> Any:  # heavy modules (torch, transformers) load on first use
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'generator' has no attribute {name!r}")
