"""The text form of a file name: how a path whose bytes are not UTF-8 is written down.

Linux file names are bytes. Python hands them to us as `str` with each byte that is not part of
valid UTF-8 turned into a lone surrogate (U+DC80..U+DCFF, PEP 383), which opens the right file
but cannot be stored in SQLite, hashed as UTF-8, or sent as JSON. Names like that are common on
FAT cards, SMB shares and zip extracts (`caf\\xe9.jpg` written by a Latin-1 system).

The text form, used in reference_ids, the state store, logs, `status` and `explain`:

* a name that is valid UTF-8 is used exactly as it is (so nothing changes for 99.9 % of files);
* in a name that is not, each byte that is not part of valid UTF-8 is written `%XX` (two upper
  case hex digits), and each `%` is written `%25`: `caf\\xe9.jpg` -> `caf%E9.jpg`,
  `50%\\xff.jpg` -> `50%25%FF.jpg`.

It is reversible: `path_from_text` percent-decodes a text whose decoded bytes are not valid
UTF-8 (only an escaped name gives that) and returns any other text as it is. One pair of names
shares a text form: a valid name that literally contains such an escape (`caf%E9.jpg`) and the
name it spells (`caf\\xe9.jpg`); if both exist in one folder, the second one seen is parked as a
reference_id collision.
"""

from __future__ import annotations

import os
import re

_LOW_SURROGATE_FIRST = 0xDC80
_LOW_SURROGATE_LAST = 0xDCFF
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def path_text(name: str) -> str:
    """The text form of `name` (a relpath or a whole path, as os.fsdecode gives it)."""
    if name.isascii():
        return name  # the common case, without encoding anything
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        return name
    out: list[str] = []
    for char in name:
        code = ord(char)
        if _LOW_SURROGATE_FIRST <= code <= _LOW_SURROGATE_LAST:
            out.append(f"%{code - 0xDC00:02X}")
        elif char == "%":
            out.append("%25")
        else:
            out.append(char)
    return "".join(out)


def path_from_text(text: str) -> str:
    """The name (as os.fsdecode would give it) whose text form is `text`."""
    if "%" not in text:
        return text
    raw = _ESCAPE.sub(lambda match: _char_of_byte(int(match.group(1), 16)), text)
    encoded = os.fsencode(raw)  # escapes back to bytes, everything else to UTF-8
    try:
        encoded.decode("utf-8")
    except UnicodeDecodeError:
        return os.fsdecode(encoded)
    return text


def _char_of_byte(value: int) -> str:
    """The character os.fsdecode gives for one byte standing alone: ASCII as itself, any other
    byte as its lone surrogate."""
    return chr(value) if value < 0x80 else chr(0xDC00 + value)
