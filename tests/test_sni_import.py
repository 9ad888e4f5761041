"""`python -m generator import-sni`: task files built from copies in the sources' own formats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from generator.data.sni import load_sni_task
from generator.data.sni_import import import_tasks, read_ni_task, read_task_list

ROOT = Path(__file__).resolve().parents[1]


def _ni_task(n: int) -> dict:
    return {
        "Contributors": ["x"],
        "Source": ["synthetic"],
        "Categories": ["Answer Generation", "Arithmetic"],
        "Definition": ["Add one to the number."],
        "Positive Examples": [{"input": "1", "output": "2", "explanation": "1 + 1 = 2"}],
        "Negative Examples": [],
        "Instances": [{"id": f"task900-{i}", "input": str(i % (n - 1)), "output": [str(i % (n - 1) + 1)]}
                      for i in range(n)],  # the last input repeats the first
        "Instance License": ["Apache 2.0"],
    }


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, Path]:
    ni, t2l = tmp_path / "natural-instructions", tmp_path / "text-to-lora"
    (ni / "tasks").mkdir(parents=True)
    (ni / "tasks" / "task900_add_one.json").write_text(json.dumps(_ni_task(6), indent=4))
    cut = json.dumps(_ni_task(50), indent=4)
    (ni / "tasks" / "task901_add_one_cut.json").write_text(cut[: cut.index('"task900-20"') + 5])  # a prefix
    for folder, name in (("lol_900", "task900_add_one"), ("lol_task901_add_one_cut", "task901_add_one_cut")):
        (t2l / "tasks" / folder).mkdir(parents=True)
        (t2l / "tasks" / folder / "metadata.yaml").write_text(
            f"task_name: Lots-of-LoRAs/{name}\ndescriptions:\n- Increment the given integer.\n"
            "- Return the number that follows\n  the one you are given.\n- Increment the given integer. \n"  # a repeat
        )
    return ni, t2l


def test_import_writes_loadable_task_files(sources, tmp_path):
    ni, t2l = sources
    out = tmp_path / "tasks"
    report = import_tasks(ni, t2l, ["task900_add_one", "task901_add_one_cut"], out, progress=False)
    assert report.written == ["task900_add_one", "task901_add_one_cut"] and not report.failed
    t = load_sni_task(out / "task900_add_one.json")
    assert (out / "task900_add_one.json").stat().st_mode & 0o777 == 0o644  # readable by others
    assert t.definition == "Add one to the number."
    assert t.categories == ("Answer Generation", "Arithmetic")
    assert t.descriptions == ("Increment the given integer.", "Return the number that follows the one you are given.")
    assert [x.input for x in t.instances] == ["0", "1", "2", "3", "4"]  # file order, repeated input dropped
    assert t.instances[0].outputs == ("1",)
    # a copy cut inside instance 20: the 20 complete instances before it
    assert len(load_sni_task(out / "task901_add_one_cut.json").instances) == 20
    # extending: existing files are kept unless overwritten
    again = import_tasks(ni, t2l, ["task900_add_one"], out, progress=False)
    assert again.kept == ["task900_add_one"] and not again.written


def test_import_caps_instances(sources, tmp_path):
    ni, _ = sources
    assert len(read_ni_task(ni / "tasks" / "task901_add_one_cut.json", max_instances=7)["instances"]) == 7


def test_missing_sources_are_reported_per_task(sources, tmp_path):
    ni, t2l = sources
    report = import_tasks(ni, t2l, ["task900_add_one", "task999_absent"], tmp_path / "tasks", progress=False)
    assert report.written == ["task900_add_one"]
    assert "no descriptions for task999_absent" in report.failed["task999_absent"]
    assert not (tmp_path / "tasks" / "task999_absent.json").exists()
    with pytest.raises(FileNotFoundError, match="text-to-lora folder"):
        import_tasks(ni, tmp_path / "no-t2l", ["task900_add_one"], tmp_path / "tasks", progress=False)


def test_task_names_are_names_not_paths(sources, tmp_path):
    ni, t2l = sources
    with pytest.raises(ValueError, match="not a Super-NaturalInstructions task name"):
        import_tasks(ni, t2l, ["../../etc/passwd"], tmp_path / "tasks", progress=False)
    bad = tmp_path / "list.txt"
    bad.write_text("task900_add_one\n/abs/task1\n")
    with pytest.raises(ValueError, match="list.txt:2"):
        read_task_list(bad)


def test_cli(sources, tmp_path):
    ni, t2l = sources
    lst = tmp_path / "list.txt"
    lst.write_text("# two tasks\ntask900_add_one\ntask901_add_one_cut\n")
    cmd = [sys.executable, "-m", "generator", "import-sni", "--natural-instructions", str(ni), "--t2l", str(t2l),
           "--tasks", str(lst), "--out", str(tmp_path / "tasks"), "--no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["written"] == 2
    lst.write_text("task999_absent\n")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "failed: task999_absent" in r.stderr
