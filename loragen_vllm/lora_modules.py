"""Which layers carry LoRA: the modules an adapter folder has weights for, and the layers vLLM
applies LoRA to under ``--lora-target-modules``.

``serve`` restricts vLLM's LoRA to the generator's modules (vLLM otherwise wraps every linear
layer and pays for the empty ones in every step and every adapter load;
benchmarks/results/adapter_load.md). An adapter with weights outside those layers would be
loaded and served without them, so ``serve`` refuses such a list and `edge.EdgeGuard` refuses
such an admin load. vLLM packs some projections into one layer (Llama-family models, what
``serve`` serves: q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``): LoRA on one member
is LoRA on the whole packed layer, so every member's weights apply (`lora_layers`).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path

ADAPTER_WEIGHTS = "adapter_model.safetensors"

# vLLM's packed_modules_mapping of LlamaForCausalLM (and the Llama-like models serve checks for)
PACKED_LAYERS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}

_LORA_WEIGHT = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B)(?:\.|$)")
_MAX_HEADER = 100 << 20  # the safetensors format's own bound on its JSON header


def lora_layers(modules: Iterable[str]) -> frozenset[str]:
    """The module names whose LoRA weights vLLM applies under ``--lora-target-modules modules``:
    the names given and, for a packed layer named or with a member named, the layer and all
    its members (``{"q_proj", "v_proj"}`` -> q, k, v and qkv_proj)."""
    out = set(modules)
    for packed, members in PACKED_LAYERS.items():
        if packed in out or out.intersection(members):
            out.update(members)
            out.add(packed)
    return frozenset(out)


def lora_weight_modules(folder: str | Path) -> frozenset[str] | None:
    """The module names (``q_proj``, ``o_proj``, ...) that an adapter folder has LoRA weights for.

    Read from the tensor names in the header of ``adapter_model.safetensors`` (what vLLM itself
    goes by: ``target_modules`` in the config may name modules without weights); no tensor is
    read and torch is not needed. ``~`` is expanded, as vLLM does. None if they cannot be read:
    no such local file (a hub id, a ``.bin`` adapter, a missing folder) or not a safetensors
    header.
    """
    try:
        with open(Path(os.path.expanduser(str(folder))) / ADAPTER_WEIGHTS, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _MAX_HEADER:
                return None
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError, RecursionError):  # RecursionError: a crafted header
        return None
    if not isinstance(header, dict):
        return None
    modules = set()
    for name in header:
        match = _LORA_WEIGHT.search(name)
        if match:
            modules.add(name[:match.start()].rsplit(".", 1)[-1])
    return frozenset(modules)
