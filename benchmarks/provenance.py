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


def provenance(command: str | None = None) -> dict[str, str | None]:
    """What made a result: the command (default: this process's), the commit, the machine, the date (UTC)."""
    import datetime as dt
    import platform
    import sys

    machine = platform.node()
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
    return {"command": command,
            "commit": git_commit(), "machine": machine,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")}
