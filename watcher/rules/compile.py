"""Compiling a watch: every template and rule checked and turned into patterns, once, at load.

Everything that can be checked without a file is checked here, so a bad template stops the daemon
at start instead of parking every file one by one. Problems are (key, message) pairs; the key is
relative to the watch ("rules[1].regex"), the caller puts it under the watch's own key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from watcher.errors import TemplateError
from watcher.rules.glob import compile_glob
from watcher.rules.template import BUILTIN_VARIABLES, Template
from watcher.rules.text import (
    dotted_key,
    first_control_character,
    has_control_character,
    join_key,
    shorten,
)
from watcher.wire import REMOTE_URL_PREFIXES

# Built-ins that are legitimately empty for some files: `parent` at the watch root, `ext` for a
# name without a dot. A reference_id made only of these could render empty.
_MAY_RENDER_EMPTY = frozenset({"parent", "ext"})

MAX_REFERENCE_ID_CHARS = 1024

Problem = tuple[str, str]  # (key, message)
MetadataEntry = tuple[str, Template | int | float | bool]


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


@dataclass(frozen=True)
class CompiledRule:
    key: str  # "rules[1]"
    pattern: re.Pattern[str]
    is_glob: bool  # a glob must match the whole path; a regex is searched
    metadata: tuple[MetadataEntry, ...]

    def captures(self, relpath: str) -> dict[str, str | None] | None:
        found = self.pattern.fullmatch(relpath) if self.is_glob else self.pattern.search(relpath)
        return None if found is None else found.groupdict()


@dataclass(frozen=True)
class CompiledWatch:
    """One watch's templates and rules, checked; a RuleSet renders from it."""

    reference_id: Template
    remote_url: Template | None
    metadata: tuple[MetadataEntry, ...]
    rules: tuple[CompiledRule, ...]
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

    def __init__(self) -> None:
        self.problems: list[Problem] = []
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
        if has_control_character(template.literal_text):
            self.problems.append(
                (key, f"contains a control character ({first_control_character(source)})")
            )
            return None
        return template

    def reference_id(self, source: str) -> Template | None:
        template = self.plain_text_template("reference_id", source)
        if template is None:
            return None
        if len(template.literal_text) > MAX_REFERENCE_ID_CHARS:
            self.problems.append(
                (
                    "reference_id",
                    f"its fixed text alone is {len(template.literal_text)} characters; a "
                    f"reference_id is at most {MAX_REFERENCE_ID_CHARS}",
                )
            )
        if template.literal_text:
            return template
        if not template.variables:
            self.problems.append(("reference_id", "must not be empty; the default is {relpath}"))
        elif template.variables <= _MAY_RENDER_EMPTY:
            self.problems.append(
                (
                    "reference_id",
                    "can render empty: {parent} and {ext} are empty for some files; "
                    "add text or {relpath}",
                )
            )
        return template

    def remote_url(self, source: str) -> Template | None:
        template = self.plain_text_template("remote_url", source)
        if template is not None and not template.literal_prefix.startswith(REMOTE_URL_PREFIXES):
            self.problems.append(
                (
                    "remote_url",
                    f"must start with gs://, s3://, http:// or https:// (got {shorten(source)})",
                )
            )
        return template

    def metadata(
        self, prefix: str, table: Mapping[str, Any], known: frozenset[str], in_rule: bool
    ) -> tuple[MetadataEntry, ...]:
        compiled: list[MetadataEntry] = []
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
    ) -> CompiledRule | None:
        key = f"rules[{index}]"
        is_glob = match is not None
        pattern_key = f"{key}.match" if is_glob else f"{key}.regex"
        try:
            if match is not None:
                pattern, captures = compile_glob(match)
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
        return CompiledRule(key, pattern, is_glob, metadata)


def compile_watch(watch: WatchRules) -> CompiledWatch | list[Problem]:
    """The watch compiled, or every rule/template problem as (key relative to it, message)."""
    compiler = _WatchCompiler()
    reference_id = compiler.reference_id(watch.reference_id)
    remote_url = compiler.remote_url(watch.remote_url) if watch.remote_url else None
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


def type_conflicts(
    watches: Sequence[tuple[str, str, CompiledWatch]],
) -> list[Problem]:
    """(where, dataset_id, compiled watch) -> (full key, message) for each metadata key that two
    watches of one dataset type differently, reported once per key."""
    first_by_dataset: dict[tuple[str, str], tuple[str, type]] = {}
    reported: set[tuple[str, str]] = set()
    problems: list[Problem] = []
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
