"""What the benchmark asks: prompts, task descriptions, and the Zipf-like mixed stream.

The prompts and descriptions come from Super-NaturalInstructions (instance inputs) and the
Text-to-LoRA paraphrased task descriptions, frozen into `workload.json` beside this file so
that the CPU and the H100 runs send the same text (the GPU machine has no copy of the data).
`build_workload` rebuilds that file from the task folder; `python -m benchmarks.serving
workload --sni-dir DIR` calls it.

Every scenario sends prompt i % P for its i-th request, so all scenarios prefill the same
token counts and differ only in which adapter answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORKLOAD_FILE = Path(__file__).with_name("workload.json")


@dataclass(frozen=True)
class Workload:
    """Frozen benchmark inputs."""

    prompts: tuple[str, ...]        # user messages, P of them
    descriptions: tuple[str, ...]   # task descriptions, never sent twice as "new"
    source: str

    @classmethod
    def load(cls, path: Path = WORKLOAD_FILE) -> "Workload":
        data = json.loads(Path(path).read_text())
        return cls(tuple(data["prompts"]), tuple(data["descriptions"]), data["source"])


def build_workload(
    sni_dir: Path,
    n_prompts: int = 64,
    n_descriptions: int = 1024,
    seed: int = 0,
    min_chars: int = 80,
    max_chars: int = 600,
) -> dict:
    """Draw prompts and descriptions from the Super-NaturalInstructions task files.

    Prompts: instance inputs between `min_chars` and `max_chars` characters, at most one per
    task, so their lengths spread like real requests. Descriptions: paraphrased task
    descriptions, spread evenly over tasks. Deterministic given `seed`.
    """
    rng = np.random.default_rng(seed)
    tasks = [json.loads(p.read_text()) for p in sorted(Path(sni_dir).glob("task*.json"))]
    if not tasks:
        raise FileNotFoundError(f"no task*.json files in {sni_dir}")
    prompts: list[str] = []
    for i in rng.permutation(len(tasks)):
        fitting = [x["input"] for x in tasks[i]["instances"] if min_chars <= len(x["input"]) <= max_chars]
        if fitting:
            prompts.append(fitting[int(rng.integers(len(fitting)))])
        if len(prompts) == n_prompts:
            break
    per_task = -(-n_descriptions // len(tasks))  # ceil
    pool = [d for t in tasks for d in list(t["descriptions"])[:per_task]]
    descriptions = [pool[i] for i in rng.permutation(len(pool))[:n_descriptions]]
    return {
        "source": "Super-NaturalInstructions (allenai/natural-instructions, Apache-2.0) instance "
        "inputs; task descriptions from SakanaAI/text-to-lora (Apache-2.0); "
        f"{len(tasks)} tasks, seed {seed}",
        "prompts": prompts,
        "descriptions": descriptions,
    }


class DescriptionSource:
    """Hands out descriptions that this run has never sent before.

    `tag` makes them unique per run (a server with a warm store would otherwise answer from
    the store and the "cold" scenarios would not be cold); once the frozen list runs out the
    same texts come back with a round number.
    """

    def __init__(self, descriptions: tuple[str, ...], tag: str):
        self._descriptions = descriptions
        self._tag = tag
        self._next = 0

    def take(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            i, self._next = self._next, self._next + 1
            text = self._descriptions[i % len(self._descriptions)]
            out.append(f"{text} (benchmark {self._tag}, request {i})")
        return out


def zipf_probabilities(n: int, s: float) -> np.ndarray:
    """p(rank k) proportional to 1 / k**s for k = 1..n."""
    w = 1.0 / np.arange(1, n + 1, dtype=float) ** s
    return w / w.sum()


def mixed_stream(n_requests: int, pool_size: int, new_share: float, zipf_s: float, seed: int) -> list[int]:
    """The mixed stream as pool ranks: -1 means "a new description", else an index into the pool.

    A request is new with probability `new_share`, otherwise it names pool entry k with Zipf
    probability. The same seed gives the same stream, so the generated and the oracle arms of
    a run replay identical sequences.
    """
    if not 0.0 <= new_share <= 1.0:
        raise ValueError(f"new_share must be in [0, 1], got {new_share}")
    rng = np.random.default_rng(seed)
    is_new = rng.random(n_requests) < new_share
    ranks = rng.choice(pool_size, size=n_requests, p=zipf_probabilities(pool_size, zipf_s))
    return [-1 if new else int(k) for new, k in zip(is_new, ranks)]
