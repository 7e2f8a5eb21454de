"""The commands the CLI offers besides `run` (which is `watcher.service.run_daemon`), one module
each; `watcher.cli` imports them from here:

    check    `check`: the config, and with --online the key and every dataset
    explain  `explain`: what each watch that sees a path makes of it (the daemon's plan lookup)
    retry    `retry`: re-queue failed items, or hand the request to the running daemon
    scan     `run_scan`: one reconcile and upload pass, waiting for jobs
    status   `print_status`: counts, backlog, throughput and last errors, read-only
    demo     `run_demo`: the real daemon on a temporary folder against a local devserver
             (a package; `WEATHERS` and `load_samples` are its shipped samples)

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
