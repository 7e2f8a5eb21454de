"""The state store: the SQLite record of every file, what was sent and what Nucleus confirmed;
the queue's state machine and the reports `status` reads.

A file's life:  pending -> in_flight -> uploaded
                   ^  |         |
                   |  +--> failed (parked with a reason; `retry` or a change re-queues it)
                   +-------- retry later (attempts, next_attempt_at)
plus `incomplete` (never finished writing) and `gone` (deleted locally; its item stays in the
dataset).

Modules: `state_store` (the `StateStore` facade: connection, lock, transactions), `schema`
(migrations, PRAGMA user_version), `opening` (open with retry, the owner lock, damage moved
aside), `diskfull` (writes wait out a full disk), `records` (record types, whole-record reads),
`intake` (recording files on disk), `queue` (the upload state machine), `reports` (counts and
ages), `keys` (watch keys, files beside the database), `states`, `sql` (shared helpers).

May import: `watcher.config`, `watcher.rules`, `watcher.files`, `watcher.errors`.
"""

from watcher.store.keys import retry_request_path as retry_request_path
from watcher.store.keys import watch_key as watch_key
from watcher.store.keys import watch_key_aliases as watch_key_aliases
from watcher.store.keys import watch_root as watch_root
from watcher.store.records import Candidate as Candidate
from watcher.store.records import FileRecord as FileRecord
from watcher.store.records import KnownFile as KnownFile
from watcher.store.state_store import StateStore as StateStore
from watcher.store.states import FileState as FileState
from watcher.store.states import UnknownState as UnknownState
