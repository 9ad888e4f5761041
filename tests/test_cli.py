"""The ``loragen-vllm`` console script, run as a real subprocess: store commands on a store
filled by real publishes, bad input (clear message, non-zero exit, no traceback), and
``generate`` end to end with a tiny trained generator."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loragen_vllm.cli import build_parser, split_vllm_args
from loragen_vllm.defaults import default_generator_checkpoint
from loragen_vllm.store import AdapterStore

FP = "c" * 64
DESCRIPTIONS = [
    "Classify the sentiment of a movie review as positive or negative.",
    "Translate English sentences into French.",
    "Summarise a news article in one sentence.",
]


def _script() -> str:
    found = Path(sys.executable).parent / "loragen-vllm"
    return str(found) if found.exists() else shutil.which("loragen-vllm") or "loragen-vllm"


def run(*args: str, store: Path | None = None, env: dict[str, str] | None = None):
    """Run the console script; return the CompletedProcess (text)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGEN_")}
    if store is not None:
        full_env["LORAGEN_STORE"] = str(store)
    full_env.update(env or {})
    return subprocess.run([_script(), *args], capture_output=True, text=True, env=full_env,
                          timeout=300)


def assert_clean_failure(proc, code: int, *fragments: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.startswith("loragen-vllm: error: ") or proc.stderr.startswith("usage:")
    for f in fragments:
        assert f in proc.stderr, proc.stderr


@pytest.fixture
def store_dir(tmp_path) -> Path:
    """A store with three adapters published through the store API, used in a known order."""
    store = AdapterStore(tmp_path / "store", max_adapters=None, max_bytes=None)
    for i, d in enumerate(DESCRIPTIONS):
        store.publish(
            {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": bytes([i]) * 5000},
            description=d, fingerprint=FP, seed=0, generator_kind="t2l",
        )
    for d in DESCRIPTIONS:  # last_used order: DESCRIPTIONS[2] most recent
        time.sleep(0.02)
        store.get(store.key(d, FP, 0))
    return store.root


def key_of(description: str) -> str:
    return AdapterStore.key(description, FP, 0)


# ----------------------------------------------------------------------------------------------
# store commands


def test_store_ls_table_and_json(store_dir):
    table = run("store", "ls", store=store_dir)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("KEY") and len(lines) == 4
    assert [line[:12] for line in lines[1:]] == [key_of(d)[:12] for d in reversed(DESCRIPTIONS)]
    assert "Translate English sentences into French." in table.stdout
    assert "3 adapters" in table.stderr

    as_json = run("store", "ls", "--json", "--store", str(store_dir))  # --store flag, no env
    assert as_json.returncode == 0, as_json.stderr
    entries = json.loads(as_json.stdout)
    assert [e["key"] for e in entries] == [key_of(d) for d in reversed(DESCRIPTIONS)]
    assert all(e["hits"] == 1 and e["fingerprint"] == FP and e["pins"] == [] for e in entries)
    assert all(Path(e["path"]).is_dir() for e in entries)


def test_store_show_by_prefix(store_dir):
    key = key_of(DESCRIPTIONS[0])
    shown = run("store", "show", key[:8], store=store_dir)
    assert shown.returncode == 0, shown.stderr
    assert key in shown.stdout and DESCRIPTIONS[0] in shown.stdout
    assert "adapter_model.safetensors" in shown.stdout and "sha256" in shown.stdout
    meta = json.loads(run("store", "show", key, "--json", store=store_dir).stdout)
    assert meta["key"] == key and meta["description"] == DESCRIPTIONS[0]
    assert meta["files"]["adapter_model.safetensors"]["size"] == 5000


def test_store_rm_refuses_pinned_unless_forced(store_dir):
    key = key_of(DESCRIPTIONS[1])
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        AdapterStore(store_dir).pin(key, holder=holder.pid)  # a "running server"
        refused = run("store", "rm", key[:10], store=store_dir)
        assert_clean_failure(refused, 1, "pinned", f"pid {holder.pid}", "--force")
        assert key in AdapterStore(store_dir).keys()
        forced = run("store", "rm", key[:10], "--force", store=store_dir)
        assert forced.returncode == 0 and f"removed {key}" in forced.stdout
        assert key not in AdapterStore(store_dir).keys()
    finally:
        holder.kill()
        holder.wait()


def test_store_gc_evicts_least_recently_used(store_dir):
    gc = run("store", "gc", "--max-adapters", "1", store=store_dir)
    assert gc.returncode == 0, gc.stderr
    assert "evicted 2 adapters" in gc.stdout
    assert AdapterStore(store_dir).keys() == [key_of(DESCRIPTIONS[2])]
    report = json.loads(run("store", "gc", "--max-bytes", "1K", "--json", store=store_dir).stdout)
    assert report["evicted"] == [key_of(DESCRIPTIONS[2])] and report["count"] == 0


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("args", "code", "fragments"),
    [
        (("store", "show", "0000ffff"), 1, ("no stored adapter",)),
        (("store", "show", "zz"), 1, ("4-64 hex digits",)),
        (("store", "rm", "../../etc"), 1, ("not an adapter key",)),
        (("store", "gc", "--max-bytes", "lots"), 2, ("not a size",)),
        (("store", "gc", "--max-bytes", "inf"), 2, ("not a size: 'inf'",)),
        (("store", "gc", "--max-adapters", "-3"), 2, ("--max-adapters: must be at least 0, got -3",)),
        (("serve", "--max-resolved", "0"), 2, ("--max-resolved: must be at least 1, got 0",)),
        (("serve", "--port", "70000"), 2, ("--port: must be at least 1 and at most 65535",)),
        (("generator", "start", "--batch-window-ms", "inf"), 2, ("--batch-window-ms: must be a finite number",)),
        (("generator", "status", "--timeout", "0"), 2, ("--timeout: must be a finite number above 0",)),
        (("generate", "   "), 2, ("whitespace only",)),
        (("generate", "bad \x1b[31m colour"), 2, ("control character (U+001B)",)),
        (("generate", "x" * 1001), 2, ("too long",)),
        (("generate", "ok text", "--generator", "/nonexistent/ckpt"), 2,
         ("not a generator checkpoint",)),
        (("generate", "ok text", "--device", "bogus"), 2, ("not a torch device: 'bogus'",)),
        (("serve", "--device", "bogus"), 2, ("--device: not a torch device",)),
        (("serve", "--store", "/etc/hostname"), 2, ("--store /etc/hostname: cannot hold the adapter store",)),
        (("store", "frobnicate"), 2, ("invalid choice",)),
        (("store", "ls", "--store", "/nonexistent/store"), 2, ("no adapter store at /nonexistent/store",)),
        (("store", "gc", "--store", "/etc/hostname"), 2, ("is a file, not a store folder",)),
        (("serve", "--generator", "/nonexistent/ckpt"), 2, ("--generator:", "not found")),
        (("serve", "--base-model", "/nonexistent/model"), 2, ("not a Hugging Face model folder",)),
        (("generator", "status", "--ray-address", "127.0.0.1:1"), 2,
         ("cannot connect to the Ray cluster at 127.0.0.1:1",)),
    ],
)
def test_bad_input_gets_a_clear_message(store_dir, args, code, fragments):
    assert_clean_failure(run(*args, store=store_dir), code, *fragments)


def test_bad_seed_in_environment_is_reported(tmp_path):
    proc = run("generate", "A fine task.", store=tmp_path, env={"LORAGEN_SEED": "abc"})
    assert_clean_failure(proc, 2, "LORAGEN_SEED must be an integer")


def test_serve_stops_at_start_on_any_bad_setting(tmp_path):
    """A setting the server reads only later (the store's pin lease) is checked at start."""
    proc = run("serve", store=tmp_path, env={"LORAGEN_PIN_LEASE_S": "inf"})
    assert_clean_failure(proc, 2, "LORAGEN_PIN_LEASE_S must be a number > 0")


def test_generate_uses_the_shipped_default_checkpoint(tmp_path):
    shipped = default_generator_checkpoint()
    assert shipped is not None and shipped.name == "default", "the trained default checkpoint must ship"
    proc = run("generate", "Classify the sentiment of a movie review as positive or negative.", "--json",
               store=tmp_path)
    assert proc.returncode == 0, proc.stderr
    fingerprint = json.loads((shipped / "config.json").read_text())["fingerprint"]
    assert json.loads(proc.stdout)["fingerprint"] == fingerprint


def test_an_explicit_generator_path_that_is_wrong_fails_loudly(tmp_path):
    proc = run("generate", "A fine task.", store=tmp_path, env={"LORAGEN_GENERATOR": str(tmp_path / "nope")})
    assert_clean_failure(proc, 2, "not a generator checkpoint")


def test_serve_arguments_and_vllm_passthrough():
    argv, extra = split_vllm_args(
        ["serve", "--port", "9000", "--ray-address", "127.0.0.1:6379", "--",
         "--max-loras", "4", "--enforce-eager"])
    args = build_parser().parse_args(argv)
    assert (args.port, args.ray_address, args.host) == (9000, "127.0.0.1:6379", "127.0.0.1")
    assert args.seed is None  # unset: the server's $LORAGEN_SEED (or 0) applies
    assert args.base_model is None and args.generator is None and args.store is None
    assert args.device is None and args.max_resolved is None  # serve.run's own defaults apply
    assert extra == ["--max-loras", "4", "--enforce-eager"]
    assert split_vllm_args(["generate", "--", "-leading dash"]) == (
        ["generate", "--", "-leading dash"], [])


# ----------------------------------------------------------------------------------------------
# generate, end to end


def test_generate_publishes_a_verified_adapter(tiny_generator_ckpt, tmp_path):
    text = "  Answer   questions about   biology. "
    proc = run("generate", text, "--generator", str(tiny_generator_ckpt), "--json",
               store=tmp_path / "store")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    fingerprint = json.loads((Path(tiny_generator_ckpt) / "config.json").read_text())["fingerprint"]
    assert out["generated"] is True and out["fingerprint"] == fingerprint
    assert out["key"] == AdapterStore.key("Answer questions about biology.", fingerprint, 0)
    store = AdapterStore(tmp_path / "store")
    stored = store.get(out["key"])  # sha256 of every file checked
    assert stored is not None and str(stored.path) == out["path"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(stored.meta.files)
    assert stored.meta.description == "Answer questions about biology."
    config = json.loads((stored.path / "adapter_config.json").read_text())
    assert config["r"] > 0 and set(config["target_modules"]) >= {"q_proj", "v_proj"}


def test_store_commands_do_not_import_vllm_or_torch():
    code = ("import sys; from loragen_vllm.cli import build_parser; build_parser(); "
            "heavy = {'vllm', 'torch', 'ray', 'transformers'} & set(sys.modules); "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
