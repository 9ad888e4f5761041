"""The commit a result measured, in one place for every benchmark.

``$LORAGEN_COMMIT`` wins where it is set: a working tree copied to a lent GPU machine has no
history of its own (a stale ``.git`` there once reported the wrong commit); the GPU scripts set
it from ``.devtools/COMMIT`` (``benchmarks/device_env.sh``). Otherwise git's HEAD of this checkout.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """$LORAGEN_COMMIT, else HEAD of the checkout, else None (no git, no checkout)."""
    if os.environ.get("LORAGEN_COMMIT"):
        return os.environ["LORAGEN_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def git_dirty() -> tuple[bool | None, list[str]]:
    """Whether tracked files differ from the commit `git_commit` names, and the first 20 of them;
    None where $LORAGEN_COMMIT names it (no checkout of its own to compare) or git cannot tell."""
    if os.environ.get("LORAGEN_COMMIT"):
        return None, []
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None, []
    return bool(out.stdout.strip()), out.stdout.splitlines()[:20]


def cpu_name() -> str | None:
    """The CPU's model name (/proc/cpuinfo), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def provenance(command: str | None = None) -> dict[str, str | bool | list[str] | None]:
    """What made a result: the command (default: this process's), the commit and whether the
    working tree differed from it (`dirty`, `dirty_files`), the machine (the GPU, else the CPU
    and its cores), the date (UTC). Call it when the measurement starts."""
    import datetime as dt
    import sys

    machine = f"{os.cpu_count()}-core {cpu_name() or 'CPU'}"
    try:
        import torch

        if torch.cuda.is_available():
            machine = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    if command is None:  # `python -m a.b` runs a/b/__main__.py or a/b.py: name the module, not the file
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name.removesuffix(".__main__") if spec is not None else None
        command = " ".join(["python -m", module] if module else ["python", sys.argv[0]]) + "".join(
            " " + a for a in sys.argv[1:])
    dirty, files = git_dirty()
    return {"command": command, "commit": git_commit(), "dirty": dirty, "dirty_files": files, "machine": machine,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")}
