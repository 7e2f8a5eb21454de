"""Settings: the TOML file, environment overrides, the API key, and one-line errors.

Each section of the file is its own frozen pydantic model, so every stage is handed only its part.
Unknown keys are errors (a misspelt key must not silently fall back to a default), and values that
depend on each other, the rules and their templates included, are checked when the models are
built: a bad config stops the daemon at start, not on the first file.

`Settings` is a pydantic-settings `BaseSettings` with two sources: the parsed file, and on top of
it the environment: `NUCLEUS_WATCHER_<SECTION>__<KEY>` (and `NUCLEUS_WATCHER_WATCH__<i>__<KEY>`,
`NUCLEUS_WATCHER_DEVICE_ID`), and `NUCLEUS_ENDPOINT` for nucleus.endpoint as the official client
reads it. The environment source is our own rather than pydantic-settings' so that it can reach
the i-th `[[watch]]`, read the mapping a caller passes (tests, reload), report a bad value under
its key *and* the variable that set it, and keep the precedence of the two endpoint variables
explicit.

Problems are reported as `config.toml: at 'watch[0].rules[1].regex': message`, one per line.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import socket
import ssl
import stat
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from watcher.errors import ConfigError
from watcher.files import pathfilter
from watcher.rules import CompiledWatch
from watcher.rules import ruleset as rules

__all__ = [
    "DiskSettings",
    "Endpoint",
    "LogSettings",
    "MetricsSettings",
    "NucleusSettings",
    "RuleSettings",
    "ScanSettings",
    "Settings",
    "SettleSettings",
    "StateSettings",
    "UploadSettings",
    "WatchSettings",
    "check_files",
    "load_settings",
    "parse_bandwidth_limit",
    "parse_endpoint",
    "parse_listen_address",
    "resolve_api_key",
    "settings_from_mapping",
]

ENV_PREFIX = "NUCLEUS_WATCHER_"
ENV_ENDPOINT = "NUCLEUS_ENDPOINT"
ENV_API_KEY = "NUCLEUS_API_KEY"
CREDENTIAL_NAME = "nucleus_api_key"


class _KeyedProblems(ValueError):
    """Raised from a validator to report problems under keys below the model being validated."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(message for _, message in self.problems))


def _refuse_bool(value: Any) -> Any:
    # pydantic's lax mode reads `concurrency = true` as 1; a bool in a number field is a mistake.
    if isinstance(value, bool):
        raise _KeyedProblems([("", "must be a number, not true/false")])
    return value


# The longest any duration setting may be (one week). Longer is no real setting, and inf or 1e300
# would reach a timer: Condition.wait and time.sleep raise OverflowError on those.
MAX_SECONDS = 604_800
PositiveSeconds = Annotated[float, BeforeValidator(_refuse_bool), Field(gt=0, le=MAX_SECONDS)]
# Each worker is a thread with its own connection; against one API more than this does not go
# faster, and a typo like 4000 would start that many threads.
MAX_CONCURRENCY = 64
# 1 TB/s: no link is faster, so a larger limit is a typo (and 1e400 would overflow the bucket).
MAX_BANDWIDTH_BYTES_PER_SECOND = 10**12
MAX_DEVICE_ID_CHARS = 253
_DATASET_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------------------------
# Value parsers


_BANDWIDTH = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*(?:/\s*s)?\s*")
# Case matters: "MB" is bytes and "Mbit" bits. Ambiguous spellings like "Mb" are refused.
_BANDWIDTH_UNIT_BYTES: dict[str, float] = {
    "": 1,
    "B": 1,
    "kB": 1e3,
    "KB": 1e3,
    "MB": 1e6,
    "GB": 1e9,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "bit": 1 / 8,
    "kbit": 1e3 / 8,
    "Kbit": 1e3 / 8,
    "Mbit": 1e6 / 8,
    "Gbit": 1e9 / 8,
    "Kibit": 1024 / 8,
    "Mibit": 1024**2 / 8,
    "Gibit": 1024**3 / 8,
}


