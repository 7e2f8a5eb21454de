"""A local stand-in for the Nucleus dataset-append API, with fault injection.

It speaks the wire contract of `nucleus-api.md` over real HTTP/1.1 (keep-alive, TCP_NODELAY),
streams uploads to disk while hashing them, and keeps what it accepted in a folder a person can
read::

    <data_dir>/images/<sha256>.<ext>           every accepted image, stored once by content
    <data_dir>/datasets/<id>/items.jsonl       one JSON line per created/updated/deleted item
    <data_dir>/incoming/                       uploads in flight (emptied on start)

A devserver started again on the same folder replays the items files, so it remembers what it
stored. Jobs live in memory only.

Validation is all-or-nothing per request: when one item breaks a rule, nothing in that request is
stored (a sync request gets 400, an async one a job that ends `Errored_User`).

One thing per module (the leading-underscore names are private to this package):

    request_failures  `_RequestRejected`, `_ClientGone`: how a request ends early
    body              `_BodyReader`: one request body, Content-Length or chunked, under a cap
    multipart         `_MultipartReceiver`: the streaming multipart receiver, file parts written
                      to disk and hashed as they arrive; the received parts and form
    catalog           `StoredItem`, `_Catalog`: datasets, items, image files, the items.jsonl
                      journal and its replay, metadata type checks
    jobs              `_JobBook`: async append jobs, in memory
    faults            `FAULT_KINDS`, `_FaultPlan`: fault kinds and which append gets which fault
    routes            `API_PREFIX`, `_Route`: API paths parsed into routes
    append_items      the items of an append request, from its multipart form or JSON body
    request_log       `RequestRecord`, `_RequestLog`: every request as the devserver saw it
    context           `_ServerContext`: what every connection thread shares
    handler           `_Handler`: HTTP/1.1 requests, answers, faults acted out
    http_server       `_HttpServer`: the threaded server that knows (and ends) its connections
    server            `DevServer` and `serve_forever_cli`
"""

from watcher.devserver.append_items import MAX_FILES_PER_REQUEST as MAX_FILES_PER_REQUEST
from watcher.devserver.catalog import StoredItem
from watcher.devserver.faults import FAULT_KINDS
from watcher.devserver.request_log import RequestRecord
from watcher.devserver.routes import API_PREFIX as API_PREFIX
from watcher.devserver.server import DEFAULT_MAX_BODY_BYTES as DEFAULT_MAX_BODY_BYTES
from watcher.devserver.server import DevServer, serve_forever_cli

__all__ = [
    "FAULT_KINDS",
    "DevServer",
    "RequestRecord",
    "StoredItem",
    "serve_forever_cli",
]
