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