def parse_bandwidth_limit(text: str) -> int | None:
    """ "2MiB/s" -> 2097152 bytes per second; "" -> None (unlimited). Raises ValueError."""
    if not text.strip():
        return None
    found = _BANDWIDTH.fullmatch(text)
    if found is None or found.group(2) not in _BANDWIDTH_UNIT_BYTES:
        raise ValueError(
            f'cannot read {text!r} as a rate; write e.g. "2MiB/s", "500KB/s", "800kbit/s", '
            f"or leave it empty for no limit"
        )
    rate = float(found.group(1)) * _BANDWIDTH_UNIT_BYTES[found.group(2)]
    if not rate <= MAX_BANDWIDTH_BYTES_PER_SECOND:
        raise ValueError(f"{text!r} is more than 1 TB/s; leave it empty for no limit")
    bytes_per_second = round(rate)
    if bytes_per_second < 1:
        raise ValueError(f"{text!r} is less than 1 byte per second; leave it empty for no limit")
    return bytes_per_second


_LISTEN = re.compile(r"(?:\[(?P<ipv6>[^\]]*)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})")


def parse_listen_address(text: str) -> tuple[str, int] | None:
    """ "127.0.0.1:9464" -> ("127.0.0.1", 9464); "[::1]:9464" -> ("::1", 9464); "" -> None.

    The host must be an IP address or localhost: what the metrics server can bind without
    asking DNS, so an address that passed here does not fail later for its spelling.
    """
    if not text:
        return None
    found = _LISTEN.fullmatch(text)
    if found is None or int(found["port"]) > 65535:
        hint = ' (write an IPv6 address in brackets: "[::1]:9464")' if text.count(":") > 1 else ""
        raise ValueError(
            f'must be host:port like "127.0.0.1:9464" (use 0.0.0.0 for every interface), '
            f"or empty to turn metrics off (got {text!r}){hint}"
        )
    if found["ipv6"] is not None:
        host, usable = found["ipv6"], _is_ip_address(found["ipv6"], version=6)
    else:
        host = found["host"]
        usable = host == "localhost" or _is_ip_address(host, version=4)
    if not usable:
        raise ValueError(
            f"{host!r} is not an IP address; use 127.0.0.1 (this machine), 0.0.0.0 (every "
            f"interface), [::1], [::] or localhost (got {text!r})"
        )
    return host, int(found["port"])


def _is_ip_address(text: str, *, version: int) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return address.version == version


class Endpoint(NamedTuple):
    url: str  # the base URL routes are appended to, without a trailing slash
    host: str  # host[:port], for messages


def parse_endpoint(text: str) -> Endpoint:
    """The one rule for nucleus.endpoint, which the client applies too. Raises ValueError.

    A message never repeats a URL that holds credentials.
    """
    url = text.strip()
    shown = "" if "@" in url else f" (got {url!r})"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (reading the port is what checks it)
    except ValueError as exc:
        raise ValueError(f"is not a valid URL: {exc}{shown}") from None
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain credentials (user:password@); the API key is sent apart")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL{shown}")
    if any(char.isspace() or not char.isprintable() for char in url):
        raise ValueError(f"must not contain spaces or control characters{shown}")
    if parts.query or parts.fragment:
        raise ValueError(f"must not have a query (?...) or a fragment (#...){shown}")
    # Routes are joined as f"{endpoint}/dataset/..."; a trailing slash would double it.
    return Endpoint(urlunsplit(parts).rstrip("/"), parts.netloc)


# --------------------------------------------------------------------------------------------
# Sections


class NucleusSettings(_Section):
    endpoint: str = "https://api.scale.com/v1/nucleus"
    # Optional paths are strings with "" meaning "not set", as the file spells them.
    api_key_file: str = ""
    timeout_seconds: PositiveSeconds = 120
    ca_bundle: str = ""
    asynchronous: bool = False
    job_poll_seconds: PositiveSeconds = 2.0

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_http_url(cls, value: str) -> str:
        return parse_endpoint(value).url

    @field_validator("api_key_file", "ca_bundle")
    @classmethod
    def _file_path_text(cls, value: str) -> str:
        return _path_text(value)


