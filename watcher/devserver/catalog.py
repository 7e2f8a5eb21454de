"""What the devserver stored: datasets, items and image files, the items.jsonl journal and
its replay, and the metadata type checks that keep a dataset's keys to one type each.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

from watcher.devserver.multipart import _ReceivedImage

_SAFE_DATASET_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class StoredItem:
    """One dataset item as the devserver holds it."""

    reference_id: str
    metadata: dict[str, Any]
    image_url: str  # the part filename / remote URL as received
    image_sha256: str | None  # None for remote-URL items
    image_size_bytes: int | None
    content_type: str | None
    times_written: int  # 1 on create, +1 per update


# --------------------------------------------------------------------------- items and datasets


@dataclass
class _IncomingItem:
    reference_id: str
    metadata: dict[str, Any]
    image_url: str
    update: bool
    image: _ReceivedImage | None = None


@dataclass(frozen=True)
class _ItemProblem:
    reference_id: str
    error: str

    def as_job_error(self) -> str:
        return json.dumps({"reference_id": self.reference_id, "error": self.error})


@dataclass(frozen=True)
class _AppendOutcome:
    new_items: int
    updated_items: int
    ignored_items: int
    problems: list[_ItemProblem]


def _metadata_type(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):  # bool before int: True is an int in Python
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    return "list"


class _Dataset:
    """Items of one dataset and the type each metadata key has taken in it."""

    def __init__(self, dataset_id: str, items_path: Path) -> None:
        self.dataset_id = dataset_id
        self.items: dict[str, StoredItem] = {}
        # Once a key has a type it keeps it, as the service's metadata schema does.
        self.key_types: dict[str, str] = {}
        self._items_path = items_path
        self._items_file: IO[str] | None = None

    def type_problems(
        self, item: _IncomingItem, pending_types: dict[str, tuple[str, str]]
    ) -> list[_ItemProblem]:
        """Type conflicts of `item` against the dataset and earlier items of the same request."""
        problems: list[_ItemProblem] = []
        for key, value in item.metadata.items():
            value_type = _metadata_type(value)
            if value_type is None:
                continue
            known = self.key_types.get(key)
            if known is None and key in pending_types:
                known, other_ref = pending_types[key]
                where = f"item {other_ref!r} of this request"
            else:
                where = f"dataset {self.dataset_id}"
            if known is not None and known != value_type:
                problems.append(
                    _ItemProblem(
                        item.reference_id,
                        f"metadata key {key!r} is a {known} in {where} "
                        f"but item {item.reference_id!r} sends a {value_type}",
                    )
                )
            elif known is None:
                pending_types[key] = (value_type, item.reference_id)
        return problems

    def learn_types(self, metadata: dict[str, Any]) -> None:
        for key, value in metadata.items():
            value_type = _metadata_type(value)
            if value_type is not None:
                self.key_types.setdefault(key, value_type)

    def write_lines(self, lines: list[str]) -> None:
        if self._items_file is None:
            self._items_path.parent.mkdir(parents=True, exist_ok=True)
            self._items_file = self._items_path.open("a", encoding="utf-8")
        self._items_file.write("".join(lines))
        self._items_file.flush()

    def close(self) -> None:
        if self._items_file is not None:
            self._items_file.close()
            self._items_file = None


def _journal_line(item: StoredItem | None, reference_id: str) -> str:
    written_at = datetime.now(UTC).isoformat()
    if item is None:
        return json.dumps({"reference_id": reference_id, "deleted": True, "at": written_at}) + "\n"
    return json.dumps({**asdict(item), "at": written_at}) + "\n"


class _Catalog:
    """Everything the devserver stored: datasets, items and images, safe across threads."""

    def __init__(self, data_dir: Path, allowed_datasets: Sequence[str] | None) -> None:
        self.images_dir = data_dir / "images"
        self.incoming_dir = data_dir / "incoming"
        self._datasets_dir = data_dir / "datasets"
        self._allowed = frozenset(allowed_datasets) if allowed_datasets is not None else None
        self._lock = threading.Lock()
        self._datasets: dict[str, _Dataset] = {}
        self._image_paths: dict[str, Path] = {}

    # -- start and stop

    def load(self) -> None:
        for directory in (self.images_dir, self.incoming_dir, self._datasets_dir):
            directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.incoming_dir.iterdir():
            leftover.unlink(missing_ok=True)
        for image_path in self.images_dir.iterdir():
            self._image_paths[image_path.name.split(".", 1)[0]] = image_path
        for items_path in sorted(self._datasets_dir.glob("*/items.jsonl")):
            dataset_id = items_path.parent.name
            if self.dataset_exists(dataset_id):
                self._replay(self._dataset(dataset_id), items_path)

    def close(self) -> None:
        with self._lock:
            for dataset in self._datasets.values():
                dataset.close()

    def _replay(self, dataset: _Dataset, items_path: Path) -> None:
        with items_path.open(encoding="utf-8") as lines:
            for line in lines:
                try:
                    entry = json.loads(line)
                    reference_id = entry["reference_id"]
                    if entry.get("deleted"):
                        dataset.items.pop(reference_id, None)
                        continue
                    item = StoredItem(
                        reference_id=reference_id,
                        metadata=entry["metadata"],
                        image_url=entry["image_url"],
                        image_sha256=entry["image_sha256"],
                        image_size_bytes=entry["image_size_bytes"],
                        content_type=entry["content_type"],
                        times_written=entry["times_written"],
                    )
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash; the items before it still count
                dataset.items[reference_id] = item
                dataset.learn_types(item.metadata)

    # -- lookups

    def dataset_exists(self, dataset_id: str) -> bool:
        if not _SAFE_DATASET_ID.fullmatch(dataset_id):
            return False
        if self._allowed is not None:
            return dataset_id in self._allowed
        return dataset_id.startswith("ds_")

    def _dataset(self, dataset_id: str) -> _Dataset:
        dataset = self._datasets.get(dataset_id)
        if dataset is None:
            dataset = _Dataset(dataset_id, self._datasets_dir / dataset_id / "items.jsonl")
            self._datasets[dataset_id] = dataset
        return dataset

    def items(self, dataset_id: str) -> dict[str, StoredItem]:
        with self._lock:
            dataset = self._datasets.get(dataset_id)
            return dict(dataset.items) if dataset is not None else {}

    def item(self, dataset_id: str, reference_id: str) -> StoredItem | None:
        with self._lock:
            dataset = self._datasets.get(dataset_id)
            return dataset.items.get(reference_id) if dataset is not None else None

    def dataset_summary(self, dataset_id: str) -> tuple[int, dict[str, str]]:
        with self._lock:
            dataset = self._datasets.get(dataset_id)
            if dataset is None:
                return 0, {}
            return len(dataset.items), dict(dataset.key_types)

    def image_path(self, sha256: str) -> Path:
        with self._lock:
            path = self._image_paths.get(sha256)
        if path is None:
            raise KeyError(f"no stored image with sha256 {sha256}")
        return path

    # -- changes

    def delete(self, dataset_id: str, reference_id: str) -> bool:
        with self._lock:
            dataset = self._datasets.get(dataset_id)
            if dataset is None or dataset.items.pop(reference_id, None) is None:
                return False
            dataset.write_lines([_journal_line(None, reference_id)])
            return True

    def append(self, dataset_id: str, incoming: list[_IncomingItem]) -> _AppendOutcome:
        """Apply a whole request, or nothing of it when any written item breaks a rule."""
        with self._lock:
            dataset = self._dataset(dataset_id)
            plan: list[tuple[_IncomingItem, StoredItem | None]] = []
            ignored = 0
            problems: list[_ItemProblem] = []
            pending_types: dict[str, tuple[str, str]] = {}
            for item in incoming:
                existing = dataset.items.get(item.reference_id)
                if existing is not None and not item.update:
                    ignored += 1
                    continue
                problems.extend(dataset.type_problems(item, pending_types))
                plan.append((item, existing))
            if problems:
                return _AppendOutcome(0, 0, 0, problems)

            new_count = updated_count = 0
            lines: list[str] = []
            for item, existing in plan:
                image = item.image
                stored = StoredItem(
                    reference_id=item.reference_id,
                    metadata=item.metadata,
                    image_url=item.image_url,
                    image_sha256=image.sha256 if image else None,
                    image_size_bytes=image.size_bytes if image else None,
                    content_type=image.content_type if image else None,
                    times_written=1 if existing is None else existing.times_written + 1,
                )
                if image is not None:
                    self._keep_image(image)
                dataset.items[item.reference_id] = stored
                dataset.learn_types(item.metadata)
                lines.append(_journal_line(stored, item.reference_id))
                if existing is None:
                    new_count += 1
                else:
                    updated_count += 1
            if lines:
                dataset.write_lines(lines)
            return _AppendOutcome(new_count, updated_count, ignored, [])

    def _keep_image(self, image: _ReceivedImage) -> None:
        if image.sha256 in self._image_paths:
            image.temp_path.unlink(missing_ok=True)  # same bytes already stored
            return
        final_path = self.images_dir / f"{image.sha256}.{image.extension}"
        os.replace(image.temp_path, final_path)
        self._image_paths[image.sha256] = final_path
