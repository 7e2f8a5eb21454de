"""The state store: the SQLite record of every file, what was sent and what Nucleus confirmed; the
queue's state machine and the reports `status` reads.

May import: `watcher.config`, `watcher.rules`, `watcher.files`, `watcher.errors`.
"""

from watcher.store.state_store import FAILED as FAILED
from watcher.store.state_store import GONE as GONE
from watcher.store.state_store import IN_FLIGHT as IN_FLIGHT
from watcher.store.state_store import INCOMPLETE as INCOMPLETE
from watcher.store.state_store import PENDING as PENDING
from watcher.store.state_store import STATES as STATES
from watcher.store.state_store import UPLOADED as UPLOADED
from watcher.store.state_store import Candidate as Candidate
from watcher.store.state_store import FileRecord as FileRecord
from watcher.store.state_store import KnownFile as KnownFile
from watcher.store.state_store import StateStore as StateStore
from watcher.store.state_store import retry_request_path as retry_request_path
from watcher.store.state_store import watch_key as watch_key
from watcher.store.state_store import watch_key_aliases as watch_key_aliases
from watcher.store.state_store import watch_root as watch_root
