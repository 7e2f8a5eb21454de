"""HTTP/1.1: the request handler (routing, auth, appends, acting out faults, answers)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import socket
import struct
import sys
import traceback
from http.server import BaseHTTPRequestHandler
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from python_multipart.multipart import parse_options_header

from watcher.devserver.append_items import (
    MAX_FILES_PER_REQUEST,
    _items_from_form,
    _items_from_json_body,
    _parse_json_bytes,
)
from watcher.devserver.body import _BodyReader
from watcher.devserver.catalog import StoredItem, _IncomingItem
from watcher.devserver.context import _ContextServer
from watcher.devserver.faults import _Fault, _retry_after_text
from watcher.devserver.multipart import _MAX_FIELD_BYTES, _MultipartReceiver, _ReceivedForm
from watcher.devserver.request_failures import _ClientGone, _RequestRejected
from watcher.devserver.request_log import RequestRecord
from watcher.devserver.routes import _Route

_MAX_SMALL_BODY_BYTES: Final = 1 << 20  # bodies of GET/DELETE (the official client sends "{}")
_RESET_READ_BYTES: Final = 64 << 10
_STALL_SECONDS: Final = 300.0
_IDLE_CONNECTION_SECONDS: Final = 300.0
_LINGER_DRAIN_SECONDS: Final = 2.0


def _item_answer(dataset_id: str, item: StoredItem) -> dict[str, Any]:
    item_id = "di_" + hashlib.sha256(f"{dataset_id}/{item.reference_id}".encode()).hexdigest()[:20]
    return {
        "item": {
            "id": item_id,
            "dataset_item_id": item_id,
            "reference_id": item.reference_id,
            "ref_id": item.reference_id,
            "metadata": item.metadata,
            "image_url": item.image_url,
            "original_image_url": item.image_url,
        },
        "annotations": {},
    }


# --------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    """One connection; BaseHTTPRequestHandler loops over its keep-alive requests."""

    protocol_version = "HTTP/1.1"
    server_version = "nucleus-devserver/1"
    sys_version = ""
    timeout = _IDLE_CONNECTION_SECONDS
    server: _ContextServer

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: every request is reported once, as a RequestRecord."""

    # -- the request

    def _dispatch(self) -> None:
        self._url = urlsplit(self.path)
        self._status = 0
        self._item_count = 0
        self._fault: str | None = None
        self._recorded = False
        self._body: _BodyReader | None = None
        try:
            self._body = self._open_body()
            self._route_request(self._url.path, self._url.query)
        except _RequestRejected as rejected:
            self._answer_error(rejected)
        except _ClientGone:
            self.close_connection = True
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self._answer_error(_RequestRejected(500, "devserver internal error"))
        finally:
            self._record()

    def _record(self) -> None:
        """Report this request once; before its answer goes out, so a client that has the
        answer also finds the record."""
        if not self._recorded:
            self._recorded = True
            self.server.context.log.add(
                RequestRecord(
                    self.command,
                    self._url.path,
                    self._url.query,
                    self._status,
                    self._item_count,
                    self._fault,
                )
            )

    def _open_body(self) -> _BodyReader:
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length_text = self.headers.get("Content-Length")
        content_length: int | None = None
        if length_text is not None and not chunked:
            try:
                content_length = int(length_text)
            except ValueError:
                self.close_connection = True
                raise _RequestRejected(400, "Content-Length is not a number") from None
            if content_length < 0:
                self.close_connection = True
                raise _RequestRejected(400, "Content-Length is negative")
        max_bytes = self.server.context.max_body_bytes
        reader = _BodyReader(
            self.rfile, content_length, chunked, max_bytes, self.server.context.link
        )
        if content_length is not None and content_length > max_bytes:
            raise _RequestRejected(413, f"request body is larger than {max_bytes} bytes")
        return reader

    def _route_request(self, path: str, query: str) -> None:
        context = self.server.context
        route = _Route.parse(path)
        is_append = route is not None and route.name == "append" and self.command == "POST"
        if is_append:
            context.log.count_append()
        if context.down:
            self._fault = "down"
            raise _RequestRejected(503, "the endpoint is down (devserver set_down)")
        if route is None:
            raise _RequestRejected(404, f"no route {self.command} {path}")
        self._check_auth()
        if is_append:
            self._append(route.dataset_id, query)
            return
        self._finish_small_body()
        self._answer_read_route(route)

    def _check_auth(self) -> None:
        header = self.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        key = ""
        if scheme.lower() == "basic":
            try:
                key = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                key = ""
            key = key.partition(":")[0]
        expected = self.server.context.api_key
        accepted = bool(key) and (
            expected is None or hmac.compare_digest(key.encode(), expected.encode())
        )
        if not accepted:
            raise _RequestRejected(
                401,
                "invalid API key: send it as the HTTP Basic username with an empty password",
                headers={"WWW-Authenticate": 'Basic realm="nucleus"'},
            )

    def _answer_read_route(self, route: _Route) -> None:
        context = self.server.context
        catalog = context.catalog
        if route.name in ("job", "job_errors", "job_info"):
            job = context.jobs.get(route.job_id)
            if job is None or self.command != "GET":
                raise _RequestRejected(404, f"no job {route.job_id}")
            if route.name == "job":
                self._answer_json(200, job.status_answer())
            elif route.name == "job_info":
                self._answer_json(200, job.info_answer())
            else:
                done = job.status() != "Running"
                self._answer_json(200, job.errors if done else [])
            return
        if not catalog.dataset_exists(route.dataset_id):
            raise _RequestRejected(404, f"no dataset {route.dataset_id}")
        if route.name == "dataset_info" and self.command == "GET":
            length, key_types = catalog.dataset_summary(route.dataset_id)
            self._answer_json(
                200,
                {
                    "dataset_id": route.dataset_id,
                    "name": route.dataset_id,
                    "length": length,
                    "model_run_ids": [],
                    "slice_ids": [],
                    "annotation_metadata_schema": {},
                    "item_metadata_schema": key_types,
                    "tags": [],
                    "is_scene": False,
                },
            )
        elif route.name == "dataset_property" and self.command == "GET":
            value = route.dataset_id if route.property_name == "name" else False
            self._answer_json(200, {route.property_name: value})
        elif route.name == "refloc" and self.command == "GET":
            item = catalog.item(route.dataset_id, route.reference_id)
            if item is None:
                raise _RequestRejected(404, f"no item {route.reference_id!r} in {route.dataset_id}")
            self._answer_json(200, _item_answer(route.dataset_id, item))
        elif route.name == "refloc" and self.command == "DELETE":
            if not catalog.delete(route.dataset_id, route.reference_id):
                raise _RequestRejected(404, f"no item {route.reference_id!r} in {route.dataset_id}")
            self._answer_json(200, {"dataset_id": route.dataset_id, "deleted": 1})
        else:
            raise _RequestRejected(405, f"{self.command} is not allowed here")

    # -- appends

    def _append(self, dataset_id: str, query: str) -> None:
        context = self.server.context
        if not context.catalog.dataset_exists(dataset_id):
            raise _RequestRejected(404, f"no dataset {dataset_id}")
        fault = context.faults.next_fault()
        if fault is not None:
            self._fault = fault.kind
            if self._fault_before_items(fault):
                return
        asynchronous = parse_qs(query).get("async", ["0"])[-1].lower() in ("1", "true")
        content_type, options = parse_options_header(self.headers.get("Content-Type", ""))
        if content_type == b"multipart/form-data":
            boundary = options.get(b"boundary")
            if not boundary:
                raise _RequestRejected(400, "multipart Content-Type without a boundary")
            form = self._receive_form(boundary)
            try:
                items = _items_from_form(form)
                self._item_count = len(items)
                answer = self._apply(dataset_id, items, asynchronous)
            finally:
                form.discard_images()  # kept images were renamed away already
        elif content_type == b"application/json":
            body = _parse_json_bytes(self._read_body(_MAX_FIELD_BYTES), "the JSON body")
            items = _items_from_json_body(body)
            self._item_count = len(items)
            answer = self._apply(dataset_id, items, asynchronous)
        else:
            raise _RequestRejected(
                400, "append takes multipart/form-data or application/json bodies"
            )
        self._answer_append(answer, fault)

    def _apply(self, dataset_id: str, items: list[_IncomingItem], asynchronous: bool) -> Any:
        context = self.server.context
        outcome = context.catalog.append(dataset_id, items)
        if asynchronous:
            return context.jobs.create(outcome, len(items)).info_answer()
        if outcome.problems:
            raise _RequestRejected(400, outcome.problems[0].error)
        return {
            "dataset_id": dataset_id,
            "new_items": outcome.new_items,
            "updated_items": outcome.updated_items,
            "ignored_items": outcome.ignored_items,
            "upload_errors": 0,
        }

    def _receive_form(self, boundary: bytes) -> _ReceivedForm:
        assert self._body is not None
        receiver = _MultipartReceiver(
            boundary, self.server.context.catalog.incoming_dir, MAX_FILES_PER_REQUEST
        )
        try:
            while piece := self._body.read_some():
                receiver.feed(piece)
            return receiver.finish()
        except BaseException:
            receiver.abandon()
            raise

    def _read_body(self, max_bytes: int) -> bytes:
        assert self._body is not None
        return self._body.read_all(max_bytes)

    def _finish_small_body(self) -> None:
        assert self._body is not None
        if self._body.declared_bytes and self._body.declared_bytes > _MAX_SMALL_BODY_BYTES:
            raise _RequestRejected(413, f"this body may be at most {_MAX_SMALL_BODY_BYTES} bytes")
        self._body.read_all(_MAX_SMALL_BODY_BYTES)

    # -- faults

    def _fault_before_items(self, fault: _Fault) -> bool:
        """Act out a fault that comes before the items are stored; True when the request is over."""
        assert self._body is not None
        if fault.kind in ("500", "503", "429"):
            self._body.discard()
            headers = {}
            if fault.kind == "429":
                headers["Retry-After"] = _retry_after_text(fault.retry_after_seconds)
            raise _RequestRejected(int(fault.kind), f"injected fault {fault.kind}", headers=headers)
        if fault.kind == "reset":
            declared = self._body.declared_bytes
            wanted = min(
                _RESET_READ_BYTES, max(1, declared // 2) if declared else _RESET_READ_BYTES
            )
            self._body.read_some(wanted)
            self._reset_connection()
            return True
        if fault.kind == "stall":
            self._body.discard()
            self._record()
            self.server.context.stopping.wait(_STALL_SECONDS)
            self.close_connection = True
            return True
        return False  # drip and lost act after the items are stored

    def _reset_connection(self) -> None:
        self._record()
        # SO_LINGER 0 turns close() into a TCP RST, which the client sees as "connection reset".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # the buffered reader holds a reference that would delay the close
        self.connection.close()
        self.close_connection = True

    def _answer_append(self, answer: Any, fault: _Fault | None) -> None:
        if fault is not None and fault.kind == "lost":
            self._record()
            self.close_connection = True  # stored, but the client never hears of it
            return
        drip = fault is not None and fault.kind == "drip"
        self._answer_json(200, answer, drip=drip)

    # -- answers

    def _answer_error(self, rejected: _RequestRejected) -> None:
        body = self._body
        if body is not None and not body.finished and not self.close_connection:
            # Read what the client is still sending, so that it gets to read our answer.
            if body.declared_over_cap:
                self.close_connection = True
            else:
                try:
                    body.discard()
                except _RequestRejected:
                    self.close_connection = True
                except (_ClientGone, OSError):
                    self.close_connection = True
                    return  # nobody left to answer
        answer = {"error": rejected.message, "status_code": rejected.status}
        try:
            self._answer_json(rejected.status, answer, headers=rejected.headers)
        except OSError:
            self.close_connection = True
            return
        if self.close_connection and body is not None and not body.finished:
            self._lingering_close(body)

    def _lingering_close(self, body: _BodyReader) -> None:
        """Half-close after an early answer and drop what still arrives for a moment: closing
        with unread data would send a reset that can wipe the answer before the client reads it."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(_LINGER_DRAIN_SECONDS)
            body.drop_rest(_LINGER_DRAIN_SECONDS)
        except OSError:
            pass

    def _answer_json(
        self,
        status: int,
        answer: Any,
        *,
        headers: dict[str, str] | None = None,
        drip: bool = False,
    ) -> None:
        payload = json.dumps(answer).encode()
        self._status = status
        self._record()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not drip:
            self.wfile.write(payload)
            return
        context = self.server.context
        for index in range(len(payload)):
            self.wfile.write(payload[index : index + 1])
            if index + 1 < len(payload) and context.stopping.wait(
                context.drip_byte_interval_seconds
            ):
                self.close_connection = True
                return
