"""The upload stage: workers that claim batches from the store, send them through the client,
follow asynchronous jobs and record what became of every file.

`uploader` (the workers: claim, send, split a batch after a permanent error), `gate` (when a
worker may claim: stop, a 401 pause, the backoff hold, the burst linger, the thin-link limit),
`link_rate` (request size and requests in flight from the rate the uplink achieves), `outcomes`
(an answer or a failure -> store rows, log lines, events), `job_follower` (asynchronous jobs),
`shared_client` (the client across API-key changes), `policy` (the settings it runs by, the
backoff delay) and `events` (the `UploadEvents` Protocol and its fan-out).

May import: `watcher.nucleus`, `watcher.store` and everything below them; nothing else of
`watcher.pipeline`.
"""

from watcher.pipeline.upload.events import FanOutEvents as FanOutEvents
from watcher.pipeline.upload.events import UploadEvents as UploadEvents
from watcher.pipeline.upload.link_rate import (
    START_RATE_BYTES_PER_SECOND as START_RATE_BYTES_PER_SECOND,
)
from watcher.pipeline.upload.link_rate import LinkRate as LinkRate
from watcher.pipeline.upload.link_rate import RequestShape as RequestShape
from watcher.pipeline.upload.policy import UploadPolicy as UploadPolicy
from watcher.pipeline.upload.policy import backoff_delay as backoff_delay
from watcher.pipeline.upload.uploader import Uploader as Uploader
