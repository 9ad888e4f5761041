"""Weight averaging of generator checkpoints (a "model soup", Wortsman et al. 2022).

Checkpoints fine-tuned from one starting point (e.g. SFT snapshots of one run, or runs from one
reconstruction checkpoint) can be averaged parameter by parameter; the soup is a checkpoint like
any other and is chosen on validation like any other. The soup keeps the first checkpoint's sampler
and `extra` (how that one was trained) and records its sources under `extra["soup"]`.

    python -m generator.soup --out DIR CKPT CKPT [CKPT ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from generator.api import Generator


def average(ckpts: list[str | Path]) -> Generator:
    """The parameter-wise mean of `ckpts` (at least two, same kind, target and model configs)."""
    if len(ckpts) < 2:
        raise ValueError("a soup needs at least two checkpoints")
    gens = [Generator.load(c) for c in ckpts]
    first = gens[0]
    for c, g in zip(ckpts[1:], gens[1:]):
        if (g.kind, g.target, g.configs) != (first.kind, first.target, first.configs):
            raise ValueError(f"{c} is not the same model as {ckpts[0]} (kind, target or configs differ)")
    states = [g.model.state_dict() for g in gens]
    mean = {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}
    model = first.model
    model.load_state_dict(mean, strict=True)
    extra = {**first.extra, "soup": [{"checkpoint": str(c), "fingerprint": g.fingerprint} for c, g in zip(ckpts, gens)]}
    return Generator(first.kind, first.target, model, first.configs, first.sampler, "cpu", extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="generator checkpoint folders")
    ap.add_argument("--out", required=True, help="folder for the soup's checkpoint")
    a = ap.parse_args()
    try:
        gen = average(a.checkpoints)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    gen.save(a.out)
    print(json.dumps({"checkpoint": str(Path(a.out).resolve()), "fingerprint": gen.fingerprint,
                      "sources": [s["fingerprint"][:12] for s in gen.extra["soup"]]}))


if __name__ == "__main__":
    main()
