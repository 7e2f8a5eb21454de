"""Files recorded in a real store as the reconcile would, then claimed and confirmed as the
uploader would: the starting point of after_upload and the free-space guard."""

from __future__ import annotations

import hashlib
import os
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

from watcher.store import Candidate, FileRecord, StateStore

MiB = 1024 * 1024


def write_file(root: Path, relpath: str, data: bytes, *, mtime_s: int | None = None) -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_s is not None:
        os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))
    return path


def _sha256_of(path: Path) -> str:
    with path.open("rb") as f:  # streamed: some of these files are 1 GiB
        return hashlib.file_digest(f, "sha256").hexdigest()


def record(store: StateStore, root: Path, relpath: str, *, remote_url: str | None = None) -> None:
    """Record the file as it is on disk now (pending), as the reconcile would."""
    st = (root / relpath).stat()
    store.record_candidate(
        Candidate(
            watch=str(root),
            relpath=relpath,
            dataset_id="ds_cam",
            reference_id=f"cam/{relpath}",
            size_bytes=st.st_size,
            mtime_ns=st.st_mtime_ns,
            content_sha256=_sha256_of(root / relpath),
            metadata={"camera": "back"},
            metadata_sha256="m1",
            remote_url=remote_url,
        )
    )


def send(store: StateStore) -> list[FileRecord]:
    """Claim every pending file (one dataset, one kind) as the uploader does: now in flight."""
    batch = store.claim_batch(10)
    assert batch, "nothing was pending"
    return batch


def send_and_confirm(store: StateStore) -> list[FileRecord]:
    batch = send(store)
    store.mark_confirmed([r.id for r in batch])
    return batch


def state_of(store: StateStore, root: Path, relpath: str) -> str:
    found = store.get(str(root), relpath)
    assert found is not None
    return found.state


def events_named(
    logs: Sequence[MutableMapping[str, Any]], name: str
) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]
