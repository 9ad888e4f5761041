"""Chats shaped by their description (middleware.py): the system prompt and answers among named
labels, the body rewrite, and the ASGI middleware around a small app that echoes what it received.
That vLLM's server gets the rewritten chat is tested through the real server in tests/test_serve.py."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from loragen_vllm.middleware import DescriptionChat, shape_chat

BASE = {"SmolLM2-135M-Instruct"}
USER = {"role": "user", "content": "A wonderful film."}


def rewrite(request: object) -> object:
    return json.loads(shape_chat(json.dumps(request).encode(), BASE))


def test_a_description_becomes_the_first_system_message_normalised() -> None:
    out = rewrite({"model": "  Classify   the sentiment. ", "messages": [USER], "max_tokens": 3})
    assert out["messages"] == [{"role": "system", "content": "Classify the sentiment."}, USER]
    assert out["model"] == "  Classify   the sentiment. " and out["max_tokens"] == 3  # the rest unchanged


@pytest.mark.parametrize(
    "request_",
    [
        {"model": "SmolLM2-135M-Instruct", "messages": [USER]},  # the base model
        {"model": "Classify.", "messages": [{"role": "system", "content": "Be brief."}, USER]},
        {"model": "Classify.", "messages": [{"role": "developer", "content": "Be brief."}, USER]},
        {"model": "x" * 5000, "messages": [USER]},  # invalid: the resolver answers 400
        {"model": "bad\u202e", "messages": [USER]},
        {"model": 42, "messages": [USER]},
        {"model": "Classify.", "messages": "not a list"},
        ["not", "an", "object"],
    ],
    ids=["base", "own-system", "own-developer", "too-long", "bidi", "not-a-string", "bad-messages", "not-object"],
)
def test_other_bodies_pass_unchanged(request_: object) -> None:
    body = json.dumps(request_).encode()
    assert shape_chat(body, BASE) is body
    assert shape_chat(b"{not json", BASE) == b"{not json"
    nested = b'{"model": "Sum it.", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # past json's recursion
    assert shape_chat(nested, BASE) is nested


def echo_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    async def echo(request: Request) -> dict:
        body = await request.body()
        assert int(request.headers["content-length"]) == len(body)  # fixed after the rewrite
        return json.loads(body)

    app.add_middleware(DescriptionChat)
    return app


def test_middleware_rewrites_chat_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAGEN_SERVED_MODEL_NAMES", "SmolLM2-135M-Instruct")
    monkeypatch.delenv("LORAGEN_DESCRIPTION_SYSTEM_PROMPT", raising=False)  # the defaults, whatever is inherited
    monkeypatch.delenv("LORAGEN_LABEL_CHOICE", raising=False)
    client = TestClient(echo_app())
    got = client.post("/v1/chat/completions", json={"model": "Summarise it.", "messages": [USER]}).json()
    assert got["messages"][0] == {"role": "system", "content": "Summarise it."}
    got = client.post("/v1/chat/completions", json={"model": "SmolLM2-135M-Instruct", "messages": [USER]}).json()
    assert got["messages"] == [USER]
    got = client.post("/v1/completions", json={"model": "Summarise it.", "prompt": "x"}).json()
    assert got == {"model": "Summarise it.", "prompt": "x"}


NAMED = 'Classify the sentiment of a review. Answer with one of: "NEG", "POS".'


def test_a_description_naming_labels_restricts_the_answer_to_them() -> None:
    def shaped(request: dict, **kw) -> dict:
        return json.loads(shape_chat(json.dumps(request).encode(), BASE, **kw))

    out = shaped({"model": NAMED, "messages": [USER]}, label_choice=True)
    assert out["structured_outputs"] == {"choice": ["NEG", "POS"]}
    assert out["messages"][0] == {"role": "system", "content": NAMED}  # both rewrites
    only = shaped({"model": NAMED, "messages": [USER]}, system_prompt=False, label_choice=True)
    assert only["messages"] == [USER] and only["structured_outputs"] == {"choice": ["NEG", "POS"]}
    assert "structured_outputs" not in shaped({"model": NAMED, "messages": [USER]})  # label choice off
    for own in ({"structured_outputs": {"regex": "[A-Z]+"}}, {"response_format": {"type": "json_object"}},
                {"tools": []}, {"guided_choice": ["a", "b"]}):  # the client's own constraint stays alone
        out = shaped({"model": NAMED, "messages": [USER], **own}, system_prompt=False, label_choice=True)
        assert out == {"model": NAMED, "messages": [USER], **own}
    for none in ({"structured_outputs": None}, {"response_format": {"type": "text"}}, {"tools": None}):  # no constraint
        out = shaped({"model": NAMED, "messages": [USER], **none}, system_prompt=False, label_choice=True)
        assert out["structured_outputs"] == {"choice": ["NEG", "POS"]}
    words = shaped({"model": "Is this review positive or negative?", "messages": [USER]}, label_choice=True)
    assert words["structured_outputs"] == {"choice": ["positive", "negative"]}  # labels in a user's words
    for model in ('Answer with one of: "yes".', "Answer with one of: yes, no.", "Name a gene or protein.",
                  'Answer with one of: "yes", "no". Then explain.'):  # no labels stated
        body = json.dumps({"model": model, "messages": [USER]}).encode()
        assert shape_chat(body, BASE, system_prompt=False, label_choice=True) is body
    base = json.dumps({"model": "SmolLM2-135M-Instruct", "messages": [USER]}).encode()
    assert shape_chat(base, BASE, label_choice=True) is base


def test_middleware_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAGEN_SERVED_MODEL_NAMES", "SmolLM2-135M-Instruct")
    monkeypatch.setenv("LORAGEN_DESCRIPTION_SYSTEM_PROMPT", "0")
    monkeypatch.setenv("LORAGEN_LABEL_CHOICE", "1")
    got = TestClient(echo_app()).post("/v1/chat/completions", json={"model": NAMED, "messages": [USER]}).json()
    assert got == {"model": NAMED, "messages": [USER], "structured_outputs": {"choice": ["NEG", "POS"]}}
    monkeypatch.setenv("LORAGEN_LABEL_CHOICE", "0")
    got = TestClient(echo_app()).post("/v1/chat/completions", json={"model": NAMED, "messages": [USER]}).json()
    assert got == {"model": NAMED, "messages": [USER]}
