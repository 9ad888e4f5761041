"""A synthetic LoRA library for tests and demos: random low-rank adapters of a realistic shape.

Real LoRA libraries are not independent random matrices: adapters trained from one
initialisation seed share most of A, and task updates lie near a low-dimensional family. The
synthetic adapters mimic that: at each location, A = A0 + sum_k c_k A_k (small A_k) and
B = sum_k c_k B_k + noise, with random A0, A_k, B_k shared by all tasks and a task code c ~ N(0, I)
of `num_factors` entries. B_k is common to all layers up to a per-layer part of relative size
`layer_var` (one task's updates are correlated across layers). dW = B A is then a task-specific
function of c plus noise. Each task gets its own descriptions built from a distinct (skill, subject) pair.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapter import LoRAAdapter
from ..config import TargetSpec
from .library import save_task


_SKILLS = [
    "Translate", "Summarize", "Classify the sentiment of", "Extract the named entities from",
    "Answer questions about", "Correct the grammar of", "Write a title for", "Detect sarcasm in",
    "Paraphrase", "Simplify", "Find the main argument of", "Rate the toxicity of",
    "Convert to bullet points", "Identify the language of", "Count the verbs in", "Generate a question about",
]
_SUBJECTS = [
    "restaurant reviews", "legal contracts", "medical abstracts", "movie plots", "tweets about sports",
    "recipes", "news headlines", "chemistry exam questions", "customer support emails",
    "poems", "product descriptions", "historical letters", "software bug reports", "travel blogs",
    "financial reports", "children's stories", "scientific tables", "song lyrics", "weather forecasts",
    "job postings", "philosophy essays", "video game dialogues", "math word problems", "court rulings",
    "hotel complaints", "football match reports", "cooking videos transcripts", "astronomy articles",
    "political speeches", "car manuals", "fashion magazines", "biology textbooks", "chess commentaries",
    "real estate listings", "podcast transcripts", "insurance claims",
]
_TEMPLATES = [
    "{skill} {subject}.",
    "Your task: {skill_l} {subject}.",
    "You are given {subject}. {skill} them.",
    "{skill} the following {subject}, answering concisely.",
]


def synthetic_descriptions(num_tasks: int, per_task: int, generator: torch.Generator) -> list[list[str]]:
    """Distinct (skill, subject) pairs, each phrased `per_task` ways."""
    if num_tasks > len(_SUBJECTS) * len(_SKILLS):
        raise ValueError(f"at most {len(_SUBJECTS) * len(_SKILLS)} synthetic tasks")
    if per_task > len(_TEMPLATES):
        raise ValueError(f"at most {len(_TEMPLATES)} descriptions per synthetic task")
    pairs = torch.randperm(len(_SUBJECTS) * len(_SKILLS), generator=generator)[:num_tasks].tolist()
    out = []
    for p in pairs:
        skill, subject = _SKILLS[p % len(_SKILLS)], _SUBJECTS[p // len(_SKILLS)]
        skill_l = skill[0].lower() + skill[1:]
        out.append([t.format(skill=skill, skill_l=skill_l, subject=subject) for t in _TEMPLATES[:per_task]])
    return out


def synthetic_adapters(
    target: TargetSpec,
    num_tasks: int,
    generator: torch.Generator,
    num_factors: int = 8,
    b_scale: float = 0.02,
    noise: float = 0.1,
    layer_var: float = 0.2,
) -> list[LoRAAdapter]:
    """`num_tasks` adapters from the low-dimensional family described in the module docstring."""
    L, r, K = target.num_layers, target.rank, num_factors
    codes = torch.randn(num_tasks, K, generator=generator)  # task codes c
    A_all: dict[str, torch.Tensor] = {}
    B_all: dict[str, torch.Tensor] = {}
    for m in target.modules:
        d_in, d_out = target.shapes[m]
        A0 = torch.randn(L, r, d_in, generator=generator) / d_in**0.5  # the shared "init"
        Ak = torch.randn(K, L, r, d_in, generator=generator) / d_in**0.5 * 0.1  # A moves little from init
        # Task directions of B: shared by all layers, plus a per-layer part (layers of one task
        # adapter are correlated in real libraries).
        Bk = torch.randn(K, 1, d_out, r, generator=generator) + layer_var * torch.randn(K, L, d_out, r, generator=generator)
        Bk = Bk * b_scale / (K * (1 + layer_var**2)) ** 0.5
        A = A0 + torch.einsum("nk,klrd->nlrd", codes, Ak)  # (N, L, r, d_in)
        B = torch.einsum("nk,klor->nlor", codes, Bk)  # (N, L, d_out, r)
        B = B + noise * b_scale * torch.randn(B.shape, generator=generator)
        A_all[m], B_all[m] = A, B
    return [
        LoRAAdapter(target, {m: A_all[m][i].contiguous() for m in target.modules},
                    {m: B_all[m][i].contiguous() for m in target.modules})
        for i in range(num_tasks)
    ]


def make_synthetic_library(
    out_dir: str | Path,
    target: TargetSpec | None = None,
    num_tasks: int = 32,
    descriptions_per_task: int = 3,
    seed: int = 0,
    num_factors: int = 8,
) -> Path:
    """Write a synthetic library (see module docstring) to `out_dir`; returns it."""
    target = target or TargetSpec.smollm2()
    g = torch.Generator().manual_seed(seed)
    descriptions = synthetic_descriptions(num_tasks, descriptions_per_task, g)
    adapters = synthetic_adapters(target, num_tasks, g, num_factors=num_factors)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, (adapter, descs) in enumerate(zip(adapters, descriptions)):
        save_task(out, f"task_{i:03d}", adapter, descs)
    return out
