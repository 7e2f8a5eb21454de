"""FanOutEvents: every consumer hears every upload event, past a broken one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import structlog

from tests.uploadedfiles import events_named, record, send_and_confirm, write_file
from watcher.pipeline import AfterUpload, FanOutEvents, UploadEvents
from watcher.store import FileRecord, StateStore


class _BrokenConsumer(UploadEvents):
    """Names UploadEvents as its base, so the four events it leaves out do nothing."""

    def confirmed(self, records: Sequence[FileRecord]) -> None:
        raise RuntimeError("metrics exporter bug")


class _Recorder:
    """No base class: anything with the five methods is an UploadEvents."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def confirmed(self, records: Sequence[FileRecord]) -> None:
        self.calls.append(("confirmed", [r.relpath for r in records]))

    def parked(self, records: Sequence[FileRecord], reason: str) -> None:
        self.calls.append(("parked", reason))

    def retrying(
        self, records: Sequence[FileRecord], kind: str, reason: str, delay_seconds: float
    ) -> None:
        self.calls.append(("retrying", delay_seconds))

    def request_done(self, seconds: float, bytes_sent: int, ok: bool) -> None:
        self.calls.append(("request_done", bytes_sent))

    def job_finished(self, status: str) -> None:
        self.calls.append(("job_finished", status))


def test_fan_out_reaches_every_consumer_even_past_a_broken_one(
    store: StateStore, root: Path
) -> None:
    write_file(root, "a.jpg", b"aaaa")
    record(store, root, "a.jpg")
    confirmed = send_and_confirm(store)
    recorder = _Recorder()
    events = FanOutEvents([_BrokenConsumer(), AfterUpload("delete", None, store), recorder])

    with structlog.testing.capture_logs() as logs:
        events.confirmed(confirmed)
        events.parked(confirmed, "HTTP 413")
        events.retrying(confirmed, "http_5xx", "HTTP 503", 2.5)
        events.request_done(0.1, 1234, True)
        events.job_finished("Completed")

    assert not (root / "a.jpg").exists()
    assert recorder.calls == [
        ("confirmed", ["a.jpg"]),
        ("parked", "HTTP 413"),
        ("retrying", 2.5),
        ("request_done", 1234),
        ("job_finished", "Completed"),
    ]
    [failure] = events_named(logs, "upload_event_consumer_failed")
    assert failure["consumer"] == "_BrokenConsumer"
