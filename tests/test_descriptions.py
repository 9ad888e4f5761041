"""Description normalisation and validation, and the error -> HTTP mapping (checked against
vLLM's own renderer of exceptions raised inside a LoRA resolver)."""

from __future__ import annotations

from http import HTTPStatus

import pytest

from loragen_vllm.descriptions import (
    MAX_DESCRIPTION_CHARS,
    normalize_description,
    validate_description,
)
from loragen_vllm.errors import (
    GeneratorUnavailable,
    InvalidDescription,
    StoreCorrupt,
    to_http,
    to_vllm_exception,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Classify   the sentiment.  ", "Classify the sentiment."),
        ("line one\nline two\r\n\tthree", "line one line two three"),
        ("wide\u3000space\u00a0and\u2028separator", "wide space and separator"),
        ("Re\u0301sume\u0301", "R\u00e9sum\u00e9"),  # NFD -> NFC
        ("\u212b ngstr\u00f6m", "\u00c5 ngstr\u00f6m"),  # singleton: ANGSTROM SIGN -> A-ring
    ],
)
def test_normalize(raw, expected):
    assert normalize_description(raw) == expected
    assert normalize_description(expected) == expected  # idempotent


@pytest.mark.parametrize(
    "text",
    [
        "Classify the sentiment of a movie review as positive or negative.",
        "../../etc/passwd",  # data, not a path: valid text
        "\U0001f468\u200d\U0001f469\u200d\U0001f467 family emoji with joiners",
        "\u7ffb\u8bd1\u6210\u82f1\u6587",
        "tabs\tand\nnewlines",
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian with a zero-width non-joiner
    ],
)
def test_valid_descriptions_pass(text):
    assert validate_description(text) == normalize_description(text)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (None, "expected a string, got NoneType"),
        (b"bytes", "expected a string, got bytes"),
        (42, "expected a string, got int"),
        ("", "the description is empty"),
        (" \n\t\u3000 ", "whitespace only"),
        ("x" * (MAX_DESCRIPTION_CHARS + 1), "too long (1001 characters; the limit is 1000)"),
        ("nul\x00inside", "control character (NUL) at character 3"),
        ("escape\x1b[31m", "control character (U+001B)"),
        ("delete\x7f", "control character (U+007F)"),
        ("separator\x1f", "control character (U+001F)"),
        ("lone \ud83d surrogate", "invalid Unicode (lone surrogate U+D83D) at character 5"),
        ("non\ufffecharacter", "non-character (U+FFFE)"),
        ("Classify \u202enoitnes", "format/bidi control character (U+202E RIGHT-TO-LEFT OVERRIDE) at character 9"),
        ("isolate\u2066x\u2069", "U+2066"),
        ("zero\u200bwidth space", "U+200B"),
        ("soft\u00adhyphen", "U+00AD"),
        ("\ufeffbom", "U+FEFF"),
        ("tag\U000e0041", "U+E0041"),
    ],
)
def test_invalid_descriptions_name_the_problem(text, problem):
    with pytest.raises(InvalidDescription) as err:
        validate_description(text)
    assert problem in str(err.value)
    assert str(err.value).startswith("invalid description")


def test_length_is_counted_after_normalisation_and_configurable():
    padded = "  " + "word " * 200  # 1000 chars once whitespace collapses and strips
    assert len(validate_description(padded + " " * 500)) == 999
    with pytest.raises(InvalidDescription, match="limit is 10"):
        validate_description("eleven char", max_chars=10)
    assert validate_description("x" * 5000, max_chars=None) == "x" * 5000


def test_to_http_maps_each_error_kind():
    status, body = to_http(InvalidDescription("invalid description: the description is empty"))
    assert status == HTTPStatus.BAD_REQUEST
    assert body == {"error": {"message": "invalid description: the description is empty",
                              "type": "BadRequestError", "param": "model", "code": 400}}
    status, body = to_http(GeneratorUnavailable("generator timed out after 30 s"))
    assert status == HTTPStatus.SERVICE_UNAVAILABLE
    assert body["error"]["type"] == "ServiceUnavailableError"
    assert to_http(StoreCorrupt("a" * 64, "bad sha256"))[0] == HTTPStatus.INTERNAL_SERVER_ERROR
    status, body = to_http(RuntimeError("secret /home/x/internal detail"))
    assert status == HTTPStatus.INTERNAL_SERVER_ERROR
    assert "secret" not in body["error"]["message"]


@pytest.mark.parametrize(
    "err",
    [
        InvalidDescription("invalid description: contains a control character (NUL)"),
        GeneratorUnavailable("generator unavailable: the generator actor is unreachable"),
        StoreCorrupt("b" * 64, "sha256 mismatch"),
    ],
)
def test_vllm_renders_our_errors_as_to_http_says(err):
    """What the OpenAI server sends when the resolver raises to_vllm_exception(err)."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    rendered = create_error_response(to_vllm_exception(err)).error
    status, body = to_http(err)
    assert rendered.code == status.value
    assert rendered.type == body["error"]["type"]
    assert rendered.param == body["error"]["param"]
    assert body["error"]["message"] in rendered.message
