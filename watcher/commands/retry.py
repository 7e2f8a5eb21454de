"""`nucleus-watcher retry [PATH...]`: re-queue failed items, or ask the running daemon to."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from watcher.config import Settings
from watcher.errors import StoreBusyError
from watcher.pipeline import wiring as pipeline
from watcher.store import retry_request_path


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
