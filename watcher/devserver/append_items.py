"""The items of an append request, from its multipart form or its JSON body, checked."""

from __future__ import annotations

import collections
import json
from typing import Any, Final
from urllib.parse import unquote

from watcher.devserver.catalog import _IncomingItem
from watcher.devserver.multipart import _ReceivedForm, _ReceivedImage
from watcher.devserver.request_failures import _RequestRejected
from watcher.wire import REMOTE_URL_PREFIXES

MAX_FILES_PER_REQUEST: Final = 10


def _item_from_json(raw: Any, *, default_update: bool, image_url_required: bool) -> _IncomingItem:
    if not isinstance(raw, dict):
        raise _RequestRejected(400, "every item must be a JSON object")
    reference_id = raw.get("reference_id")
    if not isinstance(reference_id, str) or not reference_id:
        raise _RequestRejected(400, "every item needs a non-empty string reference_id")
    metadata = raw.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise _RequestRejected(400, f"item {reference_id!r}: metadata must be a JSON object")
    image_url = raw.get("image_url")
    if image_url is None and not image_url_required:
        image_url = ""
    if not isinstance(image_url, str) or (image_url_required and not image_url):
        raise _RequestRejected(400, f"item {reference_id!r}: image_url must be a non-empty string")
    update = raw.get("update", default_update)
    if not isinstance(update, bool):
        raise _RequestRejected(400, f"item {reference_id!r}: update must be true or false")
    return _IncomingItem(reference_id, metadata, image_url, update)


def _parse_json_bytes(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _RequestRejected(400, f"{what} is not valid JSON: {exc}") from None


def _reject_duplicates(items: list[_IncomingItem]) -> None:
    seen: set[str] = set()
    for item in items:
        if item.reference_id in seen:
            raise _RequestRejected(
                400, f"reference_id {item.reference_id!r} appears twice in one request"
            )
        seen.add(item.reference_id)


def _items_from_form(form: _ReceivedForm) -> list[_IncomingItem]:
    """Items of the list form (`items` + `image` parts) or the legacy form (`item` + `image`)."""
    if form.file_part_count > MAX_FILES_PER_REQUEST:
        raise _RequestRejected(
            400,
            f"{form.file_part_count} files in one request; at most {MAX_FILES_PER_REQUEST}",
        )
    if "items" in form.fields:
        if len(form.fields["items"]) != 1:
            raise _RequestRejected(400, "the form must hold exactly one 'items' part")
        raw_items = _parse_json_bytes(form.fields["items"][0], "the 'items' part")
        if not isinstance(raw_items, list) or not raw_items:
            raise _RequestRejected(400, "the 'items' part must be a non-empty JSON list")
        items = [
            _item_from_json(raw, default_update=False, image_url_required=True) for raw in raw_items
        ]
    elif "item" in form.fields:
        if len(form.fields["item"]) != 1 or len(form.images) != 1:
            raise _RequestRejected(400, "the single-item form needs one 'item' and one image part")
        raw_item = _parse_json_bytes(form.fields["item"][0], "the 'item' part")
        item = _item_from_json(raw_item, default_update=False, image_url_required=False)
        item.image_url = item.image_url or form.images[0].filename
        items = [item]
    else:
        raise _RequestRejected(400, "multipart body has neither an 'items' nor an 'item' part")
    _reject_duplicates(items)
    _attach_images(items, form.images)
    return items


def _attach_images(items: list[_IncomingItem], images: list[_ReceivedImage]) -> None:
    # The official client (aiohttp) percent-encodes part filenames; urllib3 sends them raw.
    by_filename: dict[str, collections.deque[_ReceivedImage]] = {}
    for image in images:
        for name in {image.filename, unquote(image.filename)}:
            by_filename.setdefault(name, collections.deque()).append(image)
    used: set[int] = set()
    for item in items:
        candidates = by_filename.get(item.image_url, collections.deque())
        while candidates and id(candidates[0]) in used:
            candidates.popleft()
        if not candidates:
            raise _RequestRejected(
                400,
                f"item {item.reference_id!r}: no image part with filename {item.image_url!r}",
            )
        item.image = candidates.popleft()
        used.add(id(item.image))
    if len(used) != len(images):
        extra = next(image.filename for image in images if id(image) not in used)
        raise _RequestRejected(400, f"image part {extra!r} belongs to no item")


def _items_from_json_body(body: Any) -> list[_IncomingItem]:
    if not isinstance(body, dict):
        raise _RequestRejected(400, "the JSON body must be an object with an 'items' list")
    if "request_id" in body and "items" not in body:
        raise _RequestRejected(
            400, "uploads through a presigned URL (request_id) are not supported by the devserver"
        )
    default_update = body.get("update", False)
    if not isinstance(default_update, bool):
        raise _RequestRejected(400, "update must be true or false")
    raw_items = body.get("items")
    if not isinstance(raw_items, list) or not raw_items:
        raise _RequestRejected(400, "the JSON body needs a non-empty 'items' list")
    items = [
        _item_from_json(raw, default_update=default_update, image_url_required=True)
        for raw in raw_items
    ]
    for item in items:
        if not item.image_url.startswith(REMOTE_URL_PREFIXES):
            raise _RequestRejected(
                400,
                f"item {item.reference_id!r}: image_url must start with "
                f"{', '.join(REMOTE_URL_PREFIXES)}",
            )
    _reject_duplicates(items)
    return items
