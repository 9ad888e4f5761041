"""Every ``LORAGEN_*`` environment variable loragen-vllm reads, declared once (as vLLM's envs.py).

Other modules read a setting as an attribute of this module, ``envs.LORAGEN_SEED``: the variable
is read, parsed and validated on each access (so a test or a parent process may change it), an
unset or blank variable gives its default, and a misspelt name is an ``AttributeError``, not a
silent default. A value that does not parse raises `InvalidSetting` naming the variable, what it
must be and what it was (the CLI answers with exit code 2; vLLM refuses to start).

``loragen-vllm serve`` passes its flags to the resolver plugin, which vLLM loads in each of its
processes, through these variables: `export` writes them, by the same names, into an
environment. The table `SETTINGS` is also what the README's environment table lists.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any


class InvalidSetting(ValueError):
    """A ``LORAGEN_*`` variable is set to a value it cannot have."""


# ----------------------------------------------------------------------------------------------
# Parsers: text -> value, or ValueError("what the value must be")


def _text(raw: str) -> str:
    return raw


def _optional_text(raw: str) -> str | None:
    return raw or None


def _optional_path(raw: str) -> Path | None:
    return Path(raw).expanduser() if raw else None


def _path(raw: str) -> Path:
    return Path(raw).expanduser()


def _integer(minimum: int | None = None) -> Callable[[str], int]:
    what = "an integer" if minimum is None else f"an integer >= {minimum}"

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(what) from None
        if minimum is not None and value < minimum:
            raise ValueError(what)
        return value

    return parse


def _limit(raw: str) -> int | None:
    """A non-negative integer, or ``none`` for no limit."""
    if raw.lower() == "none":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError('an integer >= 0 or "none"') from None
    if value < 0:
        raise ValueError('an integer >= 0 or "none"')
    return value


MAX_NUMBER = 1e6  # every number setting is a duration (s or ms): a deadline, not "never"


def _number(positive: bool) -> Callable[[str], float]:
    what = ("a number > 0" if positive else "a number >= 0") + f" (at most {MAX_NUMBER:.0f})"

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(what) from None
        # NaN and inf fail the range check; so do negatives, and zero where it must be positive
        if not 0 <= value <= MAX_NUMBER or (positive and value == 0):
            raise ValueError(what)
        return value

    return parse


def _log_level(raw: str) -> str:
    level = raw.upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError("a logging level (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    return level


def _names(raw: str) -> tuple[str, ...]:
    """A comma-separated list of names (blank items dropped)."""
    return tuple(n.strip() for n in raw.split(",") if n.strip())


def _choice(*choices: str) -> Callable[[str], str]:
    what = "one of " + ", ".join(choices)

    def parse(raw: str) -> str:
        value = raw.lower()
        if value not in choices:
            raise ValueError(what)
        return value

    return parse


def _flag(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("1 or 0 (true/false, yes/no, on/off)")


# ----------------------------------------------------------------------------------------------
# The table

# Label choice on by default: it won on validation through the server, the client passing the same
# choice (benchmarks/results/quality_label_choice_served.md), and for labels stated in plain words
# (quality_stated_labels.md).
LABEL_CHOICE_DEFAULT = "1"


@dataclass(frozen=True)
class Setting:
    """One environment variable: its name, default (as text) and parser, and what it means."""

    name: str
    default: str  # as it would be written in the environment; "" = unset
    parse: Callable[[str], Any]
    doc: str

    def read(self, environ: MutableMapping[str, str] | None = None) -> Any:
        """The parsed value of the variable in ``environ`` (default: this process's)."""
        raw = (os.environ if environ is None else environ).get(self.name, "").strip()
        if not raw:
            return self.parse(self.default)
        try:
            return self.parse(raw)
        except ValueError as e:
            raise InvalidSetting(f"${self.name} must be {e}, got {raw!r}") from None


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        # -- what `loragen-vllm serve` passes to the resolver plugin (from its flags)
        Setting("LORAGEN_GENERATOR", "", _optional_path,
                "generator checkpoint folder (unset: the checkpoint shipped in the package)"),
        Setting("LORAGEN_RAY_ADDRESS", "", _optional_text,
                "Ray cluster address: generate in the Ray generator actor instead"),
        Setting("LORAGEN_STORE", "~/.cache/loragen-vllm/store", _path, "adapter store folder"),
        Setting("LORAGEN_SEED", "0", _integer(), "generation seed (part of every store key)"),
        Setting("LORAGEN_GENERATOR_DEVICE", "cpu", _text, "torch device of the in-process generator"),
        Setting("LORAGEN_MAX_RESOLVED", "256", _integer(1),
                "descriptions vLLM keeps resolved at once (LRU); see `--max-resolved`"),
        # -- the resolver plugin and the store
        Setting("LORAGEN_GENERATOR_THREADS", "1", _integer(1),
                "torch threads of the in-process generator on CPU (vLLM's workers own the cores)"),
        Setting("LORAGEN_STORE_MAX_ADAPTERS", "1000", _limit,
                "store eviction limit: adapters (`none`: no limit)"),
        Setting("LORAGEN_STORE_MAX_BYTES", str(4 << 30), _limit,
                "store eviction limit: bytes (`none`: no limit)"),
        Setting("LORAGEN_STORE_SYNC", "background", _choice("background", "inline"),
                "when a new adapter is fsynced and the store's limits enforced: `background` (after "
                "the response; a power loss before it costs a regeneration) or `inline` (before)"),
        Setting("LORAGEN_MAX_DESCRIPTION_CHARS", "1000", _integer(1),
                "longest description accepted (after normalisation)"),
        Setting("LORAGEN_BATCH_WINDOW_MS", "5", _number(positive=False),
                "how long a generation waits for others to share its generator pass (requests "
                "arriving during a pass join the next one)"),
        Setting("LORAGEN_ENCODE_EARLY", "1", _flag,
                "`1`: while a batching window waits, the generator's thread encodes the window's "
                "first description, and its pass finds the embedding cached; `0`: the pass encodes"),
        Setting("LORAGEN_GENERATE_TIMEOUT_S", "600", _number(positive=True),
                "one deadline per request, from its arrival: store lookup, queueing, the key's lock "
                "and generation; past it, 503"),
        Setting("LORAGEN_RAY_TIMEOUT_S", "60", _number(positive=True),
                "longest wait for the Ray generator actor before answering 503"),
        Setting("LORAGEN_MAX_PENDING", "64", _integer(1),
                "generations pending at once (queued or running) in one server; more answer 503 "
                "with `Retry-After`"),
        Setting("LORAGEN_LOCK_TIMEOUT_S", "10", _number(positive=True),
                "longest wait for a store lock outside a generation (pin, unpin, gc); longer is 503"),
        Setting("LORAGEN_PIN_LEASE_S", "120", _number(positive=True),
                "how long a pin holds without renewal (a live server renews its pins every third "
                "of it; a dead one's expire)"),
        Setting("LORAGEN_RAY_FINGERPRINT_TTL_S", "30", _number(positive=True),
                "how often the Ray backend re-asks the actor its fingerprint (a restarted actor "
                "may run another checkpoint)"),
        # -- the edge of the HTTP server (serve.py puts these middlewares in front of vLLM)
        Setting("LORAGEN_SERVED_MODEL_NAMES", "", _names,
                "comma-separated names vLLM serves the base model as (set by `serve`): a `model` "
                "field that is one of them is not a description"),
        Setting("LORAGEN_MAX_MODEL_BYTES", "4096", _integer(1),
                "longest raw `model` field accepted, in UTF-8 bytes, before normalisation; longer is "
                "400 (the name vLLM keeps, echoes and lists is never longer)"),
        Setting("LORAGEN_MAX_BODY_BYTES", str(16 << 20), _integer(1),
                "largest request body the edge reads (chat and text completions, an admin's adapter "
                "load); larger is 413, refused on its Content-Length before it is read, or once "
                "the bytes read pass the limit"),
        Setting("LORAGEN_ADMIN_KEY", "", _optional_text,
                "admin key (`serve --admin-key`): unset, vLLM's admin routes (runtime LoRA "
                "load/unload, ...) answer 403/404; set, they answer requests whose "
                "`X-LoRAGen-Admin-Key` header carries it"),
        Setting("LORAGEN_LORA_MODULES", "", _names,
                "comma-separated modules vLLM applies LoRA to (set by `serve`: the generator's "
                "target modules); an adapter loaded through the admin route with weights for "
                "other modules is refused (400) instead of served without them. Empty: all"),
        Setting("LORAGEN_DESCRIPTION_SYSTEM_PROMPT", "1", _flag,
                "`1`: a chat for a description without a system message gets the description as "
                "its system prompt (`serve --[no-]description-system-prompt`)"),
        Setting("LORAGEN_LABEL_CHOICE", LABEL_CHOICE_DEFAULT, _flag,
                "`1`: a chat for a description that states its labels (`Answer with one of: \"A\", \"B\".`, "
                "or plain words such as `Answer Yes or No.`; `loragen_vllm.labels`) is answered with one of "
                "them (vLLM structured outputs), unless it brings its own constraint (`serve --label-choice` / "
                "`--no-label-choice`)"),
        Setting("LORAGEN_LIST_DESCRIPTIONS", "0", _flag,
                "`1`: `/v1/models` also lists the resolved descriptions (other clients' requests; "
                "`serve --list-descriptions`)"),
        Setting("LORAGEN_LOG_LEVEL", "INFO", _log_level, "level of loragen's log lines in the server output"),
        # -- the command line
        Setting("LORAGEN_DEBUG", "0", _flag,
                "`1`: the CLI shows the traceback of an unexpected error instead of one line"),
    )
}

