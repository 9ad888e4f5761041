"""Conditioning on a blend of the description and its nearest training descriptions (an experiment).

The generator's probe (`quality_ce_gap.md`) says its conditioning carries on training descriptions
(1.08 nats between the right description's adapter and a random string's) far more than on new
ones (0.41). This asks whether pulling a new description's embedding towards the training
descriptions it is nearest to helps the adapters it gets:

    e' = normalize(alpha * e + (1 - alpha) * sum_j w_j a_j),   w = softmax(cos(e, a_j) / temperature)

over the `k` training descriptions a_j nearest to e (all unit vectors of the description encoder).
alpha = 1 is the generator as served; alpha = 0, k = 1 conditions on the nearest training
description alone. Only `benchmarks.quality generate --anchor-blend` uses it. Measured
(`benchmarks/results/quality_anchors.md`): alpha 0.75, k 5 won validation by 0.53 EM and was
within noise on test, so `serve` does not blend.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import Tensor

from generator.data.sni import Task, split_descriptions


@dataclass(frozen=True)
class AnchorBlend:
    alpha: float        # weight of the description's own embedding (1 = unchanged)
    k: int = 5          # nearest training descriptions blended in
    temperature: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"anchor blend alpha must lie in [0, 1], got {self.alpha}")
        if self.k < 1 or self.temperature <= 0:
            raise ValueError(f"anchor blend needs k >= 1 and temperature > 0, got k={self.k}, "
                             f"temperature={self.temperature}")

    def apply(self, cond: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
        """cond (N, D), anchors (M, D), unit rows -> (blended cond (N, D), cosine to the nearest anchor (N,))."""
        sim = cond @ anchors.T                                         # (N, M) cosines
        top, idx = sim.topk(min(self.k, anchors.shape[0]), dim=1)      # (N, k)
        w = torch.softmax(top / self.temperature, dim=1)               # (N, k)
        mix = (w.unsqueeze(-1) * anchors[idx]).sum(dim=1)              # (N, D)
        out = self.alpha * cond + (1.0 - self.alpha) * mix
        return torch.nn.functional.normalize(out, dim=1), top[:, 0]

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def training_descriptions(tasks: Sequence[Task]) -> list[str]:
    """The descriptions the generators trained on: each training task's non-evaluation descriptions."""
    return [d for t in tasks for d in split_descriptions(t)[0]]
