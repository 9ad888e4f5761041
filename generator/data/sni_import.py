"""Build or extend a Super-NaturalInstructions task library from local copies of its sources.

    python -m generator import-sni --natural-instructions NI_DIR --t2l T2L_DIR --tasks LIST --out DIR

* `NI_DIR`: a copy of allenai/natural-instructions (Apache-2.0); a task is `tasks/<name>.json`
  there (or `<name>.json` directly in NI_DIR), with "Definition", "Categories" and "Instances".
  The file may be cut short (a prefix of the JSON): instances are read one by one until the
  text ends, so the first part of a multi-megabyte file is enough.
* `T2L_DIR`: a copy of SakanaAI/text-to-lora (Apache-2.0); its `tasks/lol_*/metadata.yaml`
  hold paraphrased descriptions and name their task in `task_name` (`Lots-of-LoRAs/<name>`).
* `LIST`: a text file of task names, one a line (`#` comments allowed).

Each task becomes `DIR/<name>.json` in the format of `data/sni/tasks` (see `generator.data.sni`):
definition, categories, up to `max_descriptions` descriptions, the first `max_instances`
instances in file order (duplicate inputs dropped), source and licence. Existing task files in
DIR are kept unless `overwrite`; every file is written atomically. Task names are checked to be
plain names, never paths.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm.auto import tqdm

__all__ = ["ImportReport", "import_tasks", "read_task_list", "read_ni_task", "t2l_descriptions"]

TASK_NAME_RE = re.compile(r"^task[0-9]+_[A-Za-z0-9_.-]{1,200}$")
DEFAULT_MAX_INSTANCES = 200
DEFAULT_MAX_DESCRIPTIONS = 200
SOURCE = "allenai/natural-instructions, tasks/{name}.json (the first instances of the file)"
LICENSE = "Apache-2.0 (Super-NaturalInstructions); descriptions from SakanaAI/text-to-lora (Apache-2.0)"


@dataclass
class ImportReport:
    """What an import did: tasks written, kept (already there) and failed (name -> reason)."""

    written: list[str]
    kept: list[str]
    failed: dict[str, str]
    instances: dict[str, int]


def read_task_list(path: str | Path) -> list[str]:
    """Task names of a list file (one a line, blank lines and `#` comments ignored), checked."""
    names = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if not TASK_NAME_RE.match(name):
            raise ValueError(f"{path}:{i}: {name!r} is not a Super-NaturalInstructions task name (taskNNN_...)")
        names.append(name)
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: a task is listed twice")
    return names


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _iter_instances(text: str, start: int) -> Iterator[dict[str, Any]]:
    """Instances of the "Instances" list from `start` (just after its `[`), until the list or text ends."""
    dec = json.JSONDecoder()
    i = start
    while True:
        i = _skip_ws(text, i)
        if i >= len(text) or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the copy ends inside this instance
        yield obj
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i += 1


def _header_value(text: str, key: str, path: Path) -> Any:
    m = re.search(r'"%s"\s*:\s*' % re.escape(key), text)
    if not m:
        raise ValueError(f"{path}: no {key!r} field")
    try:
        return json.JSONDecoder().raw_decode(text, m.end())[0]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {key!r} is not valid JSON: {e}") from None


def read_ni_task(path: str | Path, max_instances: int = DEFAULT_MAX_INSTANCES) -> dict[str, Any]:
    """Definition, categories and the first `max_instances` distinct-input instances of a task file.

    Returns {"definition", "categories", "instances": [{"input", "output": [...]}]}.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    definition = _header_value(text, "Definition", path)
    categories = _header_value(text, "Categories", path)
    if isinstance(definition, list):
        definition = "\n".join(definition)
    if not isinstance(definition, str) or not definition.strip():
        raise ValueError(f"{path}: empty Definition")
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        raise ValueError(f"{path}: Categories must be a list of strings")
    m = re.search(r'"Instances"\s*:\s*\[', text)
    if not m:
        raise ValueError(f"{path}: no 'Instances' list")
    instances: list[dict[str, Any]] = []
    seen: set[str] = set()
    for k, obj in enumerate(_iter_instances(text, m.end())):
        if len(instances) >= max_instances:
            break
        x, y = obj.get("input") if isinstance(obj, dict) else None, obj.get("output") if isinstance(obj, dict) else None
        if isinstance(y, str):
            y = [y]
        if not isinstance(x, str) or not isinstance(y, list) or not y or not all(isinstance(o, str) for o in y):
            raise ValueError(f"{path}: instance {k} needs a string 'input' and a list of string 'output's")
        if x in seen:
            continue
        seen.add(x)
        instances.append({"input": x, "output": list(y)})
    if not instances:
        raise ValueError(f"{path}: no complete instance")
    return {"definition": definition, "categories": categories, "instances": instances}


