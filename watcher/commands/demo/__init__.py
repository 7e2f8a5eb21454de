"""`nucleus-watcher demo`: the whole pipeline on a temporary folder, no account, no network.

    this process                                        child process
    ------------                                        -------------
    sample writer --writes--> <tmp>/images/{Sunny,Foggy,Rainy}/ <--watches-- nucleus-watcher run
    DevServer (loopback) <---------------- multipart append ------------------------'
        `-- on_request --> one line per stored item, then a summary

The daemon is the real one, a child process (see `child`). The devserver runs in this process so
that each upload can be reported the moment it is stored, and compared byte for byte with the
sample it came from. Writing starts after the daemon's READY=1, so the times shown are from a
running daemon, not from its start-up.

Samples are small images shipped in `watcher/samples/`, named `<weather>-<n>.<ext>`; every third
one is written in pieces, slower than `settle.seconds`, to show a half-written file is not sent.

One concern per module; only the names in `__all__` are for use outside this package:

    samples      `Sample`, `load_samples`, `WEATHERS`: the shipped images
    config_text  the config the daemon runs with, the demo's dataset id and key
    events       what the writer and the devserver put on the queue the reporter reads
    writer       `SampleWriter`: the thread that writes the samples, some slowly
    child        the daemon as a child process: environment, notify socket, start, stop
    signals      SIGTERM/SIGHUP end the demo like Ctrl-C, and clean-up still happens
    report       what is printed: set-up, one line per stored item, summary
    (here)       `run_demo`: puts them together, in order, and cleans up
"""

from __future__ import annotations

import math
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final, TextIO

from watcher.commands.demo.child import (
    POLL_SECONDS,
    child_environment,
    daemon_failed,
    notify_socket,
    start_daemon,
    stop_daemon,
    wait_ready,
)
from watcher.commands.demo.config_text import DEMO_API_KEY, DEMO_DATASET_ID, config_text
from watcher.commands.demo.events import Arrivals, Event
from watcher.commands.demo.report import (
    Reporter,
    byte_identical,
    print_intro,
    print_keep,
    print_summary,
)
from watcher.commands.demo.samples import WEATHERS, Sample, load_samples
from watcher.commands.demo.signals import Signals
from watcher.commands.demo.writer import SampleWriter, write_plan
from watcher.config import load_settings
from watcher.devserver import DevServer
from watcher.errors import ConfigError

__all__ = ["DEMO_DATASET_ID", "WEATHERS", "Sample", "load_samples", "run_demo"]

_UPLOAD_GRACE_SECONDS: Final = 20.0  # after the last write, how long to wait for the last upload


def run_demo(
    *,
    keep: bool,
    seconds: float,
    out: TextIO = sys.stdout,
    link_rate_bytes_per_second: int | None = None,
) -> int:
    """Run the demo; 0 when every sample arrived byte-identical, 1 otherwise, 130 on Ctrl-C.

    `seconds`: about how long writing the samples takes. With `keep`, after the summary the
    daemon and devserver keep running (and uploads keep being reported) until Ctrl-C, and the
    temporary folder is left in place. `link_rate_bytes_per_second`: the devserver reads
    uploads no faster, like a thin uplink.
    """
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(f"demo: --seconds must be a number, 0 or more (got {seconds:g})")
    samples = load_samples()
    if not samples:
        raise ConfigError("demo: no sample images in the installed package (watcher/samples)")
    demo = _Demo(
        samples,
        keep=keep,
        seconds=seconds,
        out=out,
        link_rate_bytes_per_second=link_rate_bytes_per_second,
    )
    with Signals() as signals:
        try:
            return demo.run()
        except KeyboardInterrupt:
            return demo.interrupted()
        finally:
            signals.cleaning_up(demo.process)
            demo.clean_up()


