"""Summary statistics and the serving targets (pure functions over numbers; no I/O).

Latencies are in seconds. Percentiles use numpy's linear interpolation; with few samples
p99 is close to the maximum, so every summary also carries its sample count `n`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

PERCENTILES = (50, 95, 99)


def summarize(values: Sequence[float | None]) -> dict:
    """n, mean, p50/p95/p99, min, max of the finite values (None where there are none)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"n": 0, "mean": None, **{f"p{p}": None for p in PERCENTILES}, "min": None, "max": None}
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        **{f"p{p}": float(np.percentile(v, p)) for p in PERCENTILES},
        "min": float(v.min()),
        "max": float(v.max()),
    }


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing or den is not positive."""
    if num is None or den is None or not den > 0:
        return None
    return float(num) / float(den)


def bootstrap_ratio_ci(
    num: Sequence[float], den: Sequence[float], stat: str = "p50", n_boot: int = 2000,
    level: float = 0.95, seed: int = 0,
) -> tuple[float, float] | None:
    """Confidence interval of stat(num) / stat(den) by resampling both samples independently.

    `stat` is "p50", "p95" or "mean". None when a sample has fewer than 2 values.
    """
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if a.size < 2 or b.size < 2:
        return None
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, a.size, size=(n_boot, a.size))
    ib = rng.integers(0, b.size, size=(n_boot, b.size))

    def f(x: np.ndarray) -> np.ndarray:  # x: (n_boot, n) -> (n_boot,)
        return x.mean(axis=1) if stat == "mean" else np.percentile(x, float(stat[1:]), axis=1)

    r = f(a[ia]) / f(b[ib])
    lo, hi = np.percentile(r, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def throughput(output_tokens: Sequence[int], wall_s: float) -> float | None:
    """Aggregate output tokens per second over a phase of `wall_s` seconds."""
    return float(sum(output_tokens)) / wall_s if wall_s > 0 else None


def target_verdict(name: str, measured: float | None, limit: float, higher_is_better: bool = False) -> dict:
    """How a measured ratio stands against its limit.

    `margin_pct` is positive when the target is met (headroom, as a share of the limit) and
    negative when missed (by how much the measurement overshoots the limit).
    """
    if measured is None:
        return {"target": name, "limit": limit, "measured": None, "met": None, "margin_pct": None}
    met = measured >= limit if higher_is_better else measured <= limit
    margin = (measured / limit - 1.0) if higher_is_better else (1.0 - measured / limit)
    return {"target": name, "limit": limit, "measured": measured, "met": bool(met),
            "margin_pct": 100.0 * margin}


def dominant_component(parts: dict[str, float | None]) -> tuple[str, float] | None:
    """The largest non-negative part and its share of the sum of parts."""
    items = {k: v for k, v in parts.items() if v is not None and v > 0}
    if not items:
        return None
    total = sum(items.values())
    k = max(items, key=items.get)
    return k, items[k] / total