class UploadSettings(_Section):
    concurrency: Annotated[int, BeforeValidator(_refuse_bool), Field(ge=1, le=MAX_CONCURRENCY)] = 4
    max_files_per_request: Annotated[int, BeforeValidator(_refuse_bool), Field(ge=1, le=10)] = 10
    max_file_bytes: Annotated[int, BeforeValidator(_refuse_bool), Field(ge=1)] = 104_857_600
    bandwidth_limit: str = ""
    retry_initial_seconds: PositiveSeconds = 1
    retry_max_seconds: PositiveSeconds = 300
    after_upload: Literal["keep", "delete", "move"] = "keep"
    archive_dir: str = ""
    on_conflict: Literal["skip", "update"] = "skip"
    order: Literal["oldest-first", "newest-first"] = "oldest-first"
    stop_timeout_seconds: PositiveSeconds = 30

    _bandwidth_bytes_per_second: int | None = PrivateAttr(default=None)

    @field_validator("archive_dir")
    @classmethod
    def _archive_dir_text(cls, value: str) -> str:
        return _path_text(value)

    @field_validator("bandwidth_limit")
    @classmethod
    def _bandwidth_parses(cls, value: str) -> str:
        # Here, not only below, so that it is reported along with any other field's problem.
        parse_bandwidth_limit(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> UploadSettings:
        self._bandwidth_bytes_per_second = parse_bandwidth_limit(self.bandwidth_limit)
        problems: list[tuple[str, str]] = []
        if self.retry_initial_seconds > self.retry_max_seconds:
            problems.append(
                (
                    "retry_initial_seconds",
                    f"must not be more than retry_max_seconds "
                    f"({self.retry_initial_seconds:g} > {self.retry_max_seconds:g})",
                )
            )
        if self.after_upload == "move" and not self.archive_dir:
            problems.append(("archive_dir", 'is required when after_upload = "move"'))
        if self.archive_dir and not Path(self.archive_dir).is_absolute():
            problems.append(("archive_dir", f"must be an absolute path (got '{self.archive_dir}')"))
        if problems:
            raise _KeyedProblems(problems)
        return self

    @property
    def bandwidth_limit_bytes_per_second(self) -> int | None:
        """The parsed bandwidth_limit; None for no limit."""
        return self._bandwidth_bytes_per_second


class SettleSettings(_Section):
    seconds: PositiveSeconds = 2.0
    max_wait_seconds: PositiveSeconds = 600
    verify_image: bool = True

    @model_validator(mode="after")
    def _wait_covers_settle(self) -> SettleSettings:
        if self.max_wait_seconds < self.seconds:
            raise _KeyedProblems(
                [
                    (
                        "max_wait_seconds",
                        f"must be at least settle.seconds "
                        f"({self.max_wait_seconds:g} < {self.seconds:g})",
                    )
                ]
            )
        return self


class ScanSettings(_Section):
    interval_seconds: PositiveSeconds = 300
    polling: bool = False


class StateSettings(_Section):
    path: Path = Path("/var/lib/nucleus-watcher/state.db")

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        _path_text(str(value))
        if not value.is_absolute():
            raise ValueError(f"must be an absolute path (got '{value}')")
        return value


# The config validates `log.format` and `log.level` against these types once; the logging setup
# then only looks the level up.
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
# Other spellings the config accepts for a level, and the level each one means.
LOG_LEVEL_ALIASES: Mapping[str, LogLevel] = {"warn": "warning"}


class LogSettings(_Section):
    format: LogFormat = "auto"
    level: LogLevel = "info"

    @field_validator("format", "level", mode="before")
    @classmethod
    def _canonical_name(cls, value: Any) -> Any:
        # "INFO", " info " and "warn" mean what the person who wrote them meant.
        if not isinstance(value, str):
            return value
        name = value.strip().lower()
        return LOG_LEVEL_ALIASES.get(name, name)


class MetricsSettings(_Section):
    listen: str = "127.0.0.1:9464"

    _address: tuple[str, int] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _host_port(self) -> MetricsSettings:
        try:
            self._address = parse_listen_address(self.listen)
        except ValueError as exc:
            raise _KeyedProblems([("listen", str(exc))]) from None
        return self

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """(host, port) for `Metrics.start_http_server`, or None when metrics are off."""
        return self._address


class DiskSettings(_Section):
    min_free_bytes: Annotated[int, BeforeValidator(_refuse_bool), Field(ge=0)] = 0
    delete_uploaded_when_low: bool = False


def _path_text(value: str) -> str:
    # The OS cannot take a path with NUL in it: os.stat and open raise ValueError.
    if "\0" in value:
        raise ValueError("must not contain a NUL character (\\u0000)")
    return value


def _check_metadata_table(table: dict[str, Any]) -> dict[str, Any]:
    problems: list[tuple[str, str]] = []
    for name, value in table.items():
        if not name.strip():
            problems.append((rules.dotted_key([name]), "a metadata key must not be empty"))
        elif not isinstance(value, str | int | float | bool):
            problems.append((rules.dotted_key([name]), "must be text, a number or true/false"))
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append((rules.dotted_key([name]), f"must be a finite number (got {value})"))
    if problems:
        raise _KeyedProblems(problems)
    return table


class RuleSettings(_Section):
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
            raise _KeyedProblems([("", "has both match and regex; give exactly one")])
        if self.match is None and self.regex is None:
            raise _KeyedProblems([("", "needs match (a glob) or regex")])
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise _KeyedProblems(
                    [("regex", f"is not a valid regular expression: {exc}")]
                ) from None
        return self


class WatchSettings(_Section):
    path: Path
    dataset_id: str
    recursive: bool = True
    include: tuple[str, ...] = ("*.jpg", "*.jpeg", "*.png")
    exclude: tuple[str, ...] = (".*", "*.tmp", "*.part", "*~")
    reference_id: str = "{relpath}"
    metadata: dict[str, Any] = Field(default_factory=dict)
    remote_url: str = ""
    rules: tuple[RuleSettings, ...] = ()

    _compiled: CompiledWatch = PrivateAttr()

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # A missing folder is fine (a mount may come later; the daemon waits), a relative one is
        # not: it would depend on the daemon's working directory.
        _path_text(str(value))
        if not value.is_absolute():
            raise ValueError(f"must be an absolute path (got '{value}')")
        return value

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
        compiled = rules.compile_watch(self)
        problems = [] if isinstance(compiled, CompiledWatch) else compiled
        deep = [pattern for pattern in self.include if pathfilter.min_depth(pattern) > 1]
        if deep and not self.recursive:
            problems.append(
                (
                    "include",
                    f"{deep[0]!r} matches only files in sub-folders, but recursive = false "
                    f"watches only the files directly in {self.path}",
                )
            )
        if problems or not isinstance(compiled, CompiledWatch):
            raise _KeyedProblems(problems)
        self._compiled = compiled
        return self

    @property
    def compiled_rules(self) -> CompiledWatch:
        """Its templates and rules, compiled once, when the model was validated."""
        return self._compiled


class Settings(BaseSettings):
    """The whole config: a TOML file with the environment on top (see IndexedEnvironmentSource).

    Build it with `load_settings` or `settings_from_mapping`; `Settings(...)` alone validates
    only the keywords it is given and reads no environment.
    """

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
    _rule_sets: tuple[rules.RuleSet, ...] = PrivateAttr(default=())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # pydantic-settings' env, dotenv and secrets sources are left out: they would accept
        # variable names the config does not document.
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
        problems: list[tuple[str, str]] = []
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
            rules.RuleSet(watch.compiled_rules, self._device, f"watch[{index}]")
            for index, watch in enumerate(self.watch)
        )
        problems.extend(
            rules.type_conflicts(
                [
                    (rule_set.where, watch.dataset_id, rule_set.compiled)
                    for watch, rule_set in zip(self.watch, self._rule_sets, strict=True)
                ]
            )
        )
        if problems:
            raise _KeyedProblems(problems)
        return self

    @property
    def device(self) -> str:
        """The `{device}` template variable: device_id, or this machine's hostname."""
        return self._device

    @property
    def rule_sets(self) -> tuple[rules.RuleSet, ...]:
        """One compiled RuleSet per [[watch]], same order as `watch`."""
        return self._rule_sets


