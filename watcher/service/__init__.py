"""Running as a service: the daemon's loop, signals and reload, the systemd notify protocol,
Prometheus metrics and structured logs.

May import: `watcher.pipeline` and everything below it.
"""

from watcher.service.daemon import run_daemon as run_daemon
from watcher.service.logs import add_secret as add_secret
from watcher.service.logs import configure_logging as configure_logging
from watcher.service.logs import reset_logging as reset_logging
from watcher.service.metrics import Metrics as Metrics
from watcher.service.sdnotify import SystemdNotifier as SystemdNotifier
