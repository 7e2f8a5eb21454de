"""Logging setup: JSON lines for journald, a readable console on a terminal, secrets redacted.

Call `configure_logging` once at start (and again on reload; it replaces the previous setup).
Everything goes through the standard library's root logger to one handler, so structlog events
and foreign stdlib lines (watchdog, urllib3, ...) share one renderer and one redaction step.

Conventions for callers:

* Get a logger per module: ``log = structlog.get_logger("watcher.<module>")``. Only loggers
  under ``watcher`` follow the configured level; everything else is shown from WARNING up.
* One event name per kind of thing that happened, in snake_case (``"upload_confirmed"``,
  ``"settle_timeout"``); details go in key/value pairs, never into the event text.
* Every line about a file carries ``path``, ``reference_id`` and ``dataset_id`` (``None`` when
  not known yet), so a single file can be followed with ``journalctl -o cat | jq``.
* Log exceptions with ``log.exception("event_name", ...)`` or ``exc_info=True``; in JSON the
  traceback becomes one string field, ``exception``, so each event stays one line.
* Register the API key through ``secrets=`` or `add_secret` as soon as it is loaded. The key and
  its HTTP Basic forms are replaced by ``[redacted]`` in every value, in exception text and in the
  final rendered line.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from watcher.config import LogFormat, LogLevel
from watcher.files import path_text

REDACTED = "[redacted]"

_LEVEL_NUMBERS: Mapping[LogLevel, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Third-party libraries are chatty below WARNING (urllib3 logs every connection at DEBUG).
_FOREIGN_MIN_LEVEL = logging.WARNING
_OWN_LOGGER_NAME = "watcher"

# Fields a reader scans first; the rest of a JSON line keeps the order the caller bound them in.
_LEADING_FIELDS = ("timestamp", "level", "logger", "event")


class SecretRedactor:
    """Replaces registered secrets, and the shapes they take on the wire, with ``[redacted]``.

    Used as a structlog processor on the event dict and again on the rendered line. The compiled
    pattern is swapped in one assignment, so threads that are logging never see it half-built.
    """

    def __init__(self) -> None:
        self._update_lock = threading.Lock()
        self._forms: frozenset[str] = frozenset()
        self._pattern: re.Pattern[str] | None = None

    def clear(self) -> None:
        """Forget every registered secret."""
        with self._update_lock:
            self._set_forms(frozenset())

    def add(self, secret: str) -> None:
        """Also redact this secret (earlier ones stay redacted)."""
        secret = secret.strip()
        if not secret:
            # An empty pattern would match between every character of every line.
            return
        with self._update_lock:
            self._set_forms(self._forms | _wire_forms(secret))

    def redact_text(self, text: str) -> str:
        pattern = self._pattern
        if pattern is None:
            return text
        return pattern.sub(REDACTED, text)

    def redact_value(self, value: object) -> object:
        """A copy of `value` safe to render: strings redacted, containers walked."""
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            # A file name with bytes that are not UTF-8 is logged in its text form.
            return self.redact_text(path_text(value))
        if isinstance(value, Mapping):
            return {self.redact_value(key): self.redact_value(item) for key, item in value.items()}
        if isinstance(value, tuple):
            return tuple(self.redact_value(item) for item in value)
        if isinstance(value, list | set | frozenset):
            return [self.redact_value(item) for item in value]
        # Anything else would be rendered through str()/repr() later, out of our sight (an
        # exception object whose message quotes a header, a requests.PreparedRequest, ...).
        # Turn it into text here so the secret check sees exactly what will be written.
        return self.redact_text(_describe(value))

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        return {self.redact_text(key): self.redact_value(item) for key, item in event_dict.items()}

    def redact_rendered(self, logger: WrappedLogger, method_name: str, rendered: object) -> str:
        """Last processor: a final pass over the finished line (keys, reprs, anything missed)."""
        # Typed `object` because structlog's Processor type promises an event dict here; after
        # a renderer it is the rendered text.
        return self.redact_text(rendered if isinstance(rendered, str) else _describe(rendered))

    def _set_forms(self, forms: frozenset[str]) -> None:
        self._forms = forms
        if not forms:
            self._pattern = None
            return
        # Longest first, so the padded Basic form wins over its unpadded prefix.
        ordered = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(form) for form in ordered))


def _wire_forms(secret: str) -> frozenset[str]:
    """The key itself and how it looks inside an ``Authorization: Basic`` header.

    Nucleus takes the key as the Basic-auth user name with an empty password, so the header
    carries base64("<key>:"); some tools print it without the trailing ``=`` padding.
    """
    basic = base64.b64encode(f"{secret}:".encode()).decode("ascii")
    return frozenset({secret, basic, basic.rstrip("=")})


def _describe(value: object) -> str:
    try:
        return str(value)
    except Exception:
        try:
            return repr(value)
        except Exception:
            return f"<unprintable {type(value).__name__}>"


_REDACTOR = SecretRedactor()


def add_secret(value: str) -> None:
    """Redact `value` (e.g. an API key loaded after SIGHUP) from every later log line."""
    _REDACTOR.add(value)


def _put_leading_fields_first(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> EventDict:
    ordered: EventDict = {key: event_dict[key] for key in _LEADING_FIELDS if key in event_dict}
    ordered.update((key, item) for key, item in event_dict.items() if key not in ordered)
    return ordered


class _WatcherLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Our root handler; its own class so a second `configure_logging` finds and replaces it."""


