"""Argparse value types of the command line: sizes, counts and numbers with their bounds, devices,
output folders.

Each turns a bad value into argparse's usage error (exit 2, the option named) instead of a
traceback or a setting that never fires (``inf`` seconds, a window no pass ends).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path


def parse_bytes(text: str) -> int:
    """``"4G"``, ``"512MiB"``, ``"1000"`` -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    number = t[:-1] if scale > 1 else t
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 4G)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 4G)")
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size cannot be negative: {text!r}")
    return int(value * scale)


def _bounds(minimum: float, maximum: float | None, above: bool) -> str:
    low = f"above {minimum:g}" if above else f"at least {minimum:g}"
    return f"{low} and at most {maximum:g}" if maximum is not None else low


def count(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An integer from `minimum` to `maximum` (if given)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {_bounds(minimum, maximum, False)}, got {value}")
        return value
    return parse


def number(minimum: float = 0.0, maximum: float | None = None, above: bool = False) -> Callable[[str], float]:
    """A finite number of at least `minimum` (`above`: more than it) and at most `maximum`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        low_ok = value > minimum if above else value >= minimum
        if not math.isfinite(value) or not low_ok or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be a finite number {_bounds(minimum, maximum, above)}, got {text!r}")
        return value
    return parse


def device(text: str) -> str:
    """A torch device string that names a device this machine has (``cpu``, ``cuda``, ``cuda:1``)."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no such CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: use cpu or cuda")
    return text


def empty_folder(text: str) -> Path:
    """A folder to write into that does not exist yet or is empty: what a command writes never
    replaces files (an adapter, a checkpoint, one of a soup's own sources)."""
    path = Path(text)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise argparse.ArgumentTypeError(f"{text} exists and is not an empty folder: nothing is ever replaced")
    return path
