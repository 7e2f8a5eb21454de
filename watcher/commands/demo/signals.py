"""The demo's own signal handling: whatever ends it, it still stops the daemon and cleans up."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Final

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class Signals:
    """While the demo runs, SIGTERM and SIGHUP end it like Ctrl-C, so it still cleans up.

    During clean-up a further signal kills the daemon instead of waiting for its orderly stop,
    and clean-up goes on. Signal handlers can only be set from the main thread; elsewhere this
    does nothing."""

    _SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self._previous: dict[int, _Handler] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._enabled = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> Signals:
        if self._enabled:
            for signum in self._SIGNALS:
                # An ignored signal stays ignored: `nohup nucleus-watcher demo --keep` is meant.
                if signal.getsignal(signum) != signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._interrupt)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def cleaning_up(self, process: subprocess.Popen[bytes] | None) -> None:
        self._process = process
        for signum in self._previous:
            signal.signal(signum, self._hurry)

    def _interrupt(self, _signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    def _hurry(self, _signum: int, _frame: FrameType | None) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
