"""The edge middleware (edge.py) around a small app standing in for vLLM's routes: which routes a
client reaches, the raw `model` field, the `/v1/models` rewrite, provenance and Retry-After
headers, in-flight names. The same claims through the real server: tests/test_serve.py."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from loragen_vllm import edge, plugin
from loragen_vllm.edge import EdgeGuard, check_model_field, public_models_list
from loragen_vllm.errors import InvalidDescription
from loragen_vllm.vllm_patches import BoundedLoRARequests

BASE = "SmolLM2-135M-Instruct"


def test_check_model_field() -> None:
    check_model_field(BASE, {BASE}, 10, 1000)  # the base model: any length, not a description
    check_model_field(None, {BASE}, 10, 1000)  # not a string: vLLM's business
    check_model_field("Sum it.", {BASE}, 10, 1000)
    with pytest.raises(InvalidDescription, match=r"too long \(11 bytes; the limit is 10 bytes\)"):
        check_model_field("Sum it." + " " * 4, {BASE}, 10, 1000)  # raw bytes, before normalisation
    with pytest.raises(InvalidDescription, match="too long"):
        check_model_field("\u00e9" * 6, {BASE}, 10, 1000)  # 6 characters, 12 bytes
    with pytest.raises(InvalidDescription, match=r"U\+202E"):
        check_model_field("a\u202eb", {BASE}, 10, 1000)
    started = time.monotonic()
    with pytest.raises(InvalidDescription, match="5242890 bytes"):
        check_model_field("Sum it." + " " * (5 << 20) + "\u202e", {BASE}, 4096, 1000)
    assert time.monotonic() - started < 0.5


def test_models_list_keeps_the_base_model_without_paths() -> None:
    vllm_body = json.dumps({"object": "list", "data": [
        {"id": BASE, "root": "/home/u/.cache/models/SmolLM2", "parent": None, "object": "model"},
        {"id": "Someone else's task.", "root": "/store/adapters/ab12", "parent": BASE, "object": "model"},
    ]}).encode()
    out = json.loads(public_models_list(vllm_body, {BASE}, list_descriptions=False))
    assert out["data"] == [{"id": BASE, "root": BASE, "parent": None, "object": "model"}]
    out = json.loads(public_models_list(vllm_body, {BASE}, list_descriptions=True))
    assert [c["id"] for c in out["data"]] == [BASE, "Someone else's task."]
    assert "/" not in json.dumps(out)
    assert public_models_list(b"not json", {BASE}, False) == b"not json"


def vllm_like_app(seen: list) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        seen.append((body["model"], edge.in_flight(body["model"])))
        if body["model"] == "Overloaded task.":
            return JSONResponse({"error": {"message": "too many pending generations; retry after 7 s"}}, 503)
        return JSONResponse({"model": body["model"]})

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": BASE, "root": "/m/x", "parent": None},
                                           {"id": "A task.", "root": "/s/a", "parent": BASE}]}

    @app.post("/v1/load_lora_adapter")
    async def load() -> dict:
        return {"loaded": True}

    @app.post("/tokenize")
    async def tokenize() -> dict:
        return {"tokens": []}

    @app.get("/health")
    async def health() -> dict:
        return {}

    app.add_middleware(EdgeGuard)
    return app


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("LORAGEN_SERVED_MODEL_NAMES", BASE)
    for name in ("LORAGEN_ADMIN_KEY", "LORAGEN_LIST_DESCRIPTIONS", "LORAGEN_MAX_MODEL_BYTES", "LORAGEN_LORA_MODULES",
                 "LORAGEN_MAX_BODY_BYTES"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_routes_closed_unless_the_admin_key_is_set_and_sent(env: pytest.MonkeyPatch) -> None:
    client = TestClient(vllm_like_app([]))
    assert client.get("/health").status_code == 200
    assert client.post("/v1/load_lora_adapter", json={}).status_code == 403
    assert client.post("/tokenize").status_code == 404
    assert client.get("/v1/chat/completions").status_code == 404  # wrong method
    assert client.post("/v1/load_lora_adapter", headers={"X-LoRAGen-Admin-Key": ""}).status_code == 403
    env.setenv("LORAGEN_ADMIN_KEY", "s3cret")
    client = TestClient(vllm_like_app([]))
    assert client.post("/v1/load_lora_adapter", headers={"X-LoRAGen-Admin-Key": "wrong"}).status_code == 403
    assert client.post("/v1/load_lora_adapter", headers={"X-LoRAGen-Admin-Key": "s3cret"}).json() == {"loaded": True}
    assert client.post("/tokenize", headers={"x-loragen-admin-key": "s3cret"}).status_code == 200


def test_a_body_over_the_limit_is_413_and_never_read_whole(env: pytest.MonkeyPatch) -> None:
    """The edge reads chat bodies whole to check `model`: one over LORAGEN_MAX_BODY_BYTES is a 413,
    refused on its Content-Length, or while streamed without one once the bytes read pass the limit;
    vLLM never sees it. A body at the limit passes."""
    env.setenv("LORAGEN_MAX_BODY_BYTES", "1000")
    seen: list = []
    app = vllm_like_app(seen)
    client = TestClient(app)

    def chat(n: int) -> dict:
        return {"model": "A task.", "messages": [{"role": "user", "content": "x" * n}]}

    at_limit = json.dumps(chat(0)).encode()
    at_limit = json.dumps(chat(1000 - len(at_limit))).encode()
    assert len(at_limit) == 1000 and client.post("/v1/chat/completions", content=at_limit).status_code == 200
    r = client.post("/v1/chat/completions", content=at_limit + b" ")
    assert r.status_code == 413 and "over 1000 bytes (LORAGEN_MAX_BODY_BYTES)" in r.json()["error"]["message"]
    assert len(seen) == 1

    reads: list[int] = []  # chunks a streamed body (no Content-Length) gave the edge

    async def streamed() -> list[dict]:
        sent: list[dict] = []
        chunks = iter([b"{" + b" " * 399] * 100)  # 40 kB, 400 bytes a chunk

        async def receive() -> dict:
            reads.append(1)
            return {"type": "http.request", "body": next(chunks), "more_body": True}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "root_path": ""}
        await EdgeGuard(app)(scope, receive, send)
        return sent

    sent = asyncio.run(streamed())
    assert sent[0]["status"] == 413 and len(reads) == 3 and len(seen) == 1  # stopped at the third chunk
    env.setenv("LORAGEN_MAX_BODY_BYTES", "0")
    with pytest.raises(ValueError, match="LORAGEN_MAX_BODY_BYTES"):
        EdgeGuard(app)


def test_admin_load_of_an_adapter_with_other_modules_is_refused(env: pytest.MonkeyPatch, tmp_path) -> None:
    """serve restricts vLLM's LoRA to the generator's modules (LORAGEN_LORA_MODULES): an adapter
    with weights elsewhere, or whose weights cannot be read, would be served without them, so its
    load is a 400 naming them; one within the layers (k_proj: vLLM's packed qkv layer) loads."""
    from benchmarks.serving.oracles import write_random_adapters
    from loragen_vllm.lora_modules import lora_layers, lora_weight_modules

    env.setenv("LORAGEN_ADMIN_KEY", "s3cret")
    env.setenv("LORAGEN_LORA_MODULES", "q_proj,v_proj")
    admin = {"X-LoRAGen-Admin-Key": "s3cret"}
    client = TestClient(vllm_like_app([]))

    def adapter(name: str, modules: tuple[str, ...]):
        return write_random_adapters(tmp_path / name, 1, None, None, None, 0, modules=modules)[0]

    qv, kv, with_o = adapter("qv", ("q_proj", "v_proj")), adapter("kv", ("k_proj",)), adapter("o", ("v_proj", "o_proj"))
    assert lora_weight_modules(with_o) == {"v_proj", "o_proj"} and lora_weight_modules(tmp_path) is None
    assert lora_layers(["q_proj"]) == {"q_proj", "k_proj", "v_proj", "qkv_proj"}
    assert lora_layers(["up_proj", "o_proj"]) == {"gate_proj", "up_proj", "gate_up_proj", "o_proj"}
    for bad in (b"\xff" * 64, (8).to_bytes(8, "little") + b"[1, 2]  ",  # huge size; a header not a dict
                (20_000).to_bytes(8, "little") + b"[" * 10_000 + b"]" * 10_000):  # nested past recursion
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(bad)
        assert lora_weight_modules(tmp_path / "bad") is None
    env.setenv("HOME", str(tmp_path))
    assert lora_weight_modules("~/o/random-0000") == {"v_proj", "o_proj"}  # ~ as vLLM expands it

    def load(body: object):
        return client.post("/v1/load_lora_adapter", headers=admin, json=body)

    r = load({"lora_name": "o", "lora_path": str(with_o)})
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    msg = r.json()["error"]["message"]
    assert "weights for o_proj" in msg and "--lora-target-modules q_proj v_proj o_proj" in msg
    assert load({"lora_name": "o", "lora_path": "~/o/random-0000"}).status_code == 400
    for path in (tmp_path / "missing", tmp_path / "bad", "some-org/some-hub-adapter"):
        r = load({"lora_name": "x", "lora_path": str(path)})
        assert r.status_code == 400 and "cannot tell which layers" in r.json()["error"]["message"]
    for body in ({"lora_name": "qv", "lora_path": str(qv)}, {"lora_name": "kv", "lora_path": str(kv)},
                 {"lora_name": "x"}, ["not", "a", "dict"]):  # fits; fits (packed); vLLM's own errors
        assert load(body).json() == {"loaded": True}
    nested = client.post("/v1/load_lora_adapter", headers={**admin, "content-type": "application/json"},
                         content=b'{"lora_name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert nested.status_code == 400 and "nested too deeply" in nested.json()["error"]["message"]
    env.setenv("LORAGEN_LORA_MODULES", "")  # every layer: nothing to refuse
    client = TestClient(vllm_like_app([]))
    assert load({"lora_name": "o", "lora_path": str(with_o)}).json() == {"loaded": True}


def test_raw_model_field_is_bounded_and_validated_before_the_app(env: pytest.MonkeyPatch) -> None:
    seen: list = []
    client = TestClient(vllm_like_app(seen))
    r = client.post("/v1/chat/completions", json={"model": "Sum it." + " " * (5 << 20), "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model" and len(r.content) < 500
    r = client.post("/v1/chat/completions", json={"model": "Sum\u202e it.", "messages": []})
    assert r.status_code == 400 and "U+202E" in r.json()["error"]["message"]
    assert seen == []  # the app never saw either
    assert client.post("/v1/chat/completions", json={"model": "Sum it.", "messages": []}).status_code == 200
    assert seen == [("Sum it.", True)]  # in flight while the app answers it
    nested = b'{"model": "Sum it.", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # past json's recursion
    r = client.post("/v1/chat/completions", content=nested, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]  # not a 500
    assert seen == [("Sum it.", True)]  # the app never saw it
    assert not edge.in_flight("Sum it.")  # and no longer after


def test_models_listing_and_opt_in(env: pytest.MonkeyPatch) -> None:
    assert [c["id"] for c in TestClient(vllm_like_app([])).get("/v1/models").json()["data"]] == [BASE]
    env.setenv("LORAGEN_LIST_DESCRIPTIONS", "1")
    r = TestClient(vllm_like_app([])).get("/v1/models")
    assert [c["id"] for c in r.json()["data"]] == [BASE, "A task."] and "/" not in r.text


def test_provenance_and_retry_after_headers(env: pytest.MonkeyPatch) -> None:
    env.setattr(plugin, "adapter_of", lambda name: ("k" * 64, "f" * 64) if name == "Sum it." else None,
                raising=False)
    client = TestClient(vllm_like_app([]))
    r = client.post("/v1/chat/completions", json={"model": "Sum it.", "messages": []})
    assert r.headers["x-loragen-adapter"] == f"{'k' * 64}; generator={'f' * 64}"
    assert "x-loragen-adapter" not in client.post("/v1/chat/completions", json={"model": BASE}).headers
    r = client.post("/v1/chat/completions", json={"model": "Overloaded task.", "messages": []})
    assert r.status_code == 503 and r.headers["retry-after"] == "7" and "retry after 7 s" in r.text


def test_lru_keeps_names_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """What vllm_patches installs (evict only names not in flight; trim when a name's last
    request ends) keeps an in-flight name, and drops it once its request is answered."""
    monkeypatch.setattr(edge, "_idle_listeners", [])

    async def main() -> None:
        table: BoundedLoRARequests[int] = BoundedLoRARequests(2, evictable=lambda n: not edge.in_flight(n))
        edge.add_idle_listener(lambda name: table.trim())
        table["busy"] = 0
        entered, release = asyncio.Event(), asyncio.Event()

        async def app(scope, receive, send) -> None:
            entered.set()
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        guard = EdgeGuard(app)
        body = json.dumps({"model": "busy", "messages": []}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message) -> None:
            pass

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
        request = asyncio.create_task(guard(scope, receive, send))
        await entered.wait()
        for i in range(5):  # other names come and go while "busy" is answered
            table[f"other {i}"] = i
        assert "busy" in table
        assert len(table) == 3
        release.set()
        await request
        assert "busy" not in table and len(table) == 2

    asyncio.run(main())
