"""Settings: the TOML file and the environment, validated into typed models, with one line per
problem; units (sizes, rates, addresses) and secrets (the API key, file checks).

May import: `watcher.rules`, `watcher.files`, `watcher.errors`.
"""

from watcher.config.models import LogFormat as LogFormat
from watcher.config.models import LogLevel as LogLevel
from watcher.config.models import NucleusSettings as NucleusSettings
from watcher.config.models import Settings as Settings
from watcher.config.models import WatchSettings as WatchSettings
from watcher.config.models import ca_bundle_problems as ca_bundle_problems
from watcher.config.models import check_files as check_files
from watcher.config.models import load_settings as load_settings
from watcher.config.models import parse_bandwidth_limit as parse_bandwidth_limit
from watcher.config.models import parse_endpoint as parse_endpoint
from watcher.config.models import parse_listen_address as parse_listen_address
from watcher.config.models import resolve_api_key as resolve_api_key
from watcher.config.models import settings_from_mapping as settings_from_mapping
