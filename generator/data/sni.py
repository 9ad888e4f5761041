"""Super-NaturalInstructions tasks: loading, the fixed splits, prompts and the SNI metrics.

A task is one JSON file (see data/sni/README.md): `name`, `definition`, `categories`,
`descriptions` (paraphrased task descriptions), `instances` (`{"input", "output": [...]}`).

Everything here is deterministic and independent of library versions: orders come from sha256,
never from a random generator, so the same files give the same splits on every machine.

- Instance split: test = a fixed 40 instances where the task has >= 80, else half (rounded down);
  the rest is train. The chosen test instances are the first in sha256 order of (task, index, input).
- Description split: the first `NUM_EVAL_DESCRIPTIONS` descriptions in sha256 order of
  (task, description) are evaluation descriptions; generators train on the others.
- Label sets: a task whose instances have 2 to `MAX_LABELS` distinct normalised outputs (Yes/No,
  POS/NEG, 1-5) has a closed label set (`label_strings`); `add_label_names` writes it into a
  description, as a user who knows the labels would.
- Task split: `data/sni/splits.json` assigns every task to `train`, `validation` or `test`
  (generators train on `train` only; choices are made on `validation`; tables report `test`),
  with short user-style descriptions of the test tasks; a fixed subset of training tasks (sha256
  order) is the in-distribution column.

Metrics follow the SNI evaluation script (allenai/natural-instructions, eval/automatic): answers
are lower-cased, punctuation removed and whitespace collapsed (articles are kept); exact match and
ROUGE-L (the `rouge-score` package, stemming on) take the best over the task's references, x100.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

__all__ = [
    "Instance",
    "Task",
    "TaskSplits",
    "load_sni_task",
    "load_tasks",
    "split_instances",
    "split_descriptions",
    "random_description",
    "load_splits",
    "propose_splits",
    "normalize_answer",
    "exact_match",
    "rouge_l",
    "label_strings",
    "add_label_names",
    "label_names",
    "train_labels",
    "MAX_LABELS",
    "TEST_SIZE",
    "NUM_EVAL_DESCRIPTIONS",
]

TEST_SIZE = 40  # test instances of a task with >= 2 * TEST_SIZE instances
NUM_EVAL_DESCRIPTIONS = 10  # per task, never seen by a generator in training
SPLITS_FILE = "splits.json"


# ------------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class Instance:
    """One example: the input text and every accepted output."""

    input: str
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    """One SNI task as stored in the task folder."""

    name: str
    definition: str
    categories: tuple[str, ...]
    descriptions: tuple[str, ...]
    instances: tuple[Instance, ...]

    @property
    def category(self) -> str:
        """The task's first category, top level only ('Classification -> Verification' -> 'Classification')."""
        return self.categories[0].split("->")[0].strip() if self.categories else "Uncategorised"


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise ValueError(f"{path}: {what}")


