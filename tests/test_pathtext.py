"""The text form of file names that are not valid UTF-8: exact examples and a round-trip law."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from watcher.files import path_from_text, path_text


def test_examples_from_the_docs() -> None:
    assert path_text(os.fsdecode(b"Sunny/caf\xe9.jpg")) == "Sunny/caf%E9.jpg"
    assert path_text(os.fsdecode(b"50%\xff.jpg")) == "50%25%FF.jpg"
    assert path_text("Sunny/café 50%.jpg") == "Sunny/café 50%.jpg"  # valid UTF-8: unchanged
    assert path_from_text("Sunny/caf%E9.jpg") == os.fsdecode(b"Sunny/caf\xe9.jpg")
    assert path_from_text("50%25%FF.jpg") == os.fsdecode(b"50%\xff.jpg")
    assert path_from_text("Sunny/café 50%.jpg") == "Sunny/café 50%.jpg"
    assert path_from_text("a%20b.jpg") == "a%20b.jpg"  # decodes to valid UTF-8: a literal name


_NAME_BYTES = st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b)


@settings(max_examples=500, derandomize=True)
@given(_NAME_BYTES)
def test_every_undecodable_name_round_trips(raw: bytes) -> None:
    name = os.fsdecode(raw)
    text = path_text(name)
    text.encode("utf-8")  # always storable, hashable and sendable
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        assert path_from_text(text) == name
        assert os.fsencode(path_from_text(text)) == raw
    else:
        assert text == name  # valid names are never rewritten
