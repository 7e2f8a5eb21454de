"""Talking to Nucleus: one append, job or info request at a time, streamed within an idle
deadline and a shared rate limit, each answer split into a result or a retryable, permanent or
unauthorized error. Retrying, batching and the state store are the uploader's business.

    types        UploadItem, AppendResult, JobState, JobStatus: what goes in and comes out
    client       NucleusClient: the routes, building each request and reading its answer
    bodies       the multipart form (files hashed as they stream) and the remote-URL JSON
    transport    connections that report to the deadline, the paced body, the answer reader
    deadline     the idle deadline per request and the one reaper thread that enforces it
    answers      status codes, network failures and JSON bodies -> results or errors
    tls          the default CA bundle widened by the user's `ca_bundle`, in a temp file
    bandwidth    TokenBucket: the byte rate all upload workers share

May import: `watcher.config`, `watcher.rules`, `watcher.files`, `watcher.errors`,
`watcher.wire` (not `store`).
"""

from watcher.nucleus.bandwidth import TokenBucket as TokenBucket
from watcher.nucleus.client import NucleusClient as NucleusClient
from watcher.nucleus.types import AppendResult as AppendResult
from watcher.nucleus.types import JobState as JobState
from watcher.nucleus.types import JobStatus as JobStatus
from watcher.nucleus.types import UploadItem as UploadItem