def _describe(index: int, watch: WatchSettings) -> str:
    return f"watch[{index}] ({watch.path})"


def _same_dataset_overlaps(watches: Sequence[WatchSettings]) -> list[tuple[str, str]]:
    """Two watches that can see the same file and feed the same dataset: it would go twice.

    One folder feeding two datasets is fine (each file goes once to each). Include and exclude
    are not looked at: roots that overlap for the same dataset are refused outright.
    """
    problems: list[tuple[str, str]] = []
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


# --------------------------------------------------------------------------------------------
# Environment overrides


# Paths in the file may be relative to the file itself (handy next to a project); the models
# then only ever see absolute paths.
_FILE_RELATIVE_PATHS = (
    ("nucleus", "api_key_file"),
    ("nucleus", "ca_bundle"),
    ("upload", "archive_dir"),
    ("state", "path"),
)


def _anchor_relative_paths(data: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
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
        return _anchor_relative_paths(_deep_copy_tables(self._document), self._base_dir)


class IndexedEnvironmentSource(PydanticBaseSettingsSource):
    """`NUCLEUS_WATCHER_<SECTION>__<KEY>`, `NUCLEUS_WATCHER_WATCH__<i>__<KEY>`,
    `NUCLEUS_WATCHER_DEVICE_ID` and `NUCLEUS_ENDPOINT`, read from the mapping it is given.

    pydantic-settings' own environment source cannot reach the i-th `[[watch]]` of a file (a list
    is replaced whole), so this one reads the file's document to override single keys of its
    entries. It also keeps what the messages need: `origins`, {dotted key: variable that set it},
    and `problems`, the variables that name nothing or cannot apply.
    """

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        environ: Mapping[str, str],
        document: Mapping[str, Any],
        base_dir: Path | None,
    ) -> None:
        super().__init__(settings_cls)
        self._environ = environ
        self._document = document
        self._base_dir = base_dir
        fields = settings_cls.model_fields
        self._sections = {
            name
            for name, field in fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        }
        self._scalars = set(fields) - self._sections - {"watch"}
        self.origins: dict[str, str] = {}
        self.problems: list[tuple[str, str]] = []

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Not asked for: __call__ reads every variable at once, in a fixed order.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        self.origins, self.problems = {}, []
        overrides: dict[str, Any] = {}
        endpoint = self._environ.get(ENV_ENDPOINT, "")
        if endpoint and f"{ENV_PREFIX}NUCLEUS__ENDPOINT" not in self._environ:
            self._set_in_section(overrides, ["nucleus", "endpoint"], endpoint, ENV_ENDPOINT)
        for variable in sorted(self._environ):
            if variable.startswith(ENV_PREFIX):
                self._apply(overrides, variable, self._environ[variable])
        return _anchor_relative_paths(overrides, self._base_dir)

    def _apply(self, overrides: dict[str, Any], variable: str, value: str) -> None:
        parts = variable[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) == 1:
            # Single names are left for other uses, except the top-level keys themselves.
            if parts[0] in self._scalars:
                overrides[parts[0]] = value
                self.origins[parts[0]] = variable
        elif len(parts) == 2 and parts[0] in self._sections:
            self._set_in_section(overrides, parts, value, variable)
        elif len(parts) == 3 and parts[0] == "watch" and parts[1].isdigit():
            self._set_in_watch(overrides, int(parts[1]), parts[2], value, variable)
        else:
            self.problems.append(
                (
                    rules.dotted_key(parts),
                    f"{variable} names no setting; use {ENV_PREFIX}<SECTION>__<KEY> or "
                    f"{ENV_PREFIX}WATCH__<index>__<KEY>",
                )
            )

    def _set_in_section(
        self, overrides: dict[str, Any], parts: list[str], value: str, variable: str
    ) -> None:
        section, key = parts
        if not isinstance(self._document.get(section, {}), Mapping):
            self.problems.append((section, f"is not a table, so {variable} cannot set a key in it"))
            return
        overrides.setdefault(section, {})[key] = value
        self.origins[rules.dotted_key(parts)] = variable

    def _set_in_watch(
        self, overrides: dict[str, Any], index: int, key: str, value: str, variable: str
    ) -> None:
        watches = self._document.get("watch")
        if not isinstance(watches, list) or index >= len(watches):
            self.problems.append(
                (f"watch[{index}]", f"is not in the file, so {variable} has nothing to set")
            )
            return
        if not isinstance(watches[index], Mapping):
            return  # the file's own error says what is wrong with this entry
        # A list is replaced whole when sources merge, so this gives every entry of the file.
        entries = overrides.setdefault("watch", _deep_copy_tables(watches))
        entries[index][key] = value
        self.origins[rules.dotted_key(["watch", index, key])] = variable


