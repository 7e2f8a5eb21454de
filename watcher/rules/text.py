"""How messages spell a key and show a value: one line each, whatever the text holds."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable

_BARE_TOML_KEY = re.compile(r"[A-Za-z0-9_-]+")


def dotted_key(parts: Iterable[str | int]) -> str:
    """("watch", 0, "metadata", "Recording Date") -> 'watch[0].metadata."Recording Date"'."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        shown = part if _BARE_TOML_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
        text = f"{text}.{shown}" if text else shown
    return text


def join_key(prefix: str, key: str) -> str:
    """join_key("watch[0]", "rules[1].regex") -> "watch[0].rules[1].regex"."""
    if not prefix:
        return key
    if not key:
        return prefix
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


def has_control_character(text: str) -> bool:
    return any(unicodedata.category(char) == "Cc" for char in text)


def first_control_character(text: str) -> str:
    """ "U+000A" for the first control character in `text`, "" when there is none."""
    for char in text:
        if unicodedata.category(char) == "Cc":
            return f"U+{ord(char):04X}"
    return ""


def shorten(value: object, limit_chars: int = 80) -> str:
    """repr(), clipped: repr keeps a newline in a file name from breaking a one-line message."""
    shown = repr(value)
    return shown if len(shown) <= limit_chars else shown[: limit_chars - 4] + "...'"