def configure_logging(
    *,
    format: LogFormat = "auto",
    level: LogLevel = "info",
    stream: TextIO | None = None,
    secrets: Sequence[str] = (),
) -> None:
    """Route structlog and stdlib logging to `stream` (default: stderr), redacting `secrets`.

    `format` is "json", "console", or "auto" (console when `stream` is a terminal). Calling it
    again replaces the handler and level of the previous call. Secrets are only ever added:
    a reload that forgets to pass the key again must not start printing it, and an old key can
    still show up in a retry that began before the reload. `reset_logging` forgets them.
    """
    level_number = _LEVEL_NUMBERS[level]
    target = sys.stderr if stream is None else stream
    is_tty = _is_tty(target)
    use_console = format == "console" or (format == "auto" and is_tty)

    for secret in secrets:
        _REDACTOR.add(secret)

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    _configure_structlog(timestamper)
    handler = _WatcherLogHandler(target)
    handler.setFormatter(_formatter(use_console, is_tty, timestamper))
    root = logging.getLogger()
    _remove_our_handlers(root)
    root.addHandler(handler)
    root.setLevel(max(_FOREIGN_MIN_LEVEL, level_number))
    logging.getLogger(_OWN_LOGGER_NAME).setLevel(level_number)


def _formatter(
    use_console: bool, is_tty: bool, timestamper: Processor
) -> structlog.stdlib.ProcessorFormatter:
    """The one formatter every line goes through: ours and foreign stdlib ones alike."""
    renderer: Processor
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(
            colors=is_tty and "NO_COLOR" not in os.environ,
            # The traceback arrives as text (already redacted) in "exception"; the plain
            # formatter prints that text instead of re-rendering the live exception object.
            exception_formatter=structlog.dev.plain_traceback,
        )
    else:
        # ensure_ascii stays on: a file name with undecodable bytes holds lone surrogates, and
        # writing those raw to a UTF-8 stream would raise and lose the whole line.
        renderer = structlog.processors.JSONRenderer()

    final_processors: list[Processor] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        # Tracebacks become text before redaction, so a key quoted in an exception is caught.
        structlog.processors.format_exc_info,
        _REDACTOR,
    ]
    if not use_console:
        final_processors.append(_put_leading_fields_first)
    final_processors += [renderer, _REDACTOR.redact_rendered]

    return structlog.stdlib.ProcessorFormatter(
        # Lines from stdlib loggers (watchdog, urllib3) get the same fields as ours.
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
        ],
        processors=final_processors,
    )


def _configure_structlog(timestamper: Processor) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.filter_by_level,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.PositionalArgumentsFormatter(),
            timestamper,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Module-level loggers are created at import, possibly before this runs; caching would
        # pin them to whatever configuration was current at their first call.
        cache_logger_on_first_use=False,
    )


def reset_logging() -> None:
    """Undo `configure_logging`: remove our handler, restore structlog defaults, drop secrets.

    For tests and for tools that embed the package and want their own logging back.
    """
    _remove_our_handlers(logging.getLogger())
    logging.getLogger(_OWN_LOGGER_NAME).setLevel(logging.NOTSET)
    structlog.reset_defaults()
    _REDACTOR.clear()


def _remove_our_handlers(root: logging.Logger) -> None:
    for old in [h for h in root.handlers if isinstance(h, _WatcherLogHandler)]:
        root.removeHandler(old)
        # Not close(): the stream belongs to the caller (usually sys.stderr).


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        # A closed or unusual stream is certainly not a terminal a person is reading.
        return False
