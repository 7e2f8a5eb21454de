"""The state store: the SQLite record of every file, what was sent and what Nucleus confirmed;
the queue's state machine and the reports `status` reads.

A file's life (`FileState`):

    pending -> in_flight -> uploaded
       ^  |         |
       |  +--> failed (parked with a reason; `retry` or a change re-queues it)
       +-------- retry later (attempts, next_attempt_at)

plus `incomplete` (never finished writing) and `gone` (deleted locally; its item stays in the
dataset). A row refused before classification has `classified = 0`; one the next walk must look
at again whatever its size and mtime has `reexamine = 1`.

Modules, each owning one thing:
    state_store      `StateStore`, the facade: the connection, its lock, write transactions
    opening          open with retry, the owner lock, damage moved aside, read-only opening
    diskfull         writes wait out a full disk instead of failing
    schema           the migrations (PRAGMA user_version) and running them
    records          FileRecord, Candidate, KnownFile; reading rows as records
    intake_decision  what recording a file does to its row: a pure function
    intake           recording files on disk (candidates, problems, gone, adopted rows)
    queue            the upload state machine: claims and what each answer does
    reports          counts, ages, throughput, jobs in flight
    keys             watch keys and the files kept beside the database
    states           FileState, UnknownState, parse_state
    sql              the write transaction and placeholders

May import: `watcher.config`, `watcher.rules`, `watcher.files`, `watcher.errors`.
"""

from watcher.store.intake_decision import IntakeOutcome as IntakeOutcome
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