# pydantic-settings calls settings_customise_sources with fixed arguments; this is how a load
# hands it sources built for one document, folder and environment mapping (tests and reloads
# pass their own mapping).
_LOAD_SOURCES: ContextVar[tuple[PydanticBaseSettingsSource, ...]] = ContextVar(
    "_LOAD_SOURCES", default=()
)


@contextmanager
def _reading(*sources: PydanticBaseSettingsSource) -> Iterator[None]:
    """Within the block, `Settings()` reads these sources, the first winning over the rest."""
    token = _LOAD_SOURCES.set(sources)
    try:
        yield
    finally:
        _LOAD_SOURCES.reset(token)


# --------------------------------------------------------------------------------------------
# pydantic errors -> one-liners

_MODEL_BY_CONTAINER: dict[str, type[BaseModel]] = {
    "nucleus": NucleusSettings,
    "upload": UploadSettings,
    "settle": SettleSettings,
    "scan": ScanSettings,
    "state": StateSettings,
    "log": LogSettings,
    "metrics": MetricsSettings,
    "disk": DiskSettings,
    "watch": WatchSettings,
    "rules": RuleSettings,
}


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:56] + "...'"


def _unknown_key_message(loc: tuple[str | int, ...]) -> str:
    name = str(loc[-1])
    if name == "api_key":
        return (
            "unknown key; the API key never goes in the config: name a file in "
            "nucleus.api_key_file or set NUCLEUS_API_KEY"
        )
    container = next((part for part in reversed(loc[:-1]) if isinstance(part, str)), "")
    model = _MODEL_BY_CONTAINER.get(container, Settings)
    close = difflib.get_close_matches(name, list(model.model_fields), n=1)
    return f"unknown key (did you mean '{close[0]}'?)" if close else "unknown key"


