"""Templates: text with `{var}` and `{var:int|float|bool}` placeholders, and the built-in
variables a template may use besides a rule's captures."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from watcher.errors import PathRuleError, TemplateError
from watcher.rules.text import shorten

BUILTIN_VARIABLES = frozenset(
    {"relpath", "name", "stem", "ext", "parent", "device", "sha256", "mtime"}
)
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_BOOL_WORDS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}
_TYPE_NAMES: dict[str, type] = {"int": int, "float": float, "bool": bool}

MetadataValue = str | int | float | bool


@dataclass(frozen=True)
class Placeholder:
    variable: str
    type_name: str | None  # "int" | "float" | "bool", or None for plain text


def _parse_placeholder(body: str) -> Placeholder:
    name, has_type, type_name = body.partition(":")
    if not _VARIABLE_NAME.fullmatch(name):
        raise TemplateError(f"'{{{body}}}' is not a variable name")
    if has_type and type_name not in _TYPE_NAMES:
        raise TemplateError(
            f"unknown type ':{type_name}' in '{{{body}}}'; use :int, :float or :bool"
        )
    return Placeholder(name, type_name if has_type else None)


def split_braces(source: str) -> list[str | Placeholder]:
    """Literal text and `{...}` placeholders, with `{{` and `}}` standing for literal braces."""
    pieces: list[str | Placeholder] = []
    literal: list[str] = []
    position = 0
    while position < len(source):
        char = source[position]
        if source.startswith("{{", position) or source.startswith("}}", position):
            literal.append(char)
            position += 2
        elif char == "{":
            end = source.find("}", position + 1)
            opened_again = source.find("{", position + 1)
            if end < 0 or 0 <= opened_again < end:
                raise TemplateError(
                    f"'{{' at position {position} is not closed; write '{{{{' for a literal brace"
                )
            if literal:
                pieces.append("".join(literal))
                literal = []
            pieces.append(_parse_placeholder(source[position + 1 : end]))
            position = end + 1
        elif char == "}":
            raise TemplateError(
                f"'}}' at position {position} has no opening '{{'; write '}}}}' for a literal brace"
            )
        else:
            literal.append(char)
            position += 1
    if literal:
        pieces.append("".join(literal))
    return pieces


def _parse_bool(text: str) -> bool:
    try:
        return _BOOL_WORDS[text.strip().lower()]
    except KeyError:
        raise ValueError from None


def _convert(text: str, type_name: str) -> int | float | bool:
    """Strict: int("1_000") and float("nan") are valid Python but not sensible metadata."""
    if type_name == "bool":
        return _parse_bool(text)
    if type_name == "int":
        if not _INT_TEXT.fullmatch(text):
            raise ValueError
        return int(text)
    if not _FLOAT_TEXT.fullmatch(text):
        raise ValueError
    number = float(text)
    if not math.isfinite(number):  # JSON has no NaN/Infinity
        raise ValueError
    return number


def _as_text(value: int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int) else repr(value)


class Template:
    """A string with `{var}` / `{var:int|float|bool}` placeholders.

    Exactly one typed placeholder and nothing else renders as a JSON number or bool; anything else
    renders as text.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.pieces: tuple[str | Placeholder, ...] = tuple(split_braces(source))
        placeholders = [piece for piece in self.pieces if isinstance(piece, Placeholder)]
        self.variables = frozenset(piece.variable for piece in placeholders)
        self.literal_text = "".join(piece for piece in self.pieces if isinstance(piece, str))
        self.literal_prefix = (
            self.pieces[0] if self.pieces and isinstance(self.pieces[0], str) else ""
        )
        self.typed_variables = frozenset(p.variable for p in placeholders if p.type_name)
        sole = self.pieces[0] if len(self.pieces) == 1 else None
        self._sole_typed = sole if isinstance(sole, Placeholder) and sole.type_name else None

    @property
    def value_type(self) -> type:
        if self._sole_typed is not None and self._sole_typed.type_name is not None:
            return _TYPE_NAMES[self._sole_typed.type_name]
        return str

    def render(
        self,
        lookup: Callable[[str], str | None],
        what: str,
        escape: Callable[[str], str] | None = None,
    ) -> MetadataValue | None:
        """Fill in the placeholders; None means "leave this key out".

        `lookup` gives None for a regex group that took no part in the match. A typed value
        cannot be made from nothing, so a sole typed placeholder then drops the key; in text it
        renders as "". `what` names the value in a PathRuleError ("metadata 'frame' (watch[0])").
        """
        if self._sole_typed is not None and self._sole_typed.type_name is not None:
            raw = lookup(self._sole_typed.variable)
            if raw is None:
                return None
            return self._converted(raw, self._sole_typed, what)
        parts: list[str] = []
        for piece in self.pieces:
            if isinstance(piece, str):
                parts.append(piece)
                continue
            raw = lookup(piece.variable)
            if raw is None:
                continue
            text = _as_text(self._converted(raw, piece, what)) if piece.type_name else raw
            parts.append(escape(text) if escape is not None else text)
        return "".join(parts)

    @staticmethod
    def _converted(raw: str, placeholder: Placeholder, what: str) -> int | float | bool:
        assert placeholder.type_name is not None
        try:
            return _convert(raw, placeholder.type_name)
        except ValueError:
            raise PathRuleError(
                f"{what}: {{{placeholder.variable}}} = {shorten(raw)} is not "
                f"{'an' if placeholder.type_name == 'int' else 'a'} {placeholder.type_name}"
            ) from None