if TYPE_CHECKING:  # the attributes `__getattr__` provides, with their types
    LORAGEN_GENERATOR: Path | None
    LORAGEN_RAY_ADDRESS: str | None
    LORAGEN_STORE: Path
    LORAGEN_SEED: int
    LORAGEN_GENERATOR_DEVICE: str
    LORAGEN_MAX_RESOLVED: int
    LORAGEN_GENERATOR_THREADS: int
    LORAGEN_STORE_MAX_ADAPTERS: int | None
    LORAGEN_STORE_MAX_BYTES: int | None
    LORAGEN_STORE_SYNC: str
    LORAGEN_MAX_DESCRIPTION_CHARS: int
    LORAGEN_BATCH_WINDOW_MS: float
    LORAGEN_ENCODE_EARLY: bool
    LORAGEN_GENERATE_TIMEOUT_S: float
    LORAGEN_RAY_TIMEOUT_S: float
    LORAGEN_MAX_PENDING: int
    LORAGEN_LOCK_TIMEOUT_S: float
    LORAGEN_PIN_LEASE_S: float
    LORAGEN_RAY_FINGERPRINT_TTL_S: float
    LORAGEN_SERVED_MODEL_NAMES: tuple[str, ...]
    LORAGEN_MAX_MODEL_BYTES: int
    LORAGEN_MAX_BODY_BYTES: int
    LORAGEN_ADMIN_KEY: str | None
    LORAGEN_LORA_MODULES: tuple[str, ...]
    LORAGEN_LIST_DESCRIPTIONS: bool
    LORAGEN_DESCRIPTION_SYSTEM_PROMPT: bool
    LORAGEN_LABEL_CHOICE: bool
    LORAGEN_LOG_LEVEL: str
    LORAGEN_DEBUG: bool


