"""The certificates a client trusts: the default bundle, widened by the user's `ca_bundle`.

requests verifies against exactly one file, so an extra CA file would replace the defaults
rather than add to them. `CombinedCaBundle` writes both into one temp file for `verify=` and
removes it when the client closes.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import suppress
from pathlib import Path

import certifi

from watcher.config import ca_bundle_problems
from watcher.errors import ConfigError


class CombinedCaBundle:
    """A temp file holding the default CAs and then the user's; `path` is what to verify with."""

    def __init__(self, extra_ca_path: str) -> None:
        extra = Path(extra_ca_path)
        # The tests `check` makes, so the client refuses exactly what `check` reports.
        problems = ca_bundle_problems(extra)
        if problems:
            raise ConfigError([f"{key}: {message}" for key, message in problems])
        combined = Path(_default_ca_file()).read_bytes() + b"\n" + extra.read_bytes() + b"\n"
        with tempfile.NamedTemporaryFile(
            prefix="nucleus-watcher-ca-", suffix=".pem", delete=False
        ) as out:
            out.write(combined)
        self.path = out.name

    def remove(self) -> None:
        # If it cannot go, no harm: the file holds only public certificates.
        with suppress(OSError):
            os.unlink(self.path)


def _default_ca_file() -> str:
    """The bundle requests would verify with: its environment override, else certifi's."""
    for variable in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        candidate = os.environ.get(variable)
        if candidate and os.path.isfile(candidate):
            return candidate
    return certifi.where()
