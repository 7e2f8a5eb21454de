"""Settings: the TOML file and the environment, validated into typed models, with one line per
problem; units (sizes, rates, addresses) and secrets (the API key, file checks).

`Settings` is a pydantic-settings `BaseSettings` over two sources: the parsed file (`document`)
and, on top of it, the environment (`environment`: `NUCLEUS_WATCHER_<SECTION>__<KEY>`,
`NUCLEUS_WATCHER_WATCH__<i>__<KEY>`, `NUCLEUS_WATCHER_DEVICE_ID`, and `NUCLEUS_ENDPOINT` as the
official client reads it). The environment source is our own, not pydantic-settings', so that it
can reach the i-th `[[watch]]`, read the mapping a caller passes (tests, reload), and name the
variable that set a bad value. Each section is a frozen model (`sections`, `watch`), so every
stage is handed only its part; unknown keys are errors, and values that depend on each other,
the rules and their templates included, are checked when the models are built: a bad config
stops the daemon at start, not on the first file. `messages` turns pydantic's errors into
`config.toml: at 'watch[0].rules[1].regex': message`, one per line; `loading` is the entry point.

May import: `watcher.rules`, `watcher.files`, `watcher.errors`.
"""

from watcher.config.loading import check_files as check_files
from watcher.config.loading import load_settings as load_settings
from watcher.config.loading import settings_from_mapping as settings_from_mapping
from watcher.config.secrets import ca_bundle_problems as ca_bundle_problems
from watcher.config.secrets import resolve_api_key as resolve_api_key
from watcher.config.sections import LogFormat as LogFormat
from watcher.config.sections import LogLevel as LogLevel
from watcher.config.sections import NucleusSettings as NucleusSettings
from watcher.config.settings import Settings as Settings
from watcher.config.units import parse_bandwidth_limit as parse_bandwidth_limit
from watcher.config.units import parse_endpoint as parse_endpoint
from watcher.config.units import parse_listen_address as parse_listen_address
from watcher.config.watch import WatchSettings as WatchSettings
