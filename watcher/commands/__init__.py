"""One module per command the CLI offers: `scan`, `status`, `explain`, `retry`, `demo` (`run` is
`watcher.service`).

May import: `watcher.service`, `watcher.devserver` and everything below them.
"""

from watcher.commands.check import check as check
from watcher.commands.demo import WEATHERS as WEATHERS
from watcher.commands.demo import load_samples as load_samples
from watcher.commands.demo import run_demo as run_demo
from watcher.commands.explain import explain as explain
from watcher.commands.retry import retry as retry
from watcher.commands.scan import run_scan as run_scan
from watcher.commands.status import print_status as print_status
