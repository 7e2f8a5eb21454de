"""What the demo prints: the set-up, one line per stored item, the summary, the --keep hints."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from watcher.commands.demo.config_text import DEMO_DATASET_ID
from watcher.commands.demo.events import Closed, Event, Note, Stored, WritesDone
from watcher.commands.demo.samples import WEATHERS, Sample
from watcher.devserver import DevServer, StoredItem


class Reporter:
    """Prints the events as they come, and remembers what is needed for the summary."""

    def __init__(self, out: TextIO, expected: Sequence[Sample]) -> None:
        self._out = out
        self._expected = {sample.relpath for sample in expected}
        self._width = max((len(relpath) for relpath in self._expected), default=0)
        self._closed: dict[str, Closed] = {}
        self.stored: dict[str, StoredItem] = {}
        self.writes_done_at: float | None = None

    def line(self, text: str = "") -> None:
        print(text, file=self._out, flush=True)

    @property
    def all_stored(self) -> bool:
        return self._expected <= self.stored.keys()

    def handle(self, event: Event) -> None:
        if isinstance(event, Note):
            self.line(event.text)
        elif isinstance(event, Closed):
            self._closed[event.relpath] = event
        elif isinstance(event, WritesDone):
            self.writes_done_at = event.at
        else:
            self._stored(event)

    def _stored(self, event: Stored) -> None:
        item = event.item
        self.stored[item.reference_id] = item
        verb = "stored " if item.times_written == 1 else "updated"
        metadata = json.dumps(item.metadata, sort_keys=True, ensure_ascii=False)
        closed = self._closed.pop(item.reference_id, None)
        timing = ""
        if closed is not None:
            timing = f"  {(event.at - closed.at) * 1000:4.0f} ms after close"
            if closed.pieces > 1:
                timing += f" (written in {closed.pieces} pieces)"
        self.line(
            f"  {verb} {item.reference_id:<{self._width}}  {metadata:<21}"
            f"  {_size_text(item.image_size_bytes):>8}{timing}"
        )


def _size_text(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "?"
    return f"{size_bytes} B" if size_bytes < 1024 else f"{size_bytes / 1024:.1f} KiB"


def byte_identical(server: DevServer, samples: Sequence[Sample]) -> bool:
    """Every sample is in the dataset, and the devserver's stored copy hashes like the original."""
    items = server.items(DEMO_DATASET_ID)
    for sample in samples:
        item = items.get(sample.relpath)
        if item is None or item.image_sha256 is None:
            return False
        try:
            stored = server.image_bytes(item.image_sha256)
        except (KeyError, OSError):
            return False
        if hashlib.sha256(stored).hexdigest() != sample.sha256:
            return False
    return True


def print_intro(
    reporter: Reporter,
    images: Path,
    server: DevServer,
    pid: int,
    config: Path,
    link_rate_bytes_per_second: int | None,
) -> None:
    folders = " ".join(f"{weather}/" for weather in WEATHERS)
    reporter.line(
        "nucleus-watcher demo: the real daemon on a temporary folder, uploading to a local"
        " stand-in for Nucleus (no account, no network)"
    )
    reporter.line(f"  folder     {images}  ({folders})")
    reporter.line(f"  devserver  {server.base_url}  dataset {DEMO_DATASET_ID}")
    reporter.line('  rule       {weather}/**  ->  {"weather": "{weather}"}')
    reporter.line(f"  daemon     pid {pid}: nucleus-watcher run -c {config}")
    if link_rate_bytes_per_second:
        reporter.line(
            f"  link       the devserver reads uploads at {link_rate_bytes_per_second} bytes/s"
        )


def print_summary(
    reporter: Reporter, samples: Sequence[Sample], identical: bool, seconds: float
) -> None:
    relpaths = {sample.relpath for sample in samples}
    arrived = len(reporter.stored.keys() & relpaths)
    reporter.line(
        f"summary: {arrived} of {len(samples)} files uploaded;"
        f" all byte-identical (sha256 of the devserver's copy): {_yes(identical)};"
        f" {seconds:.1f} s in total"
    )
    missing = sorted(relpaths - reporter.stored.keys())
    if missing:
        reporter.line(
            f"not uploaded: {', '.join(missing)} (the daemon's warnings, if any, are above)"
        )


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def print_keep(reporter: Reporter, images: Path, server: DevServer, root: Path) -> None:
    reporter.line()
    reporter.line("still running (--keep); press Ctrl-C to stop.")
    reporter.line(f"  folder     {images}")
    reporter.line(f"  devserver  {server.base_url}")
    reporter.line(f"  stored in  {server.data_dir}")
    reporter.line(f"  try        cp photo.jpg {images / 'Sunny'}/")
    reporter.line(
        "             any .jpg/.jpeg/.png in a subfolder is uploaded and shown here;"
        " a new subfolder's name becomes a new weather"
    )
    reporter.line(f"  the demo folder {root} is kept when you stop")