def __getattr__(name: str) -> Any:
    setting = SETTINGS.get(name)
    if setting is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return setting.read()


def __dir__() -> list[str]:
    return sorted([*globals(), *SETTINGS])


def is_set(name: str) -> bool:
    """Whether ``name`` is set in this process's environment (not empty), i.e. not at its default.

    Raises KeyError for a name that is not a setting."""
    return bool(os.environ.get(SETTINGS[name].name, "").strip())


def check_all(environ: MutableMapping[str, str] | None = None) -> None:
    """Read every setting from ``environ`` (default: this process's), so that a bad value stops
    a command at its start (`InvalidSetting` naming the variable) rather than at first use."""
    for setting in SETTINGS.values():
        setting.read(environ)


def default(name: str) -> Any:
    """The value ``name`` has when it is not set (for Python APIs that share the default)."""
    setting = SETTINGS[name]
    return setting.parse(setting.default)


def export(environ: MutableMapping[str, str], **values: object) -> None:
    """Write settings into ``environ`` (e.g. for vLLM's processes); None leaves one as it is.

    Each value is checked by its setting's parser, so a child never starts with a value it
    would refuse. Raises KeyError for a name that is not a setting.
    """
    for name, value in values.items():
        setting = SETTINGS[name]
        if value is None:
            continue
        raw = str(value)
        setting.read({name: raw})  # raises InvalidSetting
        environ[name] = raw
