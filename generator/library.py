"""A LoRA library: one sub-folder per task, each a PEFT adapter plus `descriptions.json`.

    library/
      <task>/adapter_config.json
      <task>/adapter_model.safetensors
      <task>/descriptions.json        # JSON list of description strings

`make_synthetic_library()` writes a library of random low-rank adapters for tests and demos.
Real LoRA libraries are not independent random matrices: adapters trained from one
initialisation seed share most of A, and task updates lie near a low-dimensional family. The
synthetic adapters mimic that: at each location, A = A0 + sum_k c_k A_k (small A_k) and
B = sum_k c_k B_k + noise, with random A0, A_k, B_k shared by all tasks and a task code c ~ N(0, I)
of `num_factors` entries. B_k is common to all layers up to a per-layer part of relative size
`layer_var` (one task's updates are correlated across layers). dW = B A is then a task-specific
function of c plus noise.
Each task gets its own descriptions built from a distinct (skill, subject) pair.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAAdapter, write_peft_files
from .config import TargetSpec

DESCRIPTIONS_FILE = "descriptions.json"
_TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class LibraryTask:
    """One task of a library: its name, adapter and descriptions."""

    name: str
    adapter: LoRAAdapter
    descriptions: list[str]


def _check_descriptions(descriptions: object, where: str) -> list[str]:
    if not isinstance(descriptions, list) or not descriptions:
        raise ValueError(f"{where}: descriptions must be a non-empty JSON list of strings")
    for d in descriptions:
        if not isinstance(d, str) or not d.strip():
            raise ValueError(f"{where}: every description must be a non-empty string, got {d!r}")
    return list(descriptions)


def save_task(root: str | Path, name: str, adapter: LoRAAdapter, descriptions: Sequence[str]) -> Path:
    """Write one task folder `root/name`."""
    if not _TASK_NAME_RE.match(name):
        raise ValueError(f"bad task name {name!r} (letters, digits, '_', '.', '-')")
    folder = Path(root) / name
    files = adapter.to_peft_files()
    files[DESCRIPTIONS_FILE] = json.dumps(_check_descriptions(list(descriptions), name), indent=1).encode()
    write_peft_files(files, folder)
    return folder


def load_task(folder: str | Path) -> LibraryTask:
    folder = Path(folder)
    path = folder / DESCRIPTIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        descriptions = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return LibraryTask(folder.name, LoRAAdapter.load_peft(folder), _check_descriptions(descriptions, str(path)))


def task_folders(root: str | Path) -> list[Path]:
    """Sub-folders of `root` that hold an adapter and descriptions, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"library folder {root} not found")
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir()
        and (p / ADAPTER_CONFIG).is_file()
        and (p / ADAPTER_WEIGHTS).is_file()
        and (p / DESCRIPTIONS_FILE).is_file()
    )


def load_library(root: str | Path, target: TargetSpec | None = None) -> list[LibraryTask]:
    """All tasks of a library, sorted by name; every adapter is expressed in one `TargetSpec`.

    With `target` given, adapters are checked against it (and re-ordered to its module order);
    otherwise the first task's target is used for all. The base model name of `target` wins.
    """
    folders = task_folders(root)
    if not folders:
        raise ValueError(f"library {root} has no task folders (each needs {ADAPTER_CONFIG}, "
                         f"{ADAPTER_WEIGHTS}, {DESCRIPTIONS_FILE})")
    tasks = [load_task(f) for f in folders]
    if target is None:
        first = tasks[0].adapter.target
        target = first if first.base_model else TargetSpec.from_dict({**first.to_dict(), "base_model": "unknown"})
    out = []
    for t in tasks:
        try:
            adapter = t.adapter.reorder(target)
        except ValueError as e:
            raise ValueError(f"task {t.name!r} does not match the library's target: {e}") from None
        out.append(LibraryTask(t.name, adapter, t.descriptions))
    return out


# ----------------------------------------------------------------------------------------------
# Synthetic library

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
