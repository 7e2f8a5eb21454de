"""watcher.logs: JSON lines off a terminal, console on one, and the API key never printed."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog

from watcher.service import add_secret, configure_logging, reset_logging

# 21 characters: "<key>:" is 22 bytes, so its base64 form ends in "==" padding.
API_KEY = "live_4f9c2a7e1b3d8c6a0"
BASIC_PADDED = base64.b64encode(f"{API_KEY}:".encode()).decode()
BASIC_UNPADDED = BASIC_PADDED.rstrip("=")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class FakeTty(io.StringIO):
    """A stream that claims to be a terminal, as the console renderer's trigger."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    saved_level = root.level
    yield
    reset_logging()
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    structlog.reset_defaults()


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def assert_no_secret(text: str) -> None:
    # The unpadded Basic form is a prefix of the padded one, so this covers both.
    assert API_KEY not in text
    assert BASIC_UNPADDED not in text


def test_json_lines_off_a_tty_carry_event_level_timestamp_and_fields() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream)
    log = structlog.get_logger("watcher.uploader")

    log.info(
        "upload_confirmed", path="/srv/cam/a.jpg", reference_id="cam1/a.jpg", dataset_id="ds_1"
    )
    log.debug("claim_started")  # below the default level "info"

    [line] = json_lines(stream)
    assert line["event"] == "upload_confirmed"
    assert line["level"] == "info"
    assert line["logger"] == "watcher.uploader"
    assert line["path"] == "/srv/cam/a.jpg"
    assert line["reference_id"] == "cam1/a.jpg"
    assert line["dataset_id"] == "ds_1"
    stamp = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == UTC.utcoffset(None)
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60


def test_level_applies_to_own_loggers_and_foreign_ones_start_at_warning() -> None:
    stream = io.StringIO()
    configure_logging(format="json", level="debug", stream=stream)

    structlog.get_logger("watcher.settle").debug("settle_waiting", path="/srv/cam/b.jpg")
    logging.getLogger("urllib3.connectionpool").info("Starting new HTTPS connection")
    logging.getLogger("watchdog.observers").warning("inotify watch limit reached")

    events = [(line["logger"], line["level"], line["event"]) for line in json_lines(stream)]
    assert events == [
        ("watcher.settle", "debug", "settle_waiting"),
        ("watchdog.observers", "warning", "inotify watch limit reached"),
    ]


def test_key_and_basic_auth_forms_are_redacted_from_values() -> None:
    assert BASIC_PADDED.endswith("=")  # the padded and unpadded forms really differ
    stream = io.StringIO()
    configure_logging(format="json", stream=stream, secrets=[API_KEY])

    structlog.get_logger("watcher.nucleus_client").warning(
        "request_failed",
        authorization=f"Basic {BASIC_PADDED}",
        curl=f"curl -H 'Authorization: Basic {BASIC_UNPADDED}' ...",
        detail={"sent": [f"key={API_KEY}"]},
        error=ValueError(f"rejected key {API_KEY}"),
    )

    output = stream.getvalue()
    assert_no_secret(output)
    [line] = json_lines(stream)
    assert line["authorization"] == "Basic [redacted]"
    assert line["curl"] == "curl -H 'Authorization: Basic [redacted]' ..."
    assert line["detail"] == {"sent": ["key=[redacted]"]}
    assert line["error"] == "rejected key [redacted]"


def test_key_is_redacted_from_exception_text_which_stays_one_json_line() -> None:
    stream = io.StringIO()
    configure_logging(format="json", stream=stream, secrets=[API_KEY])
    log = structlog.get_logger("watcher.uploader")

    try:
        raise RuntimeError(f"401 for Authorization: Basic {BASIC_PADDED} (key {API_KEY})")
    except RuntimeError:
        log.exception("upload_failed", path="/srv/cam/c.jpg")

    assert_no_secret(stream.getvalue())
    [line] = json_lines(stream)
    assert line["event"] == "upload_failed"
    assert line["level"] == "error"
    assert "Traceback" in line["exception"]
    assert (
        "RuntimeError: 401 for Authorization: Basic [redacted] (key [redacted])"
        in (line["exception"])
    )


def test_stdlib_logging_lines_are_json_and_redacted() -> None:
    stream = io.StringIO()
    configure_logging(format="json", stream=stream, secrets=[API_KEY])
    urllib3_log = logging.getLogger("urllib3")
    # Importing the official client (the devserver fidelity test does) sets urllib3 to ERROR.
    urllib3_log.setLevel(logging.NOTSET)

    urllib3_log.warning("Retrying with header %s", f"Basic {BASIC_UNPADDED}")
    try:
        raise ConnectionError(f"reset while sending key {API_KEY}")
    except ConnectionError:
        urllib3_log.error("connection dropped", exc_info=True)

    assert_no_secret(stream.getvalue())
    first, second = json_lines(stream)
    assert first["logger"] == "urllib3"
    assert first["level"] == "warning"
    assert first["event"] == "Retrying with header Basic [redacted]"
    assert "timestamp" in first
    assert second["level"] == "error"
    assert "ConnectionError: reset while sending key [redacted]" in second["exception"]


def test_secret_added_later_is_redacted_and_survives_reconfiguration() -> None:
    first_stream = io.StringIO()
    configure_logging(format="json", stream=first_stream)
    log = structlog.get_logger("watcher.daemon")
    new_key = "live_after_sighup_77e3"

    add_secret(new_key)
    log.info("config_reloaded", note=f"key is {new_key}")
    second_stream = io.StringIO()
    configure_logging(format="json", stream=second_stream)  # a reload, without secrets=
    log.info("still_secret", note=new_key)

    [first] = json_lines(first_stream)
    assert first["note"] == "key is [redacted]"
    [second] = json_lines(second_stream)  # the old stream got nothing more
    assert second["event"] == "still_secret"
    assert second["note"] == "[redacted]"


def test_console_format_on_a_tty_is_readable_and_redacted() -> None:
    tty = FakeTty()
    configure_logging(stream=tty, secrets=[API_KEY])
    log = structlog.get_logger("watcher.uploader")

    log.info("upload_confirmed", path="/srv/cam/a.jpg", dataset_id="ds_1")
    try:
        raise RuntimeError(f"key {API_KEY} refused")
    except RuntimeError:
        log.exception("upload_failed")

    text = ANSI_ESCAPE.sub("", tty.getvalue())
    first_line = text.splitlines()[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(first_line)
    assert "upload_confirmed" in first_line
    assert "path=/srv/cam/a.jpg" in first_line
    assert "dataset_id=ds_1" in first_line
    assert "RuntimeError: key [redacted] refused" in text
    assert_no_secret(text)
