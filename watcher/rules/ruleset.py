"""Path rules: a file's path (relative to its watch) -> reference_id, metadata and remote URL.

A watch has a static `metadata` table and a list of `rules`. A rule selects files either with a
glob (`match`, where `{name}` captures one path segment or part of one) or a regex (`regex`, whose
named groups are captures), and gives metadata *templates*: `"{weather}"`, `"frame {n}"`,
`"{frame:int}"`. Static metadata merges first, then every matching rule in order; later keys win.

Everything that can be checked without a file is checked when a `RuleSet` is built, so a bad
template stops the daemon at start instead of parking every file one by one.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote

from watcher.errors import PathRuleError, TemplateError
from watcher.wire import REMOTE_URL_PREFIXES

__all__ = [
    "BUILTIN_VARIABLES",
    "Classification",
    "CompiledWatch",
    "RuleFields",
    "RuleSet",
    "Template",
    "WatchRules",
    "compile_watch",
    "dotted_key",
    "join_key",
    "type_conflicts",
]

BUILTIN_VARIABLES = frozenset(
    {"relpath", "name", "stem", "ext", "parent", "device", "sha256", "mtime"}
)
# Built-ins that are legitimately empty for some files: `parent` at the watch root, `ext` for a
# name without a dot. A reference_id made only of these could render empty.
_MAY_RENDER_EMPTY = frozenset({"parent", "ext"})

MAX_REFERENCE_ID_CHARS = 1024
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BARE_TOML_KEY = re.compile(r"[A-Za-z0-9_-]+")
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


class RuleFields(Protocol):
    """What the rules read of one `[[watch.rules]]` entry (config's RuleSettings has these)."""

    @property
    def match(self) -> str | None: ...
    @property
    def regex(self) -> str | None: ...
    @property
    def metadata(self) -> Mapping[str, Any]: ...


class WatchRules(Protocol):
    """What the rules read of one `[[watch]]` (config's WatchSettings has these): the rules
    package sits below config, so it names the fields it needs instead of importing the model."""

    @property
    def reference_id(self) -> str: ...
    @property
    def remote_url(self) -> str: ...
    @property
    def metadata(self) -> Mapping[str, Any]: ...
    @property
    def rules(self) -> Sequence[RuleFields]: ...


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


def _has_control_character(text: str) -> bool:
    return any(unicodedata.category(char) == "Cc" for char in text)


def _first_control_character(text: str) -> str:
    for char in text:
        if unicodedata.category(char) == "Cc":
            return f"U+{ord(char):04X}"
    return ""


def _shorten(value: str, limit_chars: int = 80) -> str:
    """repr() keeps a newline in a file name from breaking a one-line message."""
    shown = repr(value)
    return shown if len(shown) <= limit_chars else shown[: limit_chars - 4] + "...'"


# --------------------------------------------------------------------------------------------
# Templates


@dataclass(frozen=True)
class _Placeholder:
    variable: str
    type_name: str | None  # "int" | "float" | "bool", or None for plain text


def _parse_placeholder(body: str) -> _Placeholder:
    name, has_type, type_name = body.partition(":")
    if not _VARIABLE_NAME.fullmatch(name):
        raise TemplateError(f"'{{{body}}}' is not a variable name")
    if has_type and type_name not in _TYPE_NAMES:
        raise TemplateError(
            f"unknown type ':{type_name}' in '{{{body}}}'; use :int, :float or :bool"
        )
    return _Placeholder(name, type_name if has_type else None)


def _split_braces(source: str) -> list[str | _Placeholder]:
    """Literal text and `{...}` placeholders, with `{{` and `}}` standing for literal braces."""
    pieces: list[str | _Placeholder] = []
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
        self.pieces: tuple[str | _Placeholder, ...] = tuple(_split_braces(source))
        placeholders = [piece for piece in self.pieces if isinstance(piece, _Placeholder)]
        self.variables = frozenset(piece.variable for piece in placeholders)
        self.literal_text = "".join(piece for piece in self.pieces if isinstance(piece, str))
        self.literal_prefix = (
            self.pieces[0] if self.pieces and isinstance(self.pieces[0], str) else ""
        )
        self.typed_variables = frozenset(p.variable for p in placeholders if p.type_name)
        sole = self.pieces[0] if len(self.pieces) == 1 else None
        self._sole_typed = sole if isinstance(sole, _Placeholder) and sole.type_name else None

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
    def _converted(raw: str, placeholder: _Placeholder, what: str) -> int | float | bool:
        assert placeholder.type_name is not None
        try:
            return _convert(raw, placeholder.type_name)
        except ValueError:
            raise PathRuleError(
                f"{what}: {{{placeholder.variable}}} = {_shorten(raw)} is not "
                f"{'an' if placeholder.type_name == 'int' else 'a'} {placeholder.type_name}"
            ) from None


# --------------------------------------------------------------------------------------------
# Globs


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
    for piece in _split_braces(segment):
        if isinstance(piece, _Placeholder):
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


def _compile_glob(pattern: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """A glob on the relative path: `*` within a segment, `**` any number of segments."""
    if not pattern:
        raise TemplateError("is empty")
    if pattern.startswith("/"):
        raise TemplateError("is relative to the watch path; drop the leading '/'")
    _split_braces(pattern)  # brace errors with positions in the whole pattern, not one segment
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


# --------------------------------------------------------------------------------------------
# Compiling a watch


@dataclass(frozen=True)
class _CompiledRule:
    key: str  # "rules[1]"
    pattern: re.Pattern[str]
    is_glob: bool  # a glob must match the whole path; a regex is searched
    metadata: tuple[tuple[str, Template | int | float | bool], ...]

    def captures(self, relpath: str) -> dict[str, str | None] | None:
        found = self.pattern.fullmatch(relpath) if self.is_glob else self.pattern.search(relpath)
        return None if found is None else found.groupdict()


@dataclass(frozen=True)
class CompiledWatch:
    """One watch's templates and rules, checked; a RuleSet renders from it."""

    reference_id: Template
    remote_url: Template | None
    metadata: tuple[tuple[str, Template | int | float | bool], ...]
    rules: tuple[_CompiledRule, ...]
    needs_sha256: bool
    type_sources: dict[str, tuple[str, type]]  # key -> (first place that types it, its type)
    metadata_types: dict[str, type]


def _kind(value_type: type) -> str:
    if value_type is bool:
        return "true/false"
    if value_type in (int, float):
        return "a number"
    return "text"


class _WatchCompiler:
    """Collects every problem of one watch as (key relative to the watch, message)."""

    def __init__(self, watch: WatchRules) -> None:
        self.watch = watch
        self.problems: list[tuple[str, str]] = []
        self.uses_sha256 = False
        self.type_sources: dict[str, tuple[str, type]] = {}
        self.metadata_types: dict[str, type] = {}

    def template(
        self, key: str, source: str, known: frozenset[str], outside_rule: bool
    ) -> Template | None:
        try:
            template = Template(source)
        except TemplateError as exc:
            self.problems.append((key, str(exc)))
            return None
        unknown = sorted(template.variables - known)
        for variable in unknown:
            hint = (
                " (a capture is only known inside its own rule)"
                if outside_rule
                else f"; known: {', '.join(sorted(known))}"
            )
            self.problems.append((key, f"unknown variable {{{variable}}}{hint}"))
        if unknown:
            return None
        self.uses_sha256 = self.uses_sha256 or "sha256" in template.variables
        return template

    def plain_text_template(self, key: str, source: str) -> Template | None:
        """reference_id and remote_url: built-ins only, text only, no control characters."""
        template = self.template(key, source, BUILTIN_VARIABLES, outside_rule=True)
        if template is None:
            return None
        if template.typed_variables:
            variable = sorted(template.typed_variables)[0]
            self.problems.append((key, f"is always text; drop the type from {{{variable}}}"))
            return None
        if _has_control_character(template.literal_text):
            self.problems.append(
                (key, f"contains a control character ({_first_control_character(source)})")
            )
            return None
        return template

    def metadata(
        self, prefix: str, table: Mapping[str, Any], known: frozenset[str], in_rule: bool
    ) -> tuple[tuple[str, Template | int | float | bool], ...]:
        compiled: list[tuple[str, Template | int | float | bool]] = []
        for name, value in table.items():
            key = join_key(prefix, dotted_key(["metadata", name]))
            item: Template | int | float | bool | None
            if isinstance(value, str):
                item = self.template(key, value, known, outside_rule=not in_rule)
                value_type = item.value_type if item is not None else None
            else:
                item = value
                value_type = type(value)
            if item is None or value_type is None:
                continue
            self._record_type(name, key, value_type)
            compiled.append((name, item))
        return tuple(compiled)

    def _record_type(self, name: str, key: str, value_type: type) -> None:
        first = self.type_sources.get(name)
        if first is None:
            self.type_sources[name] = (key, value_type)
            self.metadata_types[name] = value_type
            return
        first_key, first_type = first
        if _kind(first_type) != _kind(value_type):
            self.problems.append(
                (
                    key,
                    f"gives {name!r} {_kind(value_type)}, but '{first_key}' of this watch gives it "
                    f"{_kind(first_type)}; a metadata key keeps one type in a dataset",
                )
            )
        elif value_type is float:
            self.metadata_types[name] = float

    def rule(
        self, index: int, match: str | None, regex: str | None, table: Mapping[str, Any]
    ) -> _CompiledRule | None:
        key = f"rules[{index}]"
        is_glob = match is not None
        pattern_key = f"{key}.match" if is_glob else f"{key}.regex"
        try:
            if match is not None:
                pattern, captures = _compile_glob(match)
            else:
                pattern = re.compile(regex or "")
                captures = tuple(pattern.groupindex)
        except TemplateError as exc:
            self.problems.append((pattern_key, str(exc)))
            return None
        except re.error as exc:
            self.problems.append((pattern_key, f"is not a valid regular expression: {exc}"))
            return None
        hidden = sorted(set(captures) & BUILTIN_VARIABLES)
        if hidden:
            self.problems.append(
                (
                    pattern_key,
                    f"capture {{{hidden[0]}}} has the name of a built-in variable; rename it",
                )
            )
            return None
        known = BUILTIN_VARIABLES | frozenset(captures)
        metadata = self.metadata(key, table, known, in_rule=True)
        return _CompiledRule(key, pattern, is_glob, metadata)


def compile_watch(watch: WatchRules) -> CompiledWatch | list[tuple[str, str]]:
    """The watch compiled, or every rule/template problem as (key relative to it, message)."""
    compiler = _WatchCompiler(watch)
    reference_id = compiler.plain_text_template("reference_id", watch.reference_id)
    if reference_id is not None and len(reference_id.literal_text) > MAX_REFERENCE_ID_CHARS:
        compiler.problems.append(
            (
                "reference_id",
                f"its fixed text alone is {len(reference_id.literal_text)} characters; a "
                f"reference_id is at most {MAX_REFERENCE_ID_CHARS}",
            )
        )
    if reference_id is not None and not reference_id.literal_text:
        if not reference_id.variables:
            compiler.problems.append(
                ("reference_id", "must not be empty; the default is {relpath}")
            )
        elif reference_id.variables <= _MAY_RENDER_EMPTY:
            compiler.problems.append(
                (
                    "reference_id",
                    "can render empty: {parent} and {ext} are empty for some files; "
                    "add text or {relpath}",
                )
            )
    remote_url: Template | None = None
    if watch.remote_url:
        remote_url = compiler.plain_text_template("remote_url", watch.remote_url)
        if remote_url is not None and not remote_url.literal_prefix.startswith(REMOTE_URL_PREFIXES):
            compiler.problems.append(
                (
                    "remote_url",
                    f"must start with gs://, s3://, http:// or https:// (got "
                    f"{_shorten(watch.remote_url)})",
                )
            )
    static = compiler.metadata("", watch.metadata, BUILTIN_VARIABLES, in_rule=False)
    rules = [
        compiler.rule(index, rule.match, rule.regex, rule.metadata)
        for index, rule in enumerate(watch.rules)
    ]
    if compiler.problems or reference_id is None:
        return compiler.problems
    return CompiledWatch(
        reference_id=reference_id,
        remote_url=remote_url,
        metadata=static,
        rules=tuple(rule for rule in rules if rule is not None),
        needs_sha256=compiler.uses_sha256,
        type_sources=compiler.type_sources,
        metadata_types=compiler.metadata_types,
    )


# --------------------------------------------------------------------------------------------
# Classifying a path


@dataclass(frozen=True)
class Classification:
    reference_id: str
    metadata: dict[str, Any]  # JSON-ready; numbers are int/float, bools are bool
    remote_url: str | None
    # sha256 of canonical JSON of what we would send besides the bytes: a change here (new rules,
    # a renamed folder feeding a capture) means the item must be re-sent with update=true.
    metadata_sha256: str


def _canonical_sha256(reference_id: str, metadata: dict[str, Any], remote_url: str | None) -> str:
    document = {"metadata": metadata, "reference_id": reference_id, "remote_url": remote_url}
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


def _mtime_iso(mtime_ns: int) -> str:
    seconds, nanoseconds = divmod(mtime_ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, tz=UTC).replace(microsecond=nanoseconds // 1000)
    return moment.isoformat().replace("+00:00", "Z")


class _PathVariables:
    """Built-in variables of one path; `sha256` and `mtime` are computed only when asked for."""

    def __init__(
        self, relpath: str, device: str, mtime_ns: int, sha256: Callable[[], str] | None
    ) -> None:
        # Plain string work, not PurePosixPath: this runs once per file of every walk. The
        # results match PurePosixPath's name, stem, suffix and parent ("" at the root).
        parent, _, name = relpath.rpartition("/")
        dot = name.rfind(".")
        has_suffix = 0 < dot < len(name) - 1
        self._values: dict[str, str] = {
            "relpath": relpath,
            "name": name,
            "stem": name[:dot] if has_suffix else name,
            "ext": name[dot + 1 :].lower() if has_suffix else "",
            "parent": parent,
            "device": device,
        }
        self._mtime_ns = mtime_ns
        self._sha256 = sha256

    def get(self, name: str) -> str:
        value = self._values.get(name)
        if value is not None:
            return value
        if name == "mtime":
            value = _mtime_iso(self._mtime_ns)
        elif name == "sha256":
            if self._sha256 is None:
                raise ValueError("classify() needs sha256= because a template uses {sha256}")
            value = self._sha256()
        else:  # unreachable: templates were checked against the known names at load
            raise KeyError(name)
        self._values[name] = value
        return value


class RuleSet:
    """One watch's compiled rules with the device they render `{device}` as.

    Everything was checked by `compile_watch`; `classify` only renders. `where` ("watch[0]")
    names the watch in a PathRuleError.
    """

    def __init__(self, compiled: CompiledWatch, device: str, where: str) -> None:
        self.compiled = compiled
        self._device = device
        self.where = where
        self.needs_sha256: bool = compiled.needs_sha256
        self.metadata_types: dict[str, type] = dict(compiled.metadata_types)

    def classify(
        self, relpath: str, *, mtime_ns: int, sha256: Callable[[], str] | None = None
    ) -> Classification:
        variables = _PathVariables(relpath, self._device, mtime_ns, sha256)
        metadata: dict[str, Any] = {}
        self._merge(metadata, self.compiled.metadata, variables.get, self.where)
        for rule in self.compiled.rules:
            captures = rule.captures(relpath)
            if captures is None:
                continue

            def lookup(name: str, captures: dict[str, str | None] = captures) -> str | None:
                return captures[name] if name in captures else variables.get(name)

            self._merge(metadata, rule.metadata, lookup, join_key(self.where, rule.key))
        reference_id = self._reference_id(variables)
        remote_url = self._remote_url(variables)
        return Classification(
            reference_id=reference_id,
            metadata=metadata,
            remote_url=remote_url,
            metadata_sha256=_canonical_sha256(reference_id, metadata, remote_url),
        )

    @staticmethod
    def _merge(
        metadata: dict[str, Any],
        entries: Sequence[tuple[str, Template | int | float | bool]],
        lookup: Callable[[str], str | None],
        where: str,
    ) -> None:
        for name, entry in entries:
            if not isinstance(entry, Template):
                metadata[name] = entry
                continue
            value = entry.render(lookup, f"metadata {name!r} ({where})")
            if value is None:
                metadata.pop(name, None)
            else:
                metadata[name] = value

    def _reference_id(self, variables: _PathVariables) -> str:
        rendered = self.compiled.reference_id.render(variables.get, "reference_id")
        text = rendered if isinstance(rendered, str) else ""
        if not text:
            raise PathRuleError("reference_id renders empty for this path")
        if _has_control_character(text):
            raise PathRuleError(
                f"reference_id {_shorten(text)} contains a control character "
                f"({_first_control_character(text)})"
            )
        if len(text) > MAX_REFERENCE_ID_CHARS:
            raise PathRuleError(
                f"reference_id is {len(text)} characters long; the limit is "
                f"{MAX_REFERENCE_ID_CHARS}"
            )
        return text

    def _remote_url(self, variables: _PathVariables) -> str | None:
        template = self.compiled.remote_url
        if template is None:
            return None
        # An http(s) URL needs its path percent-encoded (spaces, '#', '%'); bucket URLs name
        # object keys, which are used as they are.
        escape = (
            (lambda text: quote(text, safe="/"))
            if template.literal_prefix.startswith(("http://", "https://"))
            else None
        )
        rendered = template.render(variables.get, "remote_url", escape)
        url = rendered if isinstance(rendered, str) else ""
        if _has_control_character(url):
            raise PathRuleError(
                f"remote_url {_shorten(url)} contains a control character "
                f"({_first_control_character(url)})"
            )
        return url


def type_conflicts(
    watches: Sequence[tuple[str, str, CompiledWatch]],
) -> list[tuple[str, str]]:
    """(where, dataset_id, compiled watch) -> (full key, message) for each metadata key that two
    watches of one dataset type differently, reported once per key."""
    first_by_dataset: dict[tuple[str, str], tuple[str, type]] = {}
    reported: set[tuple[str, str]] = set()
    problems: list[tuple[str, str]] = []
    for where, dataset_id, compiled in watches:
        for name, (key, value_type) in compiled.type_sources.items():
            slot = (dataset_id, name)
            first = first_by_dataset.get(slot)
            if first is None:
                first_by_dataset[slot] = (join_key(where, key), value_type)
                continue
            first_key, first_type = first
            if _kind(first_type) == _kind(value_type) or slot in reported:
                continue
            reported.add(slot)
            problems.append(
                (
                    join_key(where, key),
                    f"gives {name!r} {_kind(value_type)}, but '{first_key}' gives it "
                    f"{_kind(first_type)} in the same dataset {dataset_id}; a metadata key keeps "
                    f"one type in a dataset",
                )
            )
    return problems
