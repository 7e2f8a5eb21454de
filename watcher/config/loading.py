"""Loading the config: read and parse the file, validate it with the environment on top, and
report every problem as one line naming file and key; `check_files` asks the file system."""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from watcher.config.document import FileSource
from watcher.config.environment import IndexedEnvironmentSource
from watcher.config.messages import problems_from
from watcher.config.secrets import ca_bundle_problems, key_file_problems
from watcher.config.settings import Settings, reading_sources
from watcher.errors import ConfigError
from watcher.rules import Problem


def settings_from_mapping(
    data: Mapping[str, Any],
    *,
    name: str = "settings",
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Validate already-parsed TOML data; `name` starts every problem line like a file name."""
    environment = IndexedEnvironmentSource(
        Settings, os.environ if environ is None else environ, data, base_dir
    )
    try:
        with reading_sources(environment, FileSource(Settings, data, base_dir)):
            settings = Settings()
    except ValidationError as exc:
        problems = environment.problems + problems_from(exc)
    else:
        if not environment.problems:
            return settings
        problems = environment.problems
    raise ConfigError(_lines(name, problems, environment.origins))


def load_settings(path: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, merge with the environment, and validate; raises ConfigError, one line per problem."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path.name}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path.name}: cannot read: not UTF-8 text (byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path.name}: invalid TOML: {exc}") from None
    return settings_from_mapping(
        data, name=path.name, base_dir=path.absolute().parent, environ=environ
    )


def check_files(settings: Settings, name: str = "settings") -> None:
    """What only the file system can tell about the paths; ConfigError, one line per problem.

    `check`, `run` and `scan` call it after loading, so `check` refuses what `run` would. It is
    not part of every load: `status` or a reload must not fail while, say, the key file is being
    replaced. What cannot be told from here (a file this user may not read but the service user
    can) is left to the moment of use.
    """
    problems: list[Problem] = []
    nucleus, upload = settings.nucleus, settings.upload
    if nucleus.api_key_file:
        problems += key_file_problems(Path(nucleus.api_key_file))
    if nucleus.ca_bundle:
        problems += ca_bundle_problems(Path(nucleus.ca_bundle))
    problems += _place_problems("state.path", settings.state.path, want_folder=False)
    if upload.archive_dir:
        problems += _place_problems(
            "upload.archive_dir", Path(upload.archive_dir), want_folder=True
        )
    for index, watch in enumerate(settings.watch):
        if _kind_of(watch.path) == "other":
            problems.append((f"watch[{index}].path", f"{watch.path} is not a folder"))
    if problems:
        raise ConfigError(_lines(name, problems, origins={}))


def _lines(name: str, problems: list[Problem], origins: Mapping[str, str]) -> list[str]:
    """`config.toml: at 'upload.concurrency': message (set by VARIABLE)`, one per problem."""
    lines = []
    for key, message in problems:
        origin = origins.get(key)
        suffix = f" (set by {origin})" if origin else ""
        lines.append(f"{name}: at '{key}': {message}{suffix}")
    return lines


def _kind_of(path: Path) -> Literal["folder", "other", "missing", "unknown"]:
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError:
        return "unknown"
    return "folder" if stat.S_ISDIR(mode) else "other"


def _place_problems(key: str, path: Path, *, want_folder: bool) -> list[Problem]:
    """A folder (want_folder) or file the daemon creates if needed: can it be there?"""
    kind = _kind_of(path)
    if kind == "other" and want_folder:
        return [(key, f"{path} is not a folder")]
    if kind == "folder" and not want_folder:
        return [(key, f"{path} is a folder; name a file in it, like {path / 'state.db'}")]
    if kind != "missing":
        return []
    for parent in path.parents:
        parent_kind = _kind_of(parent)
        if parent_kind == "other":
            return [(key, f"cannot be created: {parent} is not a folder")]
        if parent_kind != "missing":
            break
    return []
