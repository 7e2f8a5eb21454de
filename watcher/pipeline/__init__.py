"""The data path, stage by stage: intake (watchdog) -> settle -> reconcile (classify, record) ->
uploader (claim, send, confirm) -> after-upload and free space; `wiring` builds each stage from
its part of the settings and connects them.

The live front: `intake` supervises one watchdog observer per watch (`observers`: inotify, its
overflows and limits, polling), whose events `intake_events` hands to a sink; `plans` maps a path
to its watches; `settle` decides when a file is finished; `reconcile` walks the roots and takes
the settler's files, and `examine` decides each one.

The upload stage is the `upload` subpackage (workers, their gate, outcomes, jobs, link rate);
`after_upload` and `free_space` act on files the dataset confirmed; `wiring` builds and connects
every part.

May import: `watcher.nucleus`, `watcher.store` and everything below them.
"""

from watcher.pipeline.after_upload import AfterUpload as AfterUpload
from watcher.pipeline.examine import Outcome as Outcome
from watcher.pipeline.examine import file_sha256 as file_sha256
from watcher.pipeline.free_space import FreeSpaceGuard as FreeSpaceGuard
from watcher.pipeline.intake import Intake as Intake
from watcher.pipeline.intake_events import WatchSpec as WatchSpec
from watcher.pipeline.plans import WatchPlan as WatchPlan
from watcher.pipeline.plans import plans_for as plans_for
from watcher.pipeline.reconcile import Reconciler as Reconciler
from watcher.pipeline.settle import CLOSE_GRACE_SECONDS as CLOSE_GRACE_SECONDS
from watcher.pipeline.settle import IncompleteFile as IncompleteFile
from watcher.pipeline.settle import ReadyFile as ReadyFile
from watcher.pipeline.settle import Settler as Settler
from watcher.pipeline.upload import START_RATE_BYTES_PER_SECOND as START_RATE_BYTES_PER_SECOND
from watcher.pipeline.upload import FanOutEvents as FanOutEvents
from watcher.pipeline.upload import LinkRate as LinkRate
from watcher.pipeline.upload import RequestShape as RequestShape
from watcher.pipeline.upload import Uploader as Uploader
from watcher.pipeline.upload import UploadEvents as UploadEvents
from watcher.pipeline.upload import UploadPolicy as UploadPolicy
from watcher.pipeline.upload import backoff_delay as backoff_delay