def load_sni_task(path: str | Path) -> Task:
    """Read and validate one task file; raises ValueError naming the file and the problem."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON task file ({e})") from None
    _require(isinstance(d, dict), path, "top level must be an object")
    name = d.get("name", path.stem)
    _require(isinstance(name, str) and name != "", path, "'name' must be a non-empty string")
    _require(isinstance(d.get("definition", ""), str), path, "'definition' must be a string")
    cats = d.get("categories", [])
    _require(isinstance(cats, list) and all(isinstance(c, str) for c in cats), path, "'categories' must be strings")
    descs = d.get("descriptions", [])
    _require(
        isinstance(descs, list) and all(isinstance(s, str) and s.strip() for s in descs),
        path,
        "'descriptions' must be non-empty strings",
    )
    _require(len(set(descs)) == len(descs), path, "'descriptions' repeat one (a copy could land in both description splits)")
    raw = d.get("instances")
    _require(isinstance(raw, list) and len(raw) >= 2, path, "'instances' must be a list of at least 2")
    instances = []
    for i, inst in enumerate(raw):
        ok = (
            isinstance(inst, dict)
            and isinstance(inst.get("input"), str)
            and isinstance(inst.get("output"), list)
            and len(inst["output"]) > 0
            and all(isinstance(o, str) for o in inst["output"])
        )
        _require(ok, path, f"instance {i} must be {{'input': str, 'output': [str, ...]}}")
        instances.append(Instance(inst["input"], tuple(inst["output"])))
    return Task(name, d.get("definition", ""), tuple(cats), tuple(descs), tuple(instances))


def load_tasks(folder: str | Path, names: Sequence[str] | None = None) -> list[Task]:
    """All tasks of a folder (`*.json`), sorted by name; or only `names`, in that order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"task folder {folder} does not exist")
    if names is None:
        tasks = [load_sni_task(p) for p in sorted(folder.glob("*.json"))]
        if not tasks:
            raise ValueError(f"no task files (*.json) in {folder}")
        return sorted(tasks, key=lambda t: t.name)
    missing = [n for n in names if not (folder / f"{n}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"tasks not found in {folder}: {missing}")
    return [load_sni_task(folder / f"{n}.json") for n in names]


# ------------------------------------------------------------------------------------------------
# Splits


def _digest(*parts: object) -> str:
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode()).hexdigest()


def num_test_instances(num_instances: int) -> int:
    """A fixed 40 where the task has >= 80 instances, else half (rounded down)."""
    return TEST_SIZE if num_instances >= 2 * TEST_SIZE else num_instances // 2


def split_instances(task: Task) -> tuple[list[Instance], list[Instance]]:
    """(train, test), each in file order; test chosen by sha256 order of (task, index, input)."""
    n = len(task.instances)
    order = sorted(range(n), key=lambda i: _digest("sni-test", task.name, i, task.instances[i].input))
    test_idx = set(order[: num_test_instances(n)])
    train = [x for i, x in enumerate(task.instances) if i not in test_idx]
    test = [x for i, x in enumerate(task.instances) if i in test_idx]
    return train, test


def split_descriptions(task: Task, num_eval: int = NUM_EVAL_DESCRIPTIONS) -> tuple[list[str], list[str]]:
    """(train, eval) descriptions; eval = the first `num_eval` in sha256 order, both in that order.

    A task with fewer than 2 * num_eval descriptions gives half of them to evaluation.
    """
    order = sorted(task.descriptions, key=lambda s: _digest("sni-desc", task.name, s))
    k = min(num_eval, len(order) // 2)
    return order[k:], order[:k]


def shot_examples(task: Task, k: int = 3) -> list[Instance]:
    """The k in-context examples of a task: the first k train instances in sha256 order."""
    train, _ = split_instances(task)
    return sorted(train, key=lambda x: _digest("sni-shot", task.name, x.input))[:k]


def random_description(task: str, j: int, seed: int, length: int) -> str:
    """A conditioning control: a random string of lowercase words, `length` characters, seeded by
    (task, j, seed) through sha256. The one use of a random generator here (`random.Random`'s
    choice and randint: Python keeps only its seeding and `random()` fixed across versions, so the
    strings are the same on machines with the same Python: 3.11 here, 3.12 on the GPU image)."""
    rng = random.Random(int(_digest("random-desc", task, j, seed)[:15], 16))
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < length:
        words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))))
    return " ".join(words)[:length].strip()


# ------------------------------------------------------------------------------------------------
# Label sets

MAX_LABELS = 10  # a task with 2 to this many distinct normalised outputs has a closed label set


