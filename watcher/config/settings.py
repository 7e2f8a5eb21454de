"""The whole config as a pydantic-settings `BaseSettings`, and the checks across its sections.

Its sources are given per load (see `reading_sources`): the TOML file, and on top of it the
indexed environment source. pydantic-settings' own env, dotenv and secrets sources are left out:
they would accept variable names the config does not document.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from pydantic import PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from watcher.config.sections import (
    DiskSettings,
    LogSettings,
    MetricsSettings,
    NucleusSettings,
    ScanSettings,
    SettleSettings,
    StateSettings,
    UploadSettings,
)
from watcher.config.watch import WatchSettings
from watcher.errors import KeyedProblems
from watcher.rules import Problem, RuleSet, type_conflicts

MAX_DEVICE_ID_CHARS = 253


# pydantic-settings calls settings_customise_sources with fixed arguments; this is how a load
# hands it sources built for one document, folder and environment mapping (tests and reloads
# pass their own mapping).
_LOAD_SOURCES: ContextVar[tuple[PydanticBaseSettingsSource, ...]] = ContextVar(
    "_LOAD_SOURCES", default=()
)


@contextmanager
def reading_sources(*sources: PydanticBaseSettingsSource) -> Iterator[None]:
    """Within the block, `Settings()` reads these sources, the first winning over the rest."""
    token = _LOAD_SOURCES.set(sources)
    try:
        yield
    finally:
        _LOAD_SOURCES.reset(token)


class Settings(BaseSettings):
    """The whole config. Build it with `load_settings` or `settings_from_mapping`;
    `Settings(...)` alone validates only the keywords it is given and reads no environment."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    device_id: str = ""
    nucleus: NucleusSettings = NucleusSettings()
    upload: UploadSettings = UploadSettings()
    settle: SettleSettings = SettleSettings()
    scan: ScanSettings = ScanSettings()
    state: StateSettings = StateSettings()
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    disk: DiskSettings = DiskSettings()
    watch: tuple[WatchSettings, ...]

    _device: str = PrivateAttr(default="")
    _rule_sets: tuple[RuleSet, ...] = PrivateAttr(default=())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return _LOAD_SOURCES.get() or (init_settings,)

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        if any(ord(char) < 32 or ord(char) == 127 for char in value):
            raise ValueError("must not contain control characters")
        # It stands in for a hostname (at most 253 characters); much longer, a reference_id
        # made with {device} would exceed the 1024-character limit for every file.
        if len(value) > MAX_DEVICE_ID_CHARS:
            raise ValueError(f"must be at most {MAX_DEVICE_ID_CHARS} characters (got {len(value)})")
        return value

    @model_validator(mode="after")
    def _across_sections(self) -> Settings:
        problems: list[Problem] = []
        if not self.watch:
            problems.append(("watch", "at least one [[watch]] is required"))
        archive_dir = Path(self.upload.archive_dir) if self.upload.archive_dir else None
        for index, watch in enumerate(self.watch):
            if archive_dir is not None and archive_dir.is_relative_to(watch.path):
                problems.append(
                    (
                        "upload.archive_dir",
                        f"is inside {_describe(index, watch)}; moved files would be found again",
                    )
                )
        problems.extend(_same_dataset_overlaps(self.watch))
        self._device = self.device_id or socket.gethostname()
        self._rule_sets = tuple(
            RuleSet(watch.compiled_rules, self._device, f"watch[{index}]")
            for index, watch in enumerate(self.watch)
        )
        problems.extend(
            type_conflicts(
                [
                    (rule_set.where, watch.dataset_id, rule_set.compiled)
                    for watch, rule_set in zip(self.watch, self._rule_sets, strict=True)
                ]
            )
        )
        if problems:
            raise KeyedProblems(problems)
        return self

    @property
    def device(self) -> str:
        """The `{device}` template variable: device_id, or this machine's hostname."""
        return self._device

    @property
    def rule_sets(self) -> tuple[RuleSet, ...]:
        """One compiled RuleSet per [[watch]], same order as `watch`."""
        return self._rule_sets


def _describe(index: int, watch: WatchSettings) -> str:
    return f"watch[{index}] ({watch.path})"


def _same_dataset_overlaps(watches: Sequence[WatchSettings]) -> list[Problem]:
    """Two watches that can see the same file and feed the same dataset: it would go twice.

    One folder feeding two datasets is fine (each file goes once to each). Include and exclude
    are not looked at: roots that overlap for the same dataset are refused outright.
    """
    problems: list[Problem] = []
    for later_index, later in enumerate(watches):
        for earlier_index, earlier in enumerate(watches[:later_index]):
            if earlier.dataset_id != later.dataset_id:
                continue
            relation = _overlap(later, earlier, _describe(earlier_index, earlier))
            if relation is not None:
                problems.append(
                    (
                        f"watch[{later_index}].path",
                        f"{relation}, which feeds the same dataset {later.dataset_id}; "
                        f"each file would be sent twice",
                    )
                )
    return problems


def _overlap(watch: WatchSettings, other: WatchSettings, other_name: str) -> str | None:
    """How `watch` and `other` see the same files, or None when no file is seen by both."""
    # normpath, not resolve(): a folder may not exist yet, and "a/../b" is still "b".
    root, other_root = Path(os.path.normpath(watch.path)), Path(os.path.normpath(other.path))
    if root == other_root:
        return f"{watch.path} is also the folder of {other_name}"
    # A non-recursive watch sees only the files directly in its root, never a nested root's.
    if other.recursive and root.is_relative_to(other_root):
        return f"{watch.path} is inside {other_name}"
    if watch.recursive and other_root.is_relative_to(root):
        return f"{watch.path} holds {other_name}"
    return None
