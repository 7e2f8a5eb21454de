"""`nucleus-watcher explain PATH`: what each watch that sees a file makes of it.

The watches come from `watcher.pipeline.plans_for`, the lookup the daemon uses for a settled
file, so `explain` names exactly the watches the daemon records the file under.
"""

from __future__ import annotations

import json
from pathlib import Path

from watcher.config import Settings
from watcher.errors import PathRuleError, WatcherError
from watcher.files import path_text
from watcher.pipeline import WatchPlan, file_sha256, plans_for
from watcher.pipeline import wiring as pipeline
from watcher.store import StateStore


def explain(settings: Settings, path: Path) -> int:
    """What each watch that sees `path` makes of it (one folder may feed several datasets)."""
    found = plans_for(pipeline.watch_plans(settings), path.absolute())
    if not found:
        raise WatcherError(f"{path_text(str(path))}: not inside any watch folder")
    worst = 0
    for index, (plan, relpath) in enumerate(found):
        if index:
            print()
        worst = max(worst, _explain_one(settings, plan, relpath, path))
    return worst


def _explain_one(settings: Settings, plan: WatchPlan, relpath: str, path: Path) -> int:
    print(f"watch:        {plan.key}")
    print(f"relpath:      {relpath}")
    print(f"dataset_id:   {plan.dataset_id}")
    if not plan.path_filter.accepts(relpath):
        print("included:     no (excluded by include/exclude)")
        return 1
    mtime_ns = path.stat().st_mtime_ns if path.exists() else 0
    try:
        result = plan.rules.classify(relpath, mtime_ns=mtime_ns, sha256=lambda: file_sha256(path))
    except PathRuleError as exc:
        print(f"rules:        refused: {exc}")
        return 1
    print(f"reference_id: {result.reference_id}")
    print(f"metadata:     {json.dumps(result.metadata, sort_keys=True, ensure_ascii=False)}")
    if result.remote_url:
        print(f"remote_url:   {result.remote_url}")
    _print_record(settings, plan, relpath, result.metadata_sha256)
    return 0


def _print_record(settings: Settings, plan: WatchPlan, relpath: str, metadata_sha256: str) -> None:
    """The store's record of the file under this watch, read-only (the daemon may be running)."""
    record = None
    state_path = Path(settings.state.path)
    if state_path.exists():
        store = StateStore.open_read_only(state_path)
        try:
            record = store.get(plan.key, relpath)
        finally:
            store.close()
    if record is None:
        print("state:        not recorded yet")
        return
    print(f"state:        {record.state} (attempts {record.attempts})")
    if record.last_error:
        print(f"last error:   {record.last_error}")
    if record.classified and record.metadata_sha256 != metadata_sha256:
        print("note:         rules changed since it was recorded; it will be re-sent as an update")
