"""A LoRA library: one sub-folder per task, each a PEFT adapter plus `descriptions.json`.

    library/
      <task>/adapter_config.json
      <task>/adapter_model.safetensors
      <task>/descriptions.json        # JSON list of description strings

An oracle run (`generator.training.oracles`) writes a *library root*:

    root/
      library/<task>/     training tasks: adapter + descriptions.json (train descriptions) + task.json
      held_out/<task>/    validation and test tasks' oracles (for evaluation only, never trained on)
      multitask/          one adapter trained on all training tasks + multitask.json
      oracles.json        the runs' settings, adapters per minute, loss curves

This module is the one place that reads and writes that format: task folders, the root's
sub-folders, and its transport as a few bf16 safetensors shards (`pack_library` /
`unpack_library`). `generator.data.synthetic` writes random libraries for tests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAAdapter, write_peft_files
from ..config import TargetSpec

DESCRIPTIONS_FILE = "descriptions.json"
TASK_FILE = "task.json"
MULTITASK_FILE = "multitask.json"
SUMMARY_FILE = "oracles.json"
LIBRARY_DIR, HELD_OUT_DIR, MULTITASK_DIR = "library", "held_out", "multitask"
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


def load_library_task(folder: str | Path) -> LibraryTask:
    """One task folder: its adapter and descriptions (ValueError / FileNotFoundError when malformed)."""
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


def load_library(
    root: str | Path, target: TargetSpec | None = None, only: Sequence[str] | None = None
) -> list[LibraryTask]:
    """All tasks of a library (or those named in `only`), sorted by name, in one `TargetSpec`.

    With `target` given, adapters are checked against it (and re-ordered to its module order);
    otherwise the first task's target is used for all. The base model name of `target` wins.
    """
    folders = task_folders(root)
    if only is not None:
        have = {f.name: f for f in folders}
        missing = sorted(set(only) - set(have))
        if missing:
            raise ValueError(f"library {root} lacks {len(missing)} requested tasks, e.g. {missing[:3]}")
        folders = [have[n] for n in sorted(set(only))]
    if not folders:
        raise ValueError(f"library {root} has no task folders (each needs {ADAPTER_CONFIG}, "
                         f"{ADAPTER_WEIGHTS}, {DESCRIPTIONS_FILE})")
    tasks = [load_library_task(f) for f in folders]
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


def is_complete(folder: Path) -> bool:
    """A task folder is complete once its descriptions.json (written last) is there."""
    return all((folder / f).is_file() for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DESCRIPTIONS_FILE))


def write_library_task(folder: Path, adapter: LoRAAdapter, descriptions: Sequence[str], info: dict) -> None:
    """An oracle's folder: adapter, task.json (`info`), then descriptions.json (marks it complete)."""
    adapter.save_peft(folder)
    write_peft_files({TASK_FILE: json.dumps(info, indent=1).encode()}, folder)
    write_peft_files({DESCRIPTIONS_FILE: json.dumps(_check_descriptions(list(descriptions), str(folder)),
                                                    indent=1).encode()}, folder)


def is_complete_multitask(folder: Path) -> bool:
    return all((folder / f).is_file() for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MULTITASK_FILE))


def write_multitask(folder: Path, adapter: LoRAAdapter, info: dict) -> None:
    """The multi-task adapter's folder: adapter, then multitask.json (marks it complete)."""
    adapter.save_peft(folder)
    write_peft_files({MULTITASK_FILE: json.dumps(info, indent=1).encode()}, folder)


def load_adapters(*folders: str | Path) -> dict[str, LoRAAdapter]:
    """{task name: adapter} for every complete task folder of the folders (e.g. library/, held_out/)."""
    out: dict[str, LoRAAdapter] = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise FileNotFoundError(f"library folder {folder} not found")
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and is_complete(p)):
            if sub.name in out:
                raise ValueError(f"task {sub.name!r} occurs in two library folders")
            out[sub.name] = LoRAAdapter.load_peft(sub)
    return out


