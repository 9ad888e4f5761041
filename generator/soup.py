"""Weight averaging of generator checkpoints (a "model soup", Wortsman et al. 2022).

Checkpoints fine-tuned from one starting point (e.g. SFT snapshots of one run, or runs from one
reconstruction checkpoint) can be averaged parameter by parameter; the soup is a checkpoint like
any other and is chosen on validation like any other. Checkpoints of one starting point share
their buffers (the latent and factor statistics the reconstruction stage fitted), so those must be
equal and are kept, not averaged. The soup keeps the first checkpoint's sampler; its `extra` says
`"training": "soup"` and lists the sources (`extra["soup"]`), not any one source's training record.

    python -m generator.soup --out DIR CKPT CKPT [CKPT ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from generator.api import Generator
from generator.arg_types import empty_folder


def average(ckpts: list[str | Path]) -> Generator:
    """The parameter-wise mean of `ckpts`: at least two checkpoints of one model (same kind, target
    and model configs) and one starting point (equal buffers); raises ValueError otherwise."""
    if len(ckpts) < 2:
        raise ValueError("a soup needs at least two checkpoints")
    gens = [Generator.load(c) for c in ckpts]
    first = gens[0]
    params = {name for name, _ in first.model.named_parameters()}
    states = [g.model.state_dict() for g in gens]
    for c, g, state in zip(ckpts[1:], gens[1:], states[1:]):
        if (g.kind, g.target, g.configs) != (first.kind, first.target, first.configs):
            raise ValueError(f"{c} is not the same model as {ckpts[0]} (kind, target or configs differ)")
        for name, t in states[0].items():
            if name not in params and not torch.equal(t, state[name]):
                raise ValueError(f"{c} does not share a starting point with {ckpts[0]}: buffer {name} differs")
    mean = {name: torch.stack([s[name].float() for s in states]).mean(0).to(t.dtype) if name in params else t
            for name, t in states[0].items()}
    first.model.load_state_dict(mean, strict=True)
    extra: dict[str, Any] = {
        "training": "soup",
        "soup": [{"checkpoint": str(c), "fingerprint": g.fingerprint, "training": g.extra.get("training")}
                 for c, g in zip(ckpts, gens)],
    }
    libraries = [g.extra.get("library") for g in gens]
    if libraries[0] is not None and all(lib == libraries[0] for lib in libraries):
        extra["library"] = libraries[0]  # the training tasks, when every source had the same
    return Generator(first.kind, first.target, first.model, first.configs, first.sampler, "cpu", extra)


def main() -> None:
    """CLI: write the soup of the given checkpoints to --out and print its fingerprint."""
    ap = argparse.ArgumentParser(prog="python -m generator.soup", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="generator checkpoint folders")
    ap.add_argument("--out", required=True, type=empty_folder, help="folder for the soup's checkpoint (new or empty)")
    a = ap.parse_args()
    try:
        gen = average(a.checkpoints)
        gen.save(a.out)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({"checkpoint": str(Path(a.out).resolve()), "fingerprint": gen.fingerprint,
                      "sources": [s["fingerprint"][:12] for s in gen.extra["soup"]]}))


if __name__ == "__main__":
    main()
