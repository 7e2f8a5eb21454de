"""One look at a file the settler waits for, taken without the settler's lock: its lstat,
what it is, and (when the verdict can matter) whether the image is whole."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from watcher.files import FileKind, check_image_complete, kind_of


class Observation(NamedTuple):
    size_bytes: int
    mtime_ns: int


def observation_of(st: os.stat_result) -> Observation:
    return Observation(st.st_size, st.st_mtime_ns)


# Stands in for the observation of a file that could not be stat'ed, so that parking works for it.
UNREADABLE = Observation(-1, -1)


# An image check's verdict (None: complete), and the state it was made on.
Verified = tuple[Observation, str | None]


@dataclass(frozen=True)
class Look:
    """What one look at a file found (taken without the lock)."""

    vanished: bool = False
    st: os.stat_result | None = None
    not_regular_reason: str | None = None
    unreadable_reason: str | None = None
    verified: Verified | None = None


def look_at(
    path: Path,
    *,
    verify_image: bool,
    closed_hint: bool,
    previous: Observation | None,
    verified: Verified | None,
) -> Look:
    """lstat `path`, and check the image when its verdict could matter: with `verify_image`,
    after a close or once size and mtime held still since the `previous` look, and not
    again for a state already `verified`."""
    try:
        # lstat: a symlink is not followed, so nothing outside the watch root is read.
        st = os.lstat(path)
    except FileNotFoundError:
        return Look(vanished=True)
    except OSError as exc:
        return Look(unreadable_reason=f"unreadable: {exc.strerror}")
    kind = kind_of(st)
    if kind is not FileKind.REGULAR:
        # Never opened: reading a FIFO would block or steal a writer's data.
        return Look(st=st, not_regular_reason=kind.value)
    observation = observation_of(st)
    worth_checking = closed_hint or observation == previous
    already_checked = verified is not None and verified[0] == observation
    if not verify_image or not worth_checking or already_checked:
        return Look(st=st)
    reason = check_image_complete(path)
    try:
        st_after = os.lstat(path)
    except FileNotFoundError:
        return Look(vanished=True)
    except OSError as exc:
        return Look(unreadable_reason=f"unreadable: {exc.strerror}")
    if observation_of(st_after) != observation:
        # Written to while we read head and tail: the verdict belongs to no real state.
        return Look(st=st_after)
    return Look(st=st, verified=(observation, reason))
