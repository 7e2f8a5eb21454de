"""Globs on a path relative to its watch: `*` within a segment, `**` any number of segments,
`{name}` captures one segment or part of one."""

from __future__ import annotations

import re

from watcher.errors import TemplateError
from watcher.rules.template import Placeholder, split_braces


def _translate_class(segment: str, start: int) -> tuple[str, int]:
    """`[...]` at `start` -> (regex, index after `]`). A class never matches '/'."""
    position = start + 1
    negate = position < len(segment) and segment[position] in "!^"
    if negate:
        position += 1
    body_start = position
    if position < len(segment) and segment[position] == "]":  # a leading ']' is literal
        position += 1
    end = segment.find("]", position)
    if end < 0:
        raise TemplateError(f"'{segment[start:]}' opens a '[' class that is not closed")
    body = "".join(char if char == "-" else re.escape(char) for char in segment[body_start:end])
    return f"(?!/)[{'^' if negate else ''}{body}]", end + 1


def _translate_segment(segment: str, captures: list[str]) -> str:
    out: list[str] = []
    for piece in split_braces(segment):
        if isinstance(piece, Placeholder):
            if piece.type_name is not None:
                raise TemplateError(
                    f"capture '{{{piece.variable}:{piece.type_name}}}' cannot have a type; "
                    f"convert it in the metadata template instead"
                )
            if piece.variable in captures:
                raise TemplateError(f"capture '{{{piece.variable}}}' appears twice")
            captures.append(piece.variable)
            out.append(f"(?P<{piece.variable}>[^/]+)")
            continue
        position = 0
        while position < len(piece):
            char = piece[position]
            if char == "*":
                out.append("[^/]*")
                position += 1
            elif char == "?":
                out.append("[^/]")
                position += 1
            elif char == "[":
                translated, position = _translate_class(piece, position)
                out.append(translated)
            else:
                out.append(re.escape(char))
                position += 1
    return "".join(out)


def compile_glob(pattern: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """A glob on the relative path: `*` within a segment, `**` any number of segments."""
    if not pattern:
        raise TemplateError("is empty")
    if pattern.startswith("/"):
        raise TemplateError("is relative to the watch path; drop the leading '/'")
    split_braces(pattern)  # brace errors with positions in the whole pattern, not one segment
    segments = pattern.split("/")
    if any(segment == "" for segment in segments):
        raise TemplateError("has an empty path segment ('//' or a trailing '/')")
    captures: list[str] = []
    parts: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            # Below a folder there is always at least a file name, so a trailing `**` needs one
            # segment; elsewhere it may stand for none (`a/**/b` matches `a/b`).
            parts.append("[^/]+(?:/[^/]+)*" if last else "(?:[^/]+/)*")
        else:
            parts.append(_translate_segment(segment, captures) + ("" if last else "/"))
    return re.compile("".join(parts)), tuple(captures)
