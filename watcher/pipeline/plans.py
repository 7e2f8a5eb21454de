"""The watches, compiled, and which of them a path belongs to.

`plans_for` is the one lookup from a path to its watches: the daemon routes events with it and
`explain` answers with it, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from watcher.files import PathFilter, path_text
from watcher.rules import RuleSet


@dataclass(frozen=True)
class WatchPlan:
    """One `[[watch]]`, compiled: what the reconcile and the live intake need of it."""

    key: str  # names the watch in the store, logs and metrics (see store.watch_key)
    root: Path
    dataset_id: str
    recursive: bool
    path_filter: PathFilter
    rules: RuleSet
    polling: bool = False
    aliases: tuple[str, ...] = ()  # keys this watch had under other configs (store.watch_key)


def relpath_of(root: Path, path: Path) -> str | None:
    """`path` relative to `root` with "/" separators, in its text form (see pathtext.py), or
    None if it is not inside `root`."""
    try:
        return path_text(path.relative_to(root).as_posix())
    except ValueError:
        return None


def plans_for(plans: Sequence[WatchPlan], path: Path) -> list[tuple[WatchPlan, str]]:
    """Every watch that sees `path` (one folder may feed several datasets; a watch inside
    another's folder feeds another dataset), with the path's relpath in each."""
    found = []
    for plan in plans:
        relpath = relpath_of(plan.root, path)
        if relpath is not None and (plan.recursive or "/" not in relpath):
            found.append((plan, relpath))
    return found


def plans_taking(plans: Sequence[WatchPlan], path: Path) -> tuple[WatchPlan, ...]:
    """The watches that see `path` and whose include/exclude let it in."""
    return tuple(
        plan for plan, relpath in plans_for(plans, path) if plan.path_filter.accepts(relpath)
    )
