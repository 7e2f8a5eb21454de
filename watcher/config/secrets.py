"""The API key (file, environment, systemd credential) and the checks of the key file and the CA
bundle, which `check` makes and the client repeats. A message never shows the key."""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Mapping
from pathlib import Path

from watcher.config.sections import NucleusSettings
from watcher.errors import ConfigError
from watcher.rules import Problem

ENV_API_KEY = "NUCLEUS_API_KEY"
CREDENTIAL_NAME = "nucleus_api_key"


def key_file_problems(key_file: Path) -> list[Problem]:
    key = "nucleus.api_key_file"
    try:
        mode = key_file.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return [(key, f"{key_file}: no such file")]
    except OSError:
        return []  # e.g. a folder this user may not enter; the service user may
    if not stat.S_ISREG(mode):
        return [(key, f"{key_file} is not a regular file")]
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return [(key, _open_key_file_message(key_file, mode))]
    return []


def ca_bundle_problems(ca_file: Path) -> list[Problem]:
    """The tests the client makes when it is built, so `check` refuses what `run` would."""
    key = "nucleus.ca_bundle"
    try:
        content = ca_file.read_bytes()
    except OSError as exc:
        return [(key, f"cannot read {ca_file}: {exc.strerror or exc}")]
    if b"-----BEGIN CERTIFICATE-----" not in content:
        return [(key, f"{ca_file} holds no PEM certificate")]
    try:
        ssl.create_default_context(cafile=str(ca_file))
    except ssl.SSLError as exc:
        return [(key, f"{ca_file} is not usable: {exc}")]
    return []


def resolve_api_key(nucleus: NucleusSettings, environ: Mapping[str, str] | None = None) -> str:
    """api_key_file, else NUCLEUS_API_KEY, else the systemd credential. Never echoes the key."""
    environ = os.environ if environ is None else environ
    if nucleus.api_key_file:
        return _read_key_file(Path(nucleus.api_key_file), check_mode=True)
    from_environment = environ.get(ENV_API_KEY, "").strip()
    if from_environment:
        _check_key_text(from_environment, ENV_API_KEY)
        return from_environment
    credentials_directory = environ.get("CREDENTIALS_DIRECTORY", "")
    if credentials_directory:
        credential = Path(credentials_directory) / CREDENTIAL_NAME
        if credential.exists():
            # systemd owns the mode of its credential files; it makes them private itself.
            return _read_key_file(credential, check_mode=False)
    raise ConfigError(
        "no Nucleus API key: set nucleus.api_key_file or NUCLEUS_API_KEY, or give the systemd "
        f"credential {CREDENTIAL_NAME!r} (LoadCredential=)"
    )


def _read_key_file(key_file: Path, *, check_mode: bool) -> str:
    try:
        with key_file.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if check_mode and mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"API key file {_open_key_file_message(key_file, mode)}")
            content = handle.read()
    except OSError as exc:
        raise ConfigError(f"API key file {key_file}: cannot read: {exc.strerror or exc}") from None
    try:
        key = content.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"API key file {key_file} is not UTF-8 text") from None
    if not key:
        raise ConfigError(f"API key file {key_file} is empty")
    _check_key_text(key, f"API key file {key_file}")
    return key


def _open_key_file_message(key_file: Path, mode: int) -> str:
    return (
        f"{key_file} is open to other users (mode {stat.S_IMODE(mode):04o}); "
        f"run: chmod 600 {key_file}"
    )


def _check_key_text(key: str, source: str) -> None:
    # The key goes into an Authorization header: a stray newline or space would corrupt it.
    if any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in key):
        raise ConfigError(f"{source}: the key contains spaces or control characters")