def label_strings(instances: Sequence[Instance]) -> list[str] | None:
    """The labels of a closed label set as written (per normalised label, its most frequent
    spelling), most frequent first; None unless ``instances`` have 2 to `MAX_LABELS` distinct
    normalised outputs (one label leaves nothing to choose)."""
    spellings: dict[str, Counter[str]] = defaultdict(Counter)
    for x in instances:
        for o in x.outputs:
            spellings[normalize_answer(o)][o.strip()] += 1
    if not 2 <= len(spellings) <= MAX_LABELS:
        return None
    ranked = sorted(spellings.values(), key=lambda c: -sum(c.values()))
    return [c.most_common(1)[0][0] for c in ranked]


def train_labels(tasks: Sequence[Task]) -> dict[str, list[str]]:
    """The closed label sets of ``tasks`` by task name, from their *training* instances (what a
    user who knows the task would name; `label_strings`), for the tasks that have one."""
    return {t.name: labs for t in tasks if (labs := label_strings(split_instances(t)[0])) is not None}


LABELS_SENTENCE = "Answer with one of: "  # then the labels, each in double quotes, ", "-separated, and "."
_LABEL = r'"[^"\n]+"'
_NAMED_LABELS = re.compile(rf"(?:^|\s){re.escape(LABELS_SENTENCE)}({_LABEL}(?:, {_LABEL})+)\.\s*$")


def add_label_names(description: str, labels: Sequence[str]) -> str:
    """``description`` with a sentence naming ``labels``, in a fixed (sorted) order so that the
    sentence does not tell which label is most frequent:
    ``... Answer with one of: "NEG", "POS".`` (`label_names` reads it back)."""
    if len(labels) < 2:
        raise ValueError(f"a label set names at least 2 labels, got {list(labels)}")
    if any(not label or '"' in label or label != " ".join(unicodedata.normalize("NFC", label).split())
           for label in labels):
        raise ValueError(f"labels must be non-empty, without double quotes, in NFC with single spaces and none at "
                         f"the ends (as a description is normalised): {list(labels)}")
    named = ", ".join(f'"{label}"' for label in sorted(labels, key=lambda s: (s.casefold(), s)))
    text = description.rstrip()
    sep = "" if not text else " " if text.endswith((".", "!", "?")) else ". "
    return f"{text}{sep}{LABELS_SENTENCE}{named}."


def label_names(description: str) -> list[str] | None:
    """The labels that ``description`` names in `add_label_names`'s closing sentence
    (``Answer with one of: "A", "B".``, at least two, each quoted), in its order; None if it has no
    such sentence at its end."""
    m = _NAMED_LABELS.search(description)
    return None if m is None else re.findall(r'"([^"\n]+)"', m.group(1))


SPLIT_NAMES = ("train", "validation", "test")
NUM_IN_DISTRIBUTION_EVAL = 32  # training tasks scored for the in-distribution column


@dataclass(frozen=True)
class TaskSplits:
    """The task split: generators train on `train`; every choice is made on `validation`; rows are
    scored once on `test`. `user_descriptions` holds, per test task (and, for choosing served
    options on such descriptions, per validation task; for training on them, per training task),
    short descriptions written the way a user would type them (not from the task files)."""

    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]
    user_descriptions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    in_distribution: tuple[str, ...] = ()  # fixed in-distribution tasks, if the file names them

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for split in SPLIT_NAMES:
            for name in getattr(self, split):
                if name in seen:
                    raise ValueError(f"task {name!r} is in both {seen[name]!r} and {split!r}")
                seen[name] = split

    def split_of(self, name: str) -> str:
        """"train", "validation" or "test"; ValueError for a task the split does not list."""
        for split in SPLIT_NAMES:
            if name in getattr(self, split):
                return split
        raise ValueError(f"task {name!r} is in no split (add it to {SPLITS_FILE})")

    @property
    def evaluation(self) -> tuple[str, ...]:
        """Tasks no generator trains on: validation + test."""
        return self.validation + self.test

    def train_tasks(self, all_names: Sequence[str]) -> list[str]:
        train = set(self.train)
        return [n for n in all_names if n in train]

    @property
    def in_distribution_eval(self) -> tuple[str, ...]:
        """A fixed subset of training tasks for the in-distribution column: the file's list, or else
        the first in sha256 order (the file fixes it so that adding training tasks does not move it)."""
        if self.in_distribution:
            return self.in_distribution
        order = sorted(self.train, key=lambda n: _digest("sni-ind", n))
        return tuple(order[:NUM_IN_DISTRIBUTION_EVAL])


