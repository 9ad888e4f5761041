"""Generator models, one class per kind, behind one interface and a registry.

Every model class declares its `kind` and implements

    from_configs(target, configs) -> model        build from a checkpoint's `configs` dicts
    sampler_defaults() -> dict                    the sampler settings its checkpoint records
    generate_factors(cond, generators, steps, guidance, mark) -> (A, B)
        description embeddings (N, 384) -> A[m] (N, L, r, d_in), B[m] (N, L, d_out, r);
        `generators[i]` draws row i's noise, `mark(stage)` is called as each stage ends.

`generator.api.Generator` uses only this interface, so a new kind is one registered class.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import TargetSpec
from .loragen import LoRAGen
from .t2l import T2L

REGISTRY: dict[str, type[nn.Module]] = {cls.kind: cls for cls in (LoRAGen, T2L)}
KINDS: tuple[str, ...] = tuple(REGISTRY)


def model_class(kind: str) -> type[nn.Module]:
    """The model class of a generator kind; ValueError naming the known kinds otherwise."""
    try:
        return REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown generator kind {kind!r}; expected one of {KINDS}") from None


def build_model(kind: str, target: TargetSpec, configs: dict[str, Any]) -> nn.Module:
    """The untrained model of a kind from its config dicts."""
    return model_class(kind).from_configs(target, configs)  # type: ignore[attr-defined]


__all__ = ["KINDS", "REGISTRY", "LoRAGen", "T2L", "build_model", "model_class"]
