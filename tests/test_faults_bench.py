"""Quick checks of the fault run's tooling (benchmarks/faults): no server, no generator."""
from __future__ import annotations

import os

import numpy as np
from safetensors.numpy import save

from benchmarks.faults import injectors, report
from benchmarks.faults.client import Answer, parse_adapter_header
from benchmarks.faults.ledger import Ledger, verify_store
from benchmarks.faults.sampling import rss_kib
from loragen_vllm.store import AdapterStore

FP = "f" * 64


def _publish(store: AdapterStore, desc: str, fill: float = 1.0) -> str:
    weights = save({"a": np.full((64, 32), fill, dtype=np.float32)})
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": weights}
    return store.publish(files, description=desc, fingerprint=FP, seed=0, generator_kind="test").key


def test_adapter_header_parsing():
    key = "a" * 64
    assert parse_adapter_header(f"{key}; generator={FP}") == (key, FP)
    assert parse_adapter_header(None) is None
    assert parse_adapter_header("abc; generator=x") is None
    assert parse_adapter_header(key) is None


def test_rss_of_this_process_is_counted():
    assert rss_kib(os.getpid()) > 1000


def test_ledger_kept_regenerated_and_lost(tmp_path):
    store = AdapterStore(tmp_path / "s", max_adapters=None, max_bytes=None, sync="inline")
    ledger = Ledger(store.root)
    keys = {d: _publish(store, d) for d in ("Task one.", "Task two.", "Task three.", "Task four.")}
    for d, k in keys.items():
        ledger.record(d, "mixed", Answer("200", None, 0.1, f"{k}; generator={FP}"))
    assert all(e.files for e in ledger.entries.values())
    injectors.corrupt_adapter(store.path(keys["Task two."]), "flip")  # corrupt in place
    store.rm(keys["Task three."])  # gone; regenerated identically when asked
    store.rm(keys["Task four."])  # gone; regenerated with other numbers: lost

    def ask(desc: str) -> Answer:
        k = _publish(store, desc, fill=2.0 if desc == "Task four." else 1)
        return Answer("200", None, 0.1, f"{k}; generator={FP}")

    got = ledger.check(ask, sample_gone=0, always_phases=("mixed",))
    assert got["in_store_verified"] == 1 and got["in_store_corrupt"] == 1
    assert got["regenerated_identical"] == 1 and got["regenerated_different"] == 1
    assert got["lost"] == 2 and got["answered"] == 4
    assert len(verify_store(store.root)["corrupt"]) == 1


def test_memory_growth_uses_the_first_sample_after_warmup():
    samples = [{"phase": "soak", "soak_done": n, "rss_mib": r, "t": n} for n, r in ((0, 90), (10, 100), (20, 105), (30, 104))]
    g = report.memory_growth(samples, warmup_n=10)
    assert g["after_warmup"]["rss_mib"] == 100 and g["growth_pct"] == 4.0 and g["max_growth_pct"] == 5.0


def test_the_memory_target_counts_answered_descriptions_only():
    res = {"faults": {"soak": {"answered": 9000, "failed": 1000}}, "requests_past_deadline": 0,
           "memory": {"growth_pct": 2.0}}
    t3 = report.targets(res, goal_n=10000)["memory growth under 10% over 10,000 distinct descriptions after warm-up"]
    assert t3 == "met over 9000 descriptions answered (+2.00 %); the run reached 9000, not 10000; 1000 soak requests failed"


def test_same_numbers_tolerates_rounding_only():
    from benchmarks.faults.ledger import same_numbers

    a = {"t": [1.0, 2.0, 0.5, 0.25]}
    assert same_numbers(a, {"t": [1.0 + 1e-7, 2.0, 0.5 + 2e-7, 0.25]})
    assert not same_numbers(a, {"t": [1.1, 2.0, 0.5, 0.25]})
    assert not same_numbers(a, None)