def _list_message(loc: tuple[str | int, ...], got: str) -> str:
    if loc == ("watch",):
        return "must be an array of tables: write [[watch]], not [watch]"
    if loc[-1] == "rules":
        return "must be an array of tables: write [[watch.rules]], not [watch.rules]"
    if loc[-1] in ("include", "exclude"):
        return f'must be a list of strings like ["*.jpg"] (got {got})'
    return f"must be a list (got {got})"


def _message(error: Any) -> str:
    kind: str = error["type"]
    loc: tuple[str | int, ...] = tuple(error["loc"])
    ctx: dict[str, Any] = error.get("ctx") or {}
    got = _shown(error.get("input"))
    if kind == "extra_forbidden":
        return _unknown_key_message(loc)
    if kind == "missing":
        return "at least one [[watch]] is required" if loc == ("watch",) else "is required"
    if kind in ("tuple_type", "list_type"):
        return _list_message(loc, got)
    simple = {
        "greater_than": f"must be more than {ctx.get('gt')} (got {got})",
        "greater_than_equal": f"must be at least {ctx.get('ge')} (got {got})",
        "less_than_equal": f"must be at most {ctx.get('le')} (got {got})",
        "int_parsing": f"must be a whole number (got {got})",
        "int_type": f"must be a whole number (got {got})",
        "int_from_float": f"must be a whole number (got {got})",
        "float_parsing": f"must be a number (got {got})",
        "float_type": f"must be a number (got {got})",
        "bool_parsing": f"must be true or false (got {got})",
        "bool_type": f"must be true or false (got {got})",
        "string_type": f"must be a string (got {got})",
        "path_type": f"must be a path string (got {got})",
        "literal_error": f"must be {ctx.get('expected')} (got {got})",
        "dict_type": f"must be a table (got {got})",
        "model_type": f"must be a table (got {got})",
        "model_attributes_type": f"must be a table (got {got})",
    }
    if kind in simple:
        return simple[kind]
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    return str(error["msg"])


