"""The small commands: `check`, `explain`, `retry`."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from watcher.config import Settings
from watcher.errors import PathRuleError, StoreBusyError, UploadError, WatcherError
from watcher.files import path_text
from watcher.pipeline import WatchPlan, file_sha256, plans_for
from watcher.pipeline import wiring as pipeline
from watcher.store import StateStore, retry_request_path


def check(settings: Settings, api_key: str | None) -> int:
    """The config loaded (or we would not be here); online, ask the server about each dataset."""
    plans = pipeline.watch_plans(settings)
    print(f"config ok: {len(plans)} watch(es)")
    for plan in plans:
        where = "exists" if plan.root.is_dir() else "missing (will be watched for)"
        print(f"  {plan.key} -> {plan.dataset_id} ({where})")
    if api_key is None:
        return 0
    client = pipeline.nucleus_client(settings, api_key)
    failures = 0
    try:
        for dataset_id in sorted({plan.dataset_id for plan in plans}):
            try:
                info = client.dataset_info(dataset_id)
            except UploadError as exc:
                failures += 1
                print(f"  {dataset_id}: {exc.reason}", file=sys.stderr)
            else:
                print(
                    f"  {dataset_id}: ok ({info.get('name', '?')}, {info.get('length', '?')} items)"
                )
    finally:
        client.close()
    return 1 if failures else 0


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
    else:
        print(f"state:        {record.state} (attempts {record.attempts})")
        if record.last_error:
            print(f"last error:   {record.last_error}")
        if record.metadata_sha256 and record.metadata_sha256 != result.metadata_sha256:
            print(
                "note:         rules changed since it was recorded; it will be re-sent as an update"
            )
    return 0


def retry(settings: Settings, paths: Sequence[Path]) -> int:
    state_path = Path(settings.state.path)
    try:
        store = pipeline.open_store(settings)
    except StoreBusyError:
        # The daemon is the only writer; hand it the request instead of writing beside it.
        request = retry_request_path(state_path)
        temporary = request.with_name(request.name + ".tmp")
        temporary.write_text(json.dumps([str(path.absolute()) for path in paths]))
        os.replace(temporary, request)
        print("the running daemon will re-queue them within a few seconds (see its log)")
        return 0
    try:
        count = store.requeue_failed(paths)
    finally:
        store.close()
    print(f"re-queued {count} item(s)")
    return 0 if count or not paths else 1
