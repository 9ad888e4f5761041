"""envs: every LORAGEN_* variable in one table, parsed and validated on access, documented in the
README, and read nowhere else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loragen_vllm import envs

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in envs.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_when_unset(clean_env: pytest.MonkeyPatch) -> None:
    assert envs.LORAGEN_GENERATOR is None and envs.LORAGEN_RAY_ADDRESS is None
    assert envs.LORAGEN_STORE == Path.home() / ".cache" / "loragen-vllm" / "store"
    assert envs.LORAGEN_SEED == 0 and envs.LORAGEN_GENERATOR_DEVICE == "cpu"
    assert envs.LORAGEN_MAX_RESOLVED == 256 and envs.LORAGEN_GENERATOR_THREADS == 1
    assert envs.LORAGEN_STORE_MAX_ADAPTERS == 1000 and envs.LORAGEN_STORE_MAX_BYTES == 4 << 30
    assert envs.LORAGEN_MAX_DESCRIPTION_CHARS == 1000 and envs.LORAGEN_BATCH_WINDOW_MS == 5.0
    assert envs.LORAGEN_GENERATE_TIMEOUT_S == 600.0 and envs.LORAGEN_RAY_TIMEOUT_S == 60.0
    assert envs.LORAGEN_LOG_LEVEL == "INFO" and envs.LORAGEN_DEBUG is False
    for name in envs.SETTINGS:
        assert getattr(envs, name) == envs.default(name)


def test_is_set_tells_a_set_variable_from_its_default(clean_env: pytest.MonkeyPatch) -> None:
    assert not envs.is_set("LORAGEN_MAX_RESOLVED")
    clean_env.setenv("LORAGEN_MAX_RESOLVED", "  ")
    assert not envs.is_set("LORAGEN_MAX_RESOLVED")  # blank reads as unset, as everywhere
    clean_env.setenv("LORAGEN_MAX_RESOLVED", "256")  # set, even to the default's value
    assert envs.is_set("LORAGEN_MAX_RESOLVED")
    with pytest.raises(KeyError):
        envs.is_set("LORAGEN_NO_SUCH_SETTING")


def test_values_are_parsed_on_each_access(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LORAGEN_SEED", " 7 ")
    clean_env.setenv("LORAGEN_STORE", "~/somewhere")
    clean_env.setenv("LORAGEN_STORE_MAX_BYTES", "None")
    clean_env.setenv("LORAGEN_LOG_LEVEL", "debug")
    clean_env.setenv("LORAGEN_DEBUG", "1")
    clean_env.setenv("LORAGEN_GENERATOR", "")  # blank is unset
    assert envs.LORAGEN_SEED == 7 and envs.LORAGEN_STORE == Path.home() / "somewhere"
    assert envs.LORAGEN_STORE_MAX_BYTES is None and envs.LORAGEN_LOG_LEVEL == "DEBUG"
    assert envs.LORAGEN_DEBUG is True and envs.LORAGEN_GENERATOR is None
    clean_env.setenv("LORAGEN_SEED", "8")
    assert envs.LORAGEN_SEED == 8


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("LORAGEN_SEED", "abc", "$LORAGEN_SEED must be an integer, got 'abc'"),
        ("LORAGEN_MAX_RESOLVED", "0", "$LORAGEN_MAX_RESOLVED must be an integer >= 1, got '0'"),
        ("LORAGEN_STORE_MAX_ADAPTERS", "-1", 'must be an integer >= 0 or "none"'),
        ("LORAGEN_BATCH_WINDOW_MS", "soon", "must be a number >= 0"),
        ("LORAGEN_GENERATE_TIMEOUT_S", "0", "must be a number > 0"),
        ("LORAGEN_RAY_TIMEOUT_S", "nan", "must be a number > 0"),
        ("LORAGEN_GENERATE_TIMEOUT_S", "inf", "must be a number > 0 (at most 1000000)"),
        ("LORAGEN_BATCH_WINDOW_MS", "1e999", "must be a number >= 0 (at most 1000000)"),
        ("LORAGEN_PIN_LEASE_S", "1e300", "must be a number > 0 (at most 1000000)"),
        ("LORAGEN_LOG_LEVEL", "LOUD", "must be a logging level"),
        ("LORAGEN_DEBUG", "maybe", "must be 1 or 0"),
    ],
)
def test_bad_values_name_the_variable(clean_env: pytest.MonkeyPatch, name: str, value: str, message: str) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(envs.InvalidSetting) as e:
        getattr(envs, name)
    assert message in str(e.value)


def test_check_all_reads_every_setting(clean_env: pytest.MonkeyPatch) -> None:
    envs.check_all()  # the defaults parse
    clean_env.setenv("LORAGEN_PIN_LEASE_S", "1e300")
    with pytest.raises(envs.InvalidSetting, match=r"\$LORAGEN_PIN_LEASE_S must be a number > 0"):
        envs.check_all()


def test_a_misspelt_setting_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        envs.LORAGEN_SEEDS  # noqa: B018
    assert "LORAGEN_SEED" in dir(envs)


def test_export_writes_checked_values() -> None:
    env: dict[str, str] = {}
    envs.export(env, LORAGEN_SEED=3, LORAGEN_STORE=Path("/tmp/store"), LORAGEN_GENERATOR=None)
    assert env == {"LORAGEN_SEED": "3", "LORAGEN_STORE": "/tmp/store"}
    with pytest.raises(envs.InvalidSetting):
        envs.export(env, LORAGEN_MAX_RESOLVED=0)
    with pytest.raises(KeyError):
        envs.export(env, LORAGEN_SEEDS=1)


def test_readme_documents_every_variable() -> None:
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"^\| `(LORAGEN_[A-Z_]+)` \|", readme, flags=re.MULTILINE))
    assert documented == set(envs.SETTINGS)


def test_no_other_serving_module_reads_the_environment() -> None:
    """Only envs.py reads the environment; serve.py writes vLLM's (LORAGEN_* through
    envs.export), ray_backend.py one Ray variable."""
    sources = {path.name: path.read_text() for path in (REPO / "loragen_vllm").glob("*.py")}
    touching = {name for name, text in sources.items() if re.search(r"os\.environ|getenv", text)}
    assert touching == {"envs.py", "serve.py", "ray_backend.py"}
    for name in touching - {"envs.py"}:
        assert not re.search(r"(os\.environ|getenv)\b.*LORAGEN_", sources[name]), name
