"""The sections of the config file besides `[[watch]]`, one frozen model each, so every stage is
handed only its part. Values that depend on each other are checked when a model is built."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PrivateAttr, field_validator, model_validator

from watcher.config.fields import AbsolutePath, PositiveSeconds, Section, path_text, refuse_bool
from watcher.config.units import parse_bandwidth_limit, parse_endpoint, parse_listen_address
from watcher.errors import KeyedProblems
from watcher.rules import Problem

# Each worker is a thread with its own connection; against one API more than this does not go
# faster, and a typo like 4000 would start that many threads.
MAX_CONCURRENCY = 64


class NucleusSettings(Section):
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
    def _filepath_text(cls, value: str) -> str:
        return path_text(value)


class UploadSettings(Section):
    concurrency: Annotated[int, BeforeValidator(refuse_bool), Field(ge=1, le=MAX_CONCURRENCY)] = 4
    max_files_per_request: Annotated[int, BeforeValidator(refuse_bool), Field(ge=1, le=10)] = 10
    max_file_bytes: Annotated[int, BeforeValidator(refuse_bool), Field(ge=1)] = 104_857_600
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
        return path_text(value)

    @field_validator("bandwidth_limit")
    @classmethod
    def _bandwidth_parses(cls, value: str) -> str:
        # Here, not only below, so that it is reported along with any other field's problem.
        parse_bandwidth_limit(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> UploadSettings:
        self._bandwidth_bytes_per_second = parse_bandwidth_limit(self.bandwidth_limit)
        problems: list[Problem] = []
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
            raise KeyedProblems(problems)
        return self

    @property
    def bandwidth_limit_bytes_per_second(self) -> int | None:
        """The parsed bandwidth_limit; None for no limit."""
        return self._bandwidth_bytes_per_second


class SettleSettings(Section):
    seconds: PositiveSeconds = 2.0
    max_wait_seconds: PositiveSeconds = 600
    verify_image: bool = True

    @model_validator(mode="after")
    def _wait_covers_settle(self) -> SettleSettings:
        if self.max_wait_seconds < self.seconds:
            raise KeyedProblems(
                [
                    (
                        "max_wait_seconds",
                        f"must be at least settle.seconds "
                        f"({self.max_wait_seconds:g} < {self.seconds:g})",
                    )
                ]
            )
        return self


class ScanSettings(Section):
    interval_seconds: PositiveSeconds = 300
    polling: bool = False


class StateSettings(Section):
    path: AbsolutePath = Path("/var/lib/nucleus-watcher/state.db")


# The config validates `log.format` and `log.level` against these types once; the logging setup
# then only looks the level up.
LogFormat = Literal["auto", "json", "console"]


LogLevel = Literal["debug", "info", "warning", "error", "critical"]


# Other spellings the config accepts for a level, and the level each one means.
LOG_LEVEL_ALIASES: Mapping[str, LogLevel] = {"warn": "warning"}


class LogSettings(Section):
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


class MetricsSettings(Section):
    listen: str = "127.0.0.1:9464"

    _address: tuple[str, int] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _host_port(self) -> MetricsSettings:
        try:
            self._address = parse_listen_address(self.listen)
        except ValueError as exc:
            raise KeyedProblems([("listen", str(exc))]) from None
        return self

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """(host, port) for `Metrics.start_http_server`, or None when metrics are off."""
        return self._address


class DiskSettings(Section):
    min_free_bytes: Annotated[int, BeforeValidator(refuse_bool), Field(ge=0)] = 0
    delete_uploaded_when_low: bool = False