class _Demo:
    """One run: what it started (so that clean-up stops exactly that) and what it reported."""

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        keep: bool,
        seconds: float,
        out: TextIO,
        link_rate_bytes_per_second: int | None,
    ) -> None:
        self._samples = list(samples)
        self._keep = keep
        self._seconds = seconds
        self._link_rate_bytes_per_second = link_rate_bytes_per_second
        self._began = time.monotonic()
        self._events: queue.Queue[Event] = queue.Queue()
        self._reporter = Reporter(out, samples)
        self._root: Path | None = None
        self._server: DevServer | None = None
        self._writer: SampleWriter | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._kept = False  # the summary is out and the demo is waiting for Ctrl-C
        self._code = 1

    def run(self) -> int:
        self._root = root = Path(tempfile.mkdtemp(prefix="nucleus-watcher-demo-"))
        images = root / "images"
        for weather in WEATHERS:
            (images / weather).mkdir(parents=True)
        server = self._start_devserver(root)
        config = root / "config.toml"
        config.write_text(config_text(root, images, server.base_url))
        process = self._start_daemon(config, images, server)
        if process is None:
            return 1
        self._start_writer(images)
        _follow(self._events, self._reporter, process)
        if process.poll() is not None:
            self._reporter.line(daemon_failed(process, "during the demo"))
            return 1
        identical = self._reporter.all_stored and byte_identical(server, self._samples)
        print_summary(self._reporter, self._samples, identical, time.monotonic() - self._began)
        self._code = 0 if identical else 1
        if not self._keep:
            return self._code
        self._kept = True
        print_keep(self._reporter, images, server, root)
        _follow(self._events, self._reporter, process, forever=True)
        self._reporter.line(daemon_failed(process, "while kept running"))
        return 1

    def _start_devserver(self, root: Path) -> DevServer:
        arrivals = Arrivals(self._events)
        self._server = server = DevServer(
            data_dir=root / "devserver",
            api_key=DEMO_API_KEY,
            datasets=[DEMO_DATASET_ID],
            on_request=arrivals,
            link_rate_bytes_per_second=self._link_rate_bytes_per_second,
        )
        server.start()
        arrivals.attach(server)
        return server

    def _start_daemon(
        self, config: Path, images: Path, server: DevServer
    ) -> subprocess.Popen[bytes] | None:
        """The daemon, started and ready; None (and a line saying why) if it did not get ready."""
        with notify_socket(config.parent) as (sock, notify_address):
            env = child_environment(notify_address)
            load_settings(config, environ=env)  # a mistake in it is ours: say so plainly
            self.process = process = start_daemon(config, env)
            print_intro(
                self._reporter,
                images,
                server,
                process.pid,
                config,
                self._link_rate_bytes_per_second,
            )
            if not wait_ready(process, sock):
                self._reporter.line(daemon_failed(process, "before it was ready"))
                return None
        return process

    def _start_writer(self, images: Path) -> None:
        self._reporter.line(
            f"writing {len(self._samples)} sample images over about {self._seconds:g} s;"
            " one line per upload, as the devserver stores it:"
        )
        self._writer = SampleWriter(images, write_plan(self._samples, self._seconds), self._events)
        self._writer.start()

    def interrupted(self) -> int:
        if self._kept:
            return self._code
        self._reporter.line("interrupted; cleaning up")
        return 130

    def clean_up(self) -> None:
        """Stop the writer, the daemon (reaped) and the devserver; remove the folder unless kept."""
        if self._writer is not None:
            self._writer.stop()
        if self.process is not None:
            stop_daemon(self.process)
        if self._server is not None:
            self._server.stop()
        if self._root is None:
            return
        if self._kept:
            self._reporter.line(f"stopped; the demo folder is kept: {self._root}")
        else:
            shutil.rmtree(self._root, ignore_errors=True)


def _follow(
    events: queue.Queue[Event],
    reporter: Reporter,
    process: subprocess.Popen[bytes],
    *,
    forever: bool = False,
) -> None:
    """Report events until every sample is written and stored (or, `forever`, until Ctrl-C),
    the daemon exits, or the last write is long past."""
    while process.poll() is None:
        try:
            reporter.handle(events.get(timeout=POLL_SECONDS))
            continue
        except queue.Empty:
            pass
        if forever:
            continue
        if reporter.all_stored and reporter.writes_done_at is not None:
            return
        done_at = reporter.writes_done_at
        if done_at is not None and time.monotonic() > done_at + _UPLOAD_GRACE_SECONDS:
            return