def read_summary(root: str | Path) -> dict:
    path = Path(root) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else {"runs": []}


def append_run(root: str | Path, run: dict, **fields: object) -> None:
    """Add one oracle run (and top-level `fields`) to the root's oracles.json."""
    summary = read_summary(root)
    summary.update(fields)
    summary["runs"].append(run)
    (Path(root) / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))


# ------------------------------------------------------------------------------------------------
# Transport: a library as a few bf16 shards


def pack_library(root: str | Path, out: str | Path, num_shards: int) -> list[Path]:
    """Write every adapter folder under `root` as `num_shards` bf16 safetensors files in `out`.

    Keys are the folders' paths relative to `root` (e.g. `library/task1146_country_capital`); each
    shard's metadata holds, per adapter, its target and side files (descriptions.json, ...); shard 0
    also carries `root`'s summary file.
    """
    from safetensors.torch import save_file

    root, out = Path(root), Path(out)
    if num_shards < 1:
        raise ValueError(f"shards must be at least 1, got {num_shards}")
    if not root.is_dir():
        raise FileNotFoundError(f"library root {root} not found")
    subs = sorted(p.parent for p in root.rglob(ADAPTER_WEIGHTS))
    if not subs:  # e.g. a mistyped root: writing empty shards would replace good ones
        raise ValueError(f"no adapter folders ({ADAPTER_WEIGHTS}) under {root}: nothing to pack")
    stale = sorted(out.glob("oracles-*.safetensors")) if out.is_dir() else []
    if stale:
        raise ValueError(f"{out} already holds {len(stale)} shards (oracles-*.safetensors): pack into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(num_shards):
        tensors, meta = {}, {}
        for sub in subs[k::num_shards]:
            a = LoRAAdapter.load_peft(sub)
            key = sub.relative_to(root).as_posix()
            for m in a.target.modules:
                tensors[f"{key}/{m}/A"] = a.A[m].to(torch.bfloat16).contiguous()
                tensors[f"{key}/{m}/B"] = a.B[m].to(torch.bfloat16).contiguous()
            side = {p.name: p.read_text() for p in sub.iterdir() if p.suffix == ".json" and p.name != ADAPTER_CONFIG}
            meta[key] = json.dumps({"target": a.target.to_dict(), "files": side})
        metadata = {"adapters": json.dumps(meta)}
        if k == 0 and (root / SUMMARY_FILE).is_file():
            metadata[SUMMARY_FILE] = (root / SUMMARY_FILE).read_text()
        path = out / f"oracles-{k:02d}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        paths.append(path)
    return paths


def unpack_library(shards: Sequence[str | Path], out: str | Path) -> list[str]:
    """Rebuild the adapter folders of `pack_library` shards under `out`; returns their keys."""
    from safetensors import safe_open

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            metadata = f.metadata()
            if SUMMARY_FILE in metadata:
                (out / SUMMARY_FILE).write_text(metadata[SUMMARY_FILE])
            for key, info in json.loads(metadata["adapters"]).items():
                if key.startswith("/") or ".." in key.split("/"):
                    raise ValueError(f"bad adapter key {key!r} in {shard}")
                info = json.loads(info)
                target = TargetSpec.from_dict(info["target"])
                A = {m: f.get_tensor(f"{key}/{m}/A").float() for m in target.modules}
                B = {m: f.get_tensor(f"{key}/{m}/B").float() for m in target.modules}
                dest = out / key
                LoRAAdapter(target, A, B).save_peft(dest)
                side = dict(info["files"])
                last = side.pop(DESCRIPTIONS_FILE, None)
                write_peft_files({n: t.encode() for n, t in side.items()}, dest)
                if last is not None:
                    write_peft_files({DESCRIPTIONS_FILE: last.encode()}, dest)
                names.append(key)
    return names
