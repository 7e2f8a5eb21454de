"""`nucleus-watcher check`: the config, and with --online the key and every dataset."""

from __future__ import annotations

import sys

from watcher.config import Settings
from watcher.errors import UploadError
from watcher.pipeline import wiring as pipeline


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
