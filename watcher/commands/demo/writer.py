"""Writing the samples into the watched folder over about `--seconds`, some of them slowly."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from watcher.commands.demo.events import Closed, Event, Note, WritesDone
from watcher.commands.demo.samples import WEATHERS, Sample

_SLOW_CHUNKS: Final = 4
# A slow file is being written for longer than settle.seconds, so it is the image check and
# the events for each piece, not a quiet second, that keep it from being sent half-written.
_SLOW_MIN_SPAN_SECONDS: Final = 1.5


@dataclass(frozen=True)
class Write:
    """One piece of one sample, and when to write it."""

    at_seconds: float  # after the writer starts
    sample: Sample
    piece: int
    pieces: int


def write_plan(samples: Sequence[Sample], seconds: float) -> list[Write]:
    """Start one file every seconds/len(samples); every third one goes in pieces, slowly."""
    slot = seconds / max(1, len(samples))
    slow_span = max(2 * slot, _SLOW_MIN_SPAN_SECONDS)
    plan: list[Write] = []
    for index, sample in enumerate(_interleaved(samples)):
        start = index * slot
        if index % 3 == 1:
            step = slow_span / (_SLOW_CHUNKS - 1)
            plan.extend(
                Write(start + piece * step, sample, piece, _SLOW_CHUNKS)
                for piece in range(_SLOW_CHUNKS)
            )
        else:
            plan.append(Write(start, sample, 0, 1))
    return sorted(plan, key=lambda write: write.at_seconds)


def _interleaved(samples: Sequence[Sample]) -> list[Sample]:
    """Round-robin over the weathers, rotating, so each weather gets a slow file."""
    by_weather = [[s for s in samples if s.weather == weather] for weather in WEATHERS]
    rounds = max((len(group) for group in by_weather), default=0)
    order: list[Sample] = []
    for round_index in range(rounds):
        for offset in range(len(WEATHERS)):
            group = by_weather[(round_index + offset) % len(WEATHERS)]
            if round_index < len(group):
                order.append(group[round_index])
    return order


class SampleWriter:
    """A thread that carries out a write plan; `stop()` ends it between writes."""

    def __init__(self, folder: Path, plan: Sequence[Write], events: queue.Queue[Event]) -> None:
        self._folder = folder
        self._plan = list(plan)
        self._events = events
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        open_files: dict[str, BinaryIO] = {}
        started = time.monotonic()
        try:
            for write in self._plan:
                delay = started + write.at_seconds - time.monotonic()
                if delay > 0 and self._stopping.wait(delay):
                    return
                if self._stopping.is_set():
                    return
                self._write(write, open_files)
        except OSError as exc:  # the folder was removed or the disk is full: say so and end
            self._events.put(Note(f"  cannot write the samples: {exc}"))
        finally:
            for handle in open_files.values():
                handle.close()
            self._events.put(WritesDone(time.monotonic()))

    def _write(self, write: Write, open_files: dict[str, BinaryIO]) -> None:
        sample = write.sample
        data = sample.data
        if write.piece == 0:
            open_files[sample.relpath] = (self._folder / sample.relpath).open("wb")
            if write.pieces > 1:
                span = self._plan_span(sample)
                self._events.put(
                    Note(
                        f"  writing {sample.relpath} slowly: {write.pieces} pieces over"
                        f" {span:.1f} s; it is not sent before it is complete"
                    )
                )
        handle = open_files[sample.relpath]
        begin = len(data) * write.piece // write.pieces
        end = len(data) * (write.piece + 1) // write.pieces
        handle.write(data[begin:end])
        handle.flush()
        if write.piece == write.pieces - 1:
            handle.close()
            closed_at = time.monotonic()
            del open_files[sample.relpath]
            self._events.put(Closed(sample.relpath, closed_at, write.pieces))

    def _plan_span(self, sample: Sample) -> float:
        times = [write.at_seconds for write in self._plan if write.sample == sample]
        return max(times) - min(times)