def t2l_descriptions(t2l_dir: str | Path) -> dict[str, list[str]]:
    """{task name: descriptions} of every `tasks/lol_*/metadata.yaml` under a text-to-lora copy."""
    import yaml

    root = Path(t2l_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"text-to-lora folder {root} not found")
    tasks_dir = root / "tasks" if (root / "tasks").is_dir() else root
    out: dict[str, list[str]] = {}
    for meta in sorted(tasks_dir.glob("lol_*/metadata.yaml")):
        try:
            d = yaml.safe_load(meta.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{meta}: not valid YAML: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{meta}: expected a mapping with task_name and descriptions")
        name = str(d.get("task_name") or "").rsplit("/", 1)[-1] or meta.parent.name.removeprefix("lol_")
        # stripped, blank ones dropped, each once (a repeat could fall in both the train and eval halves)
        descriptions = list(dict.fromkeys(s.strip() for s in d.get("descriptions") or [] if isinstance(s, str) and s.strip()))
        if descriptions:
            out[name] = descriptions
    return out


def _write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a task library is read by others too
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _ni_file(ni_dir: Path, name: str) -> Path:
    for candidate in (ni_dir / "tasks" / f"{name}.json", ni_dir / f"{name}.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no task file {name}.json in {ni_dir}/tasks or {ni_dir}")


def import_tasks(
    ni_dir: str | Path,
    t2l_dir: str | Path,
    names: Sequence[str],
    out: str | Path,
    max_instances: int = DEFAULT_MAX_INSTANCES,
    max_descriptions: int = DEFAULT_MAX_DESCRIPTIONS,
    overwrite: bool = False,
    progress: bool = True,
) -> ImportReport:
    """Write `out/<name>.json` for each task (see the module docstring); a failed task is reported, not fatal."""
    ni_dir, out = Path(ni_dir), Path(out)
    if not ni_dir.is_dir():
        raise FileNotFoundError(f"natural-instructions folder {ni_dir} not found")
    for name in names:
        if not TASK_NAME_RE.match(name):
            raise ValueError(f"{name!r} is not a Super-NaturalInstructions task name (taskNNN_...)")
    descriptions = t2l_descriptions(t2l_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = ImportReport([], [], {}, {})
    for name in tqdm(names, desc="importing tasks", disable=not progress):
        dest = out / f"{name}.json"
        if dest.exists() and not overwrite:
            report.kept.append(name)
            continue
        try:
            if name not in descriptions:
                raise ValueError(f"no descriptions for {name} in {t2l_dir} (tasks/lol_*/metadata.yaml)")
            task = read_ni_task(_ni_file(ni_dir, name), max_instances)
        except (OSError, ValueError) as e:
            report.failed[name] = str(e)
            continue
        _write_json_atomic(dest, {
            "name": name,
            "definition": task["definition"],
            "categories": task["categories"],
            "descriptions": descriptions[name][:max_descriptions],
            "instances": task["instances"],
            "source": SOURCE.format(name=name),
            "license": LICENSE,
        })
        report.written.append(name)
        report.instances[name] = len(task["instances"])
    return report
