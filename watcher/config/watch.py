"""One `[[watch]]`: a folder, its dataset and filters, and its rules, compiled once when the
model is built (the compiled form is kept for the rule sets)."""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import Field, PrivateAttr, field_validator, model_validator

from watcher.config.fields import AbsolutePath, Section
from watcher.errors import KeyedProblems
from watcher.files import pathfilter
from watcher.rules import CompiledWatch, Problem, compile_watch, dotted_key

_DATASET_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _check_metadata_table(table: dict[str, Any]) -> dict[str, Any]:
    problems: list[Problem] = []
    for name, value in table.items():
        if not name.strip():
            problems.append((dotted_key([name]), "a metadata key must not be empty"))
        elif not isinstance(value, str | int | float | bool):
            problems.append((dotted_key([name]), "must be text, a number or true/false"))
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append((dotted_key([name]), f"must be a finite number (got {value})"))
    if problems:
        raise KeyedProblems(problems)
    return table


class RuleSettings(Section):
    match: str | None = None
    regex: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _metadata_values(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_metadata_table(value)

    @model_validator(mode="after")
    def _one_selector(self) -> RuleSettings:
        if self.match is not None and self.regex is not None:
            raise KeyedProblems([("", "has both match and regex; give exactly one")])
        if self.match is None and self.regex is None:
            raise KeyedProblems([("", "needs match (a glob) or regex")])
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise KeyedProblems(
                    [("regex", f"is not a valid regular expression: {exc}")]
                ) from None
        return self


class WatchSettings(Section):
    path: AbsolutePath
    dataset_id: str
    recursive: bool = True
    include: tuple[str, ...] = ("*.jpg", "*.jpeg", "*.png")
    exclude: tuple[str, ...] = (".*", "*.tmp", "*.part", "*~")
    reference_id: str = "{relpath}"
    metadata: dict[str, Any] = Field(default_factory=dict)
    remote_url: str = ""
    rules: tuple[RuleSettings, ...] = ()

    _compiled: CompiledWatch = PrivateAttr()

    @field_validator("dataset_id")
    @classmethod
    def _dataset_id(cls, value: str) -> str:
        if not value:
            raise ValueError('must not be empty; it looks like "ds_..."')
        # Ids look like "ds_bw6de8s84pe0vbn6p5zg"; anything else would reach the URL and only
        # fail there, file by file.
        if _DATASET_ID.fullmatch(value) is None:
            raise ValueError(
                f"{value!r} is not a dataset id: letters, digits, '_', '-' and '.' only; "
                'it looks like "ds_..."'
            )
        return value

    @field_validator("include", "exclude")
    @classmethod
    def _patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not pattern for pattern in value):
            raise ValueError("holds an empty pattern")
        problems = [problem for pattern in value if (problem := pathfilter.glob_problem(pattern))]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_values(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_metadata_table(value)

    @model_validator(mode="after")
    def _rules_compile(self) -> WatchSettings:
        compiled = compile_watch(self)
        problems = [] if isinstance(compiled, CompiledWatch) else [*compiled]
        deep = [pattern for pattern in self.include if pathfilter.min_depth(pattern) > 1]
        if deep and not self.recursive:
            problems.append(
                (
                    "include",
                    f"{deep[0]!r} matches only files in sub-folders, but recursive = false "
                    f"watches only the files directly in {self.path}",
                )
            )
        if isinstance(compiled, CompiledWatch) and not problems:
            self._compiled = compiled
            return self
        raise KeyedProblems(problems)

    @property
    def compiled_rules(self) -> CompiledWatch:
        """Its templates and rules, compiled once, when the model was validated."""
        return self._compiled
