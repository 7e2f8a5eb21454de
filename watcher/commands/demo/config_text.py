"""The config file the demo writes for its daemon, and the values the two share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

# Accepted only by the devserver this demo starts; it is handed to the daemon through its
# environment and never printed.
DEMO_API_KEY: Final = "demo-key"
DEMO_DATASET_ID: Final = "ds_demo"

_SETTLE_SECONDS: Final = 1.0
_DAEMON_STOP_TIMEOUT_SECONDS: Final = 5.0  # the daemon's upload.stop_timeout_seconds


def config_text(root: Path, images: Path, endpoint: str) -> str:
    """A config that watches `images` (one subfolder per weather), keeps its state under `root`
    and uploads to `endpoint` quickly: short settle and retry times, warnings only."""

    def text(value: str) -> str:
        return json.dumps(value)  # a JSON string is a valid TOML basic string

    return f"""\
# Written by `nucleus-watcher demo`; see config.example.toml for every key.
[nucleus]
endpoint = {text(endpoint)}
timeout_seconds = 30

[upload]
retry_initial_seconds = 0.2
retry_max_seconds = 2
stop_timeout_seconds = {_DAEMON_STOP_TIMEOUT_SECONDS}

[settle]
seconds = {_SETTLE_SECONDS}
max_wait_seconds = 60

[state]
path = {text(str(root / "state" / "state.db"))}

[log]
level = "warning"

[metrics]
listen = ""

[[watch]]
path = {text(str(images))}
dataset_id = {text(DEMO_DATASET_ID)}
reference_id = "{{relpath}}"

  [[watch.rules]]
  match = "{{weather}}/**"
  metadata = {{ weather = "{{weather}}" }}
"""
