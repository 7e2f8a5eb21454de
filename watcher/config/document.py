"""The config file's parsed document as a settings source; paths in it may be relative to the
file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

# Paths in the file may be relative to the file itself (handy next to a project); the models
# then only ever see absolute paths.
_FILE_RELATIVE_PATHS = (
    ("nucleus", "api_key_file"),
    ("nucleus", "ca_bundle"),
    ("upload", "archive_dir"),
    ("state", "path"),
)


def anchor_relative_paths(data: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    if base_dir is None:
        return data
    for section, key in _FILE_RELATIVE_PATHS:
        table = data.get(section)
        if not isinstance(table, dict):
            continue
        value = table.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            table[key] = str(base_dir / value)
    return data


class FileSource(PydanticBaseSettingsSource):
    """The parsed TOML file, its relative paths anchored to the file's folder."""

    def __init__(
        self, settings_cls: type[BaseSettings], document: Mapping[str, Any], base_dir: Path | None
    ) -> None:
        super().__init__(settings_cls)
        self._document = document
        self._base_dir = base_dir

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Not asked for: __call__ hands over the whole document at once.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return anchor_relative_paths(deep_copy_tables(self._document), self._base_dir)


def deep_copy_tables(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: deep_copy_tables(item) for key, item in value.items()}
    if isinstance(value, list):
        return [deep_copy_tables(item) for item in value]
    return value
