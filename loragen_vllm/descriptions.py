"""Task descriptions: normalise and validate the text a client sends as the ``model`` field.

A description is data. It is hashed into a store key and handed to the generator's text
encoder; it is never used as a path, a file name or code.

Normalisation (`normalize_description`) makes texts that mean the same thing to a reader the
same string: Unicode NFC, every run of whitespace (any Unicode white space, line breaks and
tabs included) collapsed to one space, and leading/trailing space stripped. Validation
(`validate_description`) rejects, with a message naming the problem: a non-string, lone
surrogates (not encodable as UTF-8), control characters (NUL, ESC, DEL, C1 controls, ...; tabs,
line breaks and NEL are white space and allowed), Unicode format characters (category Cf: the
bidi overrides and isolates such as U+202E, which make a description read differently from what
it is, zero-width spaces, soft hyphens, BOMs, tags), Unicode non-characters, an empty or
whitespace-only text and a text longer than ``max_chars`` characters (after normalisation).
Two format characters stay allowed because ordinary text needs them: the zero-width joiner
(U+200D, emoji sequences, Indic scripts) and non-joiner (U+200C, Persian, Indic scripts).
"""

from __future__ import annotations

import re
import unicodedata

from loragen_vllm import envs
from loragen_vllm.errors import InvalidDescription

# default limit, in characters (code points) after normalisation: 1000
MAX_DESCRIPTION_CHARS: int = envs.default("LORAGEN_MAX_DESCRIPTION_CHARS")

_WHITESPACE = re.compile(r"\s+")  # str.isspace() white space, Unicode-aware


def normalize_description(text: str) -> str:
    """NFC, collapse white-space runs to one space, strip. Pure; does not validate."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


_ALLOWED_FORMAT = {"\u200c", "\u200d"}  # zero-width non-joiner and joiner: scripts and emoji need them
FORMAT_CHARS = "".join(
    c for c in map(chr, range(0x110000)) if unicodedata.category(c) == "Cf" and c not in _ALLOWED_FORMAT
)

# Characters a description may not contain: C0/C1 control characters except the white-space
# ones (\t \n \v \f \r and NEL), format characters (Cf) but the two above, lone surrogates
# and the 66 Unicode non-characters.
_INVALID = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(f"{chr(p + 0xFFFE)}{chr(p + 0xFFFF)}" for p in range(0, 0x110000, 0x10000))
    + re.escape(FORMAT_CHARS)
    + "]"
)


def _first_invalid_char(text: str) -> tuple[int, str] | None:
    """(index, reason) of the first character a description may not contain, else None."""
    m = _INVALID.search(text)  # one C-level scan: cheap even for very long inputs
    if m is None:
        return None
    cp = ord(m.group())
    if 0xD800 <= cp <= 0xDFFF:
        reason = f"invalid Unicode (lone surrogate U+{cp:04X})"
    elif unicodedata.category(m.group()) == "Cc":
        reason = "a control character (" + ("NUL" if cp == 0 else f"U+{cp:04X}") + ")"
    elif unicodedata.category(m.group()) == "Cf":
        name = unicodedata.name(m.group(), "")
        reason = f"a Unicode format/bidi control character (U+{cp:04X}" + (f" {name}" if name else "") + ")"
    else:
        reason = f"a Unicode non-character (U+{cp:04X})"
    return m.start(), reason


def validate_description(text: object, max_chars: int | None = MAX_DESCRIPTION_CHARS) -> str:
    """Return the normalised description, or raise `InvalidDescription` naming the problem.

    ``max_chars=None`` checks everything but the length (the store uses this to key a
    description without imposing a serving limit).
    """
    if not isinstance(text, str):
        raise InvalidDescription(
            f"invalid description: expected a string, got {type(text).__name__}"
        )
    bad = _first_invalid_char(text)
    if bad is not None:
        index, reason = bad
        raise InvalidDescription(
            f"invalid description: contains {reason} at character {index}"
        )
    normalized = normalize_description(text)
    if not normalized:
        what = "empty" if not text else "whitespace only"
        raise InvalidDescription(f"invalid description: the description is {what}")
    if max_chars is not None and len(normalized) > max_chars:
        raise InvalidDescription(
            f"invalid description: too long ({len(normalized)} characters; "
            f"the limit is {max_chars})"
        )
    return normalized
