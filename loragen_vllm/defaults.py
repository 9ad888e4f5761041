"""The default generator checkpoint, found in one place (`generate`, `serve`, `generator start`).

Order: ``$LORAGEN_GENERATOR`` if set, else the checkpoint shipped inside the ``generator``
package at ``generator/checkpoints/default/`` (LoRAGen trained on the SNI library for
SmolLM2-135M-Instruct; see benchmarks/results/quality.md), else none -- then commands that need
a generator ask for ``--generator`` with `MISSING_GENERATOR`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from loragen_vllm import envs

CHECKPOINT_FILES = ("config.json", "model.safetensors")  # what makes a folder a checkpoint

MISSING_GENERATOR = (
    "no generator checkpoint given: pass --generator CKPT (a folder written by "
    "`python -m generator train ... --out CKPT`) or set $LORAGEN_GENERATOR; the default "
    "checkpoint (generator/checkpoints/default/) is missing from this installation"
)


def shipped_checkpoint_dir() -> Path | None:
    """``generator/checkpoints/default`` of the installed ``generator`` package (may not exist)."""
    spec = importlib.util.find_spec("generator")  # locates the package without importing torch
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "checkpoints" / "default"


def default_generator_checkpoint() -> Path | None:
    """The checkpoint to use when none is given, or None if there is none."""
    explicit = envs.LORAGEN_GENERATOR
    if explicit is not None:
        return explicit  # a wrong path fails loudly when loaded
    shipped = shipped_checkpoint_dir()
    if shipped is not None and all((shipped / f).is_file() for f in CHECKPOINT_FILES):
        return shipped
    return None
