"""The official client (`scale-nucleus`) appending local files, as a user would script it.

    python bench/official_append.py --endpoint URL --dataset ds_... --root DIR --result OUT.json

Every *.jpg under DIR becomes DatasetItem(image_location=path, reference_id=relpath,
metadata={"camera": "bench", "frame": N}); `dataset.append(items)` sends them 10 files per
request with 10 requests in flight (the client's own defaults), then waits for every job. The
client's 5 s job-polling sleep is patched to 0 so the time is transfer, not sleeping. The API
key comes from NUCLEUS_API_KEY, as the client reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--result", required=True, type=Path)
    parser.add_argument("--files-per-request", type=int, default=10)
    args = parser.parse_args()

    started = time.perf_counter()
    import nucleus  # type: ignore[import-untyped]
    from nucleus import async_job

    # sleep_until_complete() sleeps JOB_POLLING_INTERVAL (5 s) after every status poll.
    async_job.JOB_POLLING_INTERVAL = 0
    imported = time.perf_counter()

    root: Path = args.root
    items = []
    for path in sorted(root.rglob("*.jpg")):
        relpath = path.relative_to(root).as_posix()
        frame = re.search(r"frame_(\d+)", relpath)
        metadata: dict[str, object] = {"camera": "bench"}
        if frame:
            metadata["frame"] = int(frame.group(1))
        items.append(
            nucleus.DatasetItem(image_location=str(path), reference_id=relpath, metadata=metadata)
        )
    client = nucleus.NucleusClient(os.environ["NUCLEUS_API_KEY"], endpoint=args.endpoint)
    dataset = client.get_dataset(args.dataset)
    sending = time.perf_counter()
    job = dataset.append(items, local_files_per_upload_request=args.files_per_request)
    job.sleep_until_complete(verbose_std_out=False)
    finished = time.perf_counter()
    args.result.write_text(
        json.dumps(
            {
                "items": len(items),
                "import_seconds": imported - started,
                "append_seconds": finished - sending,
                "in_process_seconds": finished - started,
                # Like `scan`'s own "in N s": after imports, walk to confirmed.
                "work_seconds": finished - imported,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
