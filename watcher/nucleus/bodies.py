"""What an append sends: the multipart form for local files (the items JSON, then each image,
hashed as it streams) and the JSON body for remote URLs, as `shared/nucleus-api.md` describes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any, Final

from requests_toolbelt.multipart.encoder import MultipartEncoder

from watcher.errors import LocalFileError, NotARegularFile, PermanentUploadError
from watcher.files import open_regular_file
from watcher.nucleus.types import UploadItem

_IMAGE_CONTENT_TYPES: Final = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".bmp": "image/bmp",
}
# Multipart filenames stay plain ASCII: parsers disagree on how a non-ASCII or quoted filename
# is encoded in the part header, and the name must match `image_url` in the items JSON exactly.
_FILENAME_SAFE_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+"
)
_FILENAME_MAX_CHARS: Final = 120


class HashingFile:
    """A file part as the multipart encoder reads it, hashed on the way out: the hash of
    exactly the bytes sent, even if the file is rewritten while it streams."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self._digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self._digest.update(data)
        return data

    # The encoder sizes the part with fstat and tell, as it would the file itself.
    def fileno(self) -> int:
        return self._handle.fileno()

    def tell(self) -> int:
        return self._handle.tell()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def multipart_form(
    items: Sequence[UploadItem], open_files: ExitStack
) -> tuple[MultipartEncoder, dict[str, HashingFile]]:
    """The form of a local-file append, and each item's file part by reference_id.

    The files are opened into `open_files`, so they stay open while the caller streams.
    """
    fields: list[tuple[str, tuple[str | None, Any, str]]] = []
    payload: list[dict[str, Any]] = []
    hashed: dict[str, HashingFile] = {}
    for index, item in enumerate(items):
        assert item.path is not None  # append() sends only local items this way
        content_type = _image_content_type(item.path)
        handle = HashingFile(open_files.enter_context(_open_image(item.path)))
        hashed[item.reference_id] = handle
        filename = _multipart_filename(index, item.path)
        payload.append(
            {
                "reference_id": item.reference_id,
                "metadata": dict(item.metadata),
                "image_url": filename,
                "update": item.update,
            }
        )
        fields.append(("image", (filename, handle, content_type)))
    items_json = _dumps_items(payload, items)
    fields.insert(0, ("items", (None, items_json, "application/json")))
    return MultipartEncoder(fields=fields), hashed


def remote_items_json(items: Sequence[UploadItem]) -> bytes:
    """The JSON body of a remote-URL append; the items must agree on `update` (one flag)."""
    update_flags = {item.update for item in items}
    if len(update_flags) != 1:
        raise ValueError("remote-URL items in one append must agree on update; group them")
    payload = [
        {
            "reference_id": item.reference_id,
            "metadata": dict(item.metadata),
            "image_url": item.remote_url,
        }
        for item in items
    ]
    return json.dumps({"items": payload, "update": update_flags.pop()}, allow_nan=False).encode()


def _image_content_type(path: Path) -> str:
    content_type = _IMAGE_CONTENT_TYPES.get(path.suffix.lower())
    if content_type is None:
        raise LocalFileError(path, f"unsupported image type {path.suffix or '(no extension)'!r}")
    return content_type


def _open_image(path: Path) -> IO[bytes]:
    try:
        return open_regular_file(path)
    except NotARegularFile as exc:
        raise LocalFileError(path, exc.strerror or "not a regular file") from None
    except OSError as exc:
        raise LocalFileError(path, f"cannot open: {exc.strerror or type(exc).__name__}") from None


def _multipart_filename(index: int, path: Path) -> str:
    """`{index}-{basename}` with anything but plain ASCII name characters replaced by `_`."""
    cleaned = "".join(ch if ch in _FILENAME_SAFE_CHARS else "_" for ch in path.name)
    if len(cleaned) > _FILENAME_MAX_CHARS:
        suffix = "".join(ch if ch in _FILENAME_SAFE_CHARS else "_" for ch in path.suffix)[:16]
        cleaned = cleaned[: _FILENAME_MAX_CHARS - len(suffix)] + suffix
    return f"{index}-{cleaned or 'image'}"


def _dumps_items(payload: list[dict[str, Any]], items: Sequence[UploadItem]) -> str:
    try:
        return json.dumps(payload, allow_nan=False)
    except (TypeError, ValueError) as exc:
        # Name the item at fault: a batch is split on a permanent error, and its reason shows.
        for entry, item in zip(payload, items, strict=True):
            try:
                json.dumps(entry, allow_nan=False)
            except (TypeError, ValueError):
                raise PermanentUploadError(
                    f"metadata of {item.reference_id!r} is not valid JSON: {exc}"
                ) from None
        raise PermanentUploadError(f"items are not valid JSON: {exc}") from None