def propose_splits(tasks: Sequence[Task], num_test: int = 64, num_validation: int = 40,
                   min_categories: int = 15) -> TaskSplits:
    """The split `data/sni/splits.json` was made with: tasks in sha256 order of their names; the
    first `num_test` with >= 2 * TEST_SIZE instances are test, the next `num_validation` such tasks
    validation, every other task train. Nothing else (no siblings, no scores) is looked at.
    """
    order = sorted(tasks, key=lambda t: _digest("sni-split", t.name))
    eligible = [t for t in order if len(t.instances) >= 2 * TEST_SIZE]
    if len(eligible) < num_test + num_validation:
        raise ValueError(f"only {len(eligible)} tasks have >= {2 * TEST_SIZE} instances")
    test, validation = eligible[:num_test], eligible[num_test : num_test + num_validation]
    cats = {t.category for t in test}
    if len(cats) < min_categories:
        raise ValueError(f"the test split spans {len(cats)} categories, fewer than {min_categories}")
    held = {t.name for t in test + validation}
    return TaskSplits(tuple(sorted(t.name for t in tasks if t.name not in held)), tuple(sorted(t.name for t in validation)),
                      tuple(sorted(t.name for t in test)))


def load_splits(path: str | Path) -> TaskSplits:
    """Read a splits file (default: `<task folder>/../splits.json`); accepts the task folder too."""
    path = Path(path)
    if path.is_dir():
        path = path.parent / SPLITS_FILE
    try:
        d = json.loads(path.read_text())
        user = {k: tuple(v) for k, v in d.get("user_descriptions", {}).items()}
        splits = TaskSplits(*(tuple(d[k]) for k in SPLIT_NAMES), user_descriptions=user,
                            in_distribution=tuple(d.get("in_distribution", ())))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid splits file ({type(e).__name__}: {e})") from None
    outside = set(splits.in_distribution) - set(splits.train)
    if outside:
        raise ValueError(f"{path}: in-distribution tasks outside the train split: {sorted(outside)[:3]}")
    stray = set(splits.user_descriptions) - set(splits.train) - set(splits.evaluation)
    if stray:
        raise ValueError(f"{path}: user descriptions for tasks in no split: {sorted(stray)[:3]}")
    train_user = {_plain(d): t for t in splits.train for d in splits.user_descriptions.get(t, ())}
    shared = [(t, train_user[_plain(d)]) for t in splits.evaluation for d in splits.user_descriptions.get(t, ())
              if _plain(d) in train_user]
    if shared:  # `sft --user-style` would train on what an evaluation row is scored with
        raise ValueError(f"{path}: user description of evaluation task {shared[0][0]} is also training task "
                         f"{shared[0][1]}'s")
    return splits


def _plain(text: str) -> str:
    """A description compared as a reader would: case and spacing ignored."""
    return " ".join(text.casefold().split())


# ------------------------------------------------------------------------------------------------
# Metrics

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """SNI normalisation: lower case, no punctuation, single spaces (articles kept)."""
    return " ".join(s.lower().translate(_PUNCT).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 if the normalised prediction equals any normalised reference, else 0."""
    p = normalize_answer(prediction)
    return 100.0 if any(p == normalize_answer(r) for r in references) else 0.0


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Best ROUGE-L F-measure over the references (rouge-score's default tokenizer, stemming), x100."""
    scorer = _rouge_scorer()
    return 100.0 * max(scorer.score(r, prediction)["rougeL"].fmeasure for r in references)
