"""Talking to Nucleus: the value types of an append, streaming multipart with an idle deadline and
a shared rate limit, and the split of every answer into confirmed, retry, permanent or
unauthorized.

May import: `watcher.config`, `watcher.rules`, `watcher.files`, `watcher.errors` (not `store`).
"""

from watcher.nucleus.bandwidth import TokenBucket as TokenBucket
from watcher.nucleus.client import AppendResult as AppendResult
from watcher.nucleus.client import JobState as JobState
from watcher.nucleus.client import NucleusClient as NucleusClient
from watcher.nucleus.client import UploadItem as UploadItem