def _problems_from(exc: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for error in exc.errors():
        base = rules.dotted_key(error["loc"])
        raised = (error.get("ctx") or {}).get("error")
        if isinstance(raised, _KeyedProblems):
            problems.extend(
                (rules.join_key(base, key), message) for key, message in raised.problems
            )
        else:
            problems.append((base, _message(error)))
    return problems


# --------------------------------------------------------------------------------------------
# Public entry points


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
        with _reading(environment, FileSource(Settings, data, base_dir)):
            settings = Settings()
    except ValidationError as exc:
        problems = environment.problems + _problems_from(exc)
    else:
        if not environment.problems:
            return settings
        problems = environment.problems
    lines = []
    for key, message in problems:
        origin = environment.origins.get(key)
        suffix = f" (set by {origin})" if origin else ""
        lines.append(f"{name}: at '{key}': {message}{suffix}")
    raise ConfigError(lines)


def _deep_copy_tables(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _deep_copy_tables(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_deep_copy_tables(item) for item in value]
    return value


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
    problems: list[tuple[str, str]] = []
    nucleus, upload = settings.nucleus, settings.upload
    if nucleus.api_key_file:
        problems += _key_file_problems(Path(nucleus.api_key_file))
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
        raise ConfigError([f"{name}: at '{key}': {message}" for key, message in problems])


def _kind_of(path: Path) -> Literal["folder", "other", "missing", "unknown"]:
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError:
        return "unknown"
    return "folder" if stat.S_ISDIR(mode) else "other"


def _key_file_problems(key_file: Path) -> list[tuple[str, str]]:
    key = "nucleus.api_key_file"
    try:
        mode = key_file.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return [(key, f"{key_file}: no such file")]
    except OSError:
        return []  # e.g. a folder this user may not enter; the service user may
    if not stat.S_ISREG(mode):
        return [(key, f"{key_file} is not a regular file")]
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return [(key, _open_key_file_message(key_file, mode))]
    return []


def ca_bundle_problems(ca_file: Path) -> list[tuple[str, str]]:
    # The same tests the client makes when it is built, so check refuses what run would.
    key = "nucleus.ca_bundle"
    try:
        content = ca_file.read_bytes()
    except OSError as exc:
        return [(key, f"cannot read {ca_file}: {exc.strerror or exc}")]
    if b"-----BEGIN CERTIFICATE-----" not in content:
        return [(key, f"{ca_file} holds no PEM certificate")]
    try:
        ssl.create_default_context(cafile=str(ca_file))
    except ssl.SSLError as exc:
        return [(key, f"{ca_file} is not usable: {exc}")]
    return []


def _place_problems(key: str, path: Path, *, want_folder: bool) -> list[tuple[str, str]]:
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


def resolve_api_key(nucleus: NucleusSettings, environ: Mapping[str, str] | None = None) -> str:
    """api_key_file, else NUCLEUS_API_KEY, else the systemd credential. Never echoes the key."""
    environ = os.environ if environ is None else environ
    if nucleus.api_key_file:
        return _read_key_file(Path(nucleus.api_key_file), check_mode=True)
    from_environment = environ.get(ENV_API_KEY, "").strip()
    if from_environment:
        _check_key_text(from_environment, ENV_API_KEY)
        return from_environment
    credentials_directory = environ.get("CREDENTIALS_DIRECTORY", "")
    if credentials_directory:
        credential = Path(credentials_directory) / CREDENTIAL_NAME
        if credential.exists():
            # systemd owns the mode of its credential files; it makes them private itself.
            return _read_key_file(credential, check_mode=False)
    raise ConfigError(
        "no Nucleus API key: set nucleus.api_key_file or NUCLEUS_API_KEY, or give the systemd "
        f"credential {CREDENTIAL_NAME!r} (LoadCredential=)"
    )


def _read_key_file(key_file: Path, *, check_mode: bool) -> str:
    try:
        with key_file.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if check_mode and mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"API key file {_open_key_file_message(key_file, mode)}")
            content = handle.read()
    except OSError as exc:
        raise ConfigError(f"API key file {key_file}: cannot read: {exc.strerror or exc}") from None
    try:
        key = content.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"API key file {key_file} is not UTF-8 text") from None
    if not key:
        raise ConfigError(f"API key file {key_file} is empty")
    _check_key_text(key, f"API key file {key_file}")
    return key


def _open_key_file_message(key_file: Path, mode: int) -> str:
    return (
        f"{key_file} is open to other users (mode {stat.S_IMODE(mode):04o}); "
        f"run: chmod 600 {key_file}"
    )


def _check_key_text(key: str, source: str) -> None:
    # The key goes into an Authorization header: a stray newline or space would corrupt it.
    if any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in key):
        raise ConfigError(f"{source}: the key contains spaces or control characters")
