"""Values written as text in the config: bandwidth rates, the metrics listen address, and the
Nucleus endpoint URL (the client applies the same endpoint rule)."""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

# 1 TB/s: no link is faster, so a larger limit is a typo (and 1e400 would overflow the bucket).
MAX_BANDWIDTH_BYTES_PER_SECOND = 10**12


_BANDWIDTH = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*(?:/\s*s)?\s*")


# Case matters: "MB" is bytes and "Mbit" bits. Ambiguous spellings like "Mb" are refused.
_BANDWIDTH_UNIT_BYTES: dict[str, float] = {
    "": 1,
    "B": 1,
    "kB": 1e3,
    "KB": 1e3,
    "MB": 1e6,
    "GB": 1e9,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "bit": 1 / 8,
    "kbit": 1e3 / 8,
    "Kbit": 1e3 / 8,
    "Mbit": 1e6 / 8,
    "Gbit": 1e9 / 8,
    "Kibit": 1024 / 8,
    "Mibit": 1024**2 / 8,
    "Gibit": 1024**3 / 8,
}


def parse_bandwidth_limit(text: str) -> int | None:
    """ "2MiB/s" -> 2097152 bytes per second; "" -> None (unlimited). Raises ValueError."""
    if not text.strip():
        return None
    found = _BANDWIDTH.fullmatch(text)
    if found is None or found.group(2) not in _BANDWIDTH_UNIT_BYTES:
        raise ValueError(
            f'cannot read {text!r} as a rate; write e.g. "2MiB/s", "500KB/s", "800kbit/s", '
            f"or leave it empty for no limit"
        )
    rate = float(found.group(1)) * _BANDWIDTH_UNIT_BYTES[found.group(2)]
    if not rate <= MAX_BANDWIDTH_BYTES_PER_SECOND:
        raise ValueError(f"{text!r} is more than 1 TB/s; leave it empty for no limit")
    bytes_per_second = round(rate)
    if bytes_per_second < 1:
        raise ValueError(f"{text!r} is less than 1 byte per second; leave it empty for no limit")
    return bytes_per_second


_LISTEN = re.compile(r"(?:\[(?P<ipv6>[^\]]*)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})")


def parse_listen_address(text: str) -> tuple[str, int] | None:
    """ "127.0.0.1:9464" -> ("127.0.0.1", 9464); "[::1]:9464" -> ("::1", 9464); "" -> None.

    The host must be an IP address or localhost: what the metrics server can bind without
    asking DNS, so an address that passed here does not fail later for its spelling.
    """
    if not text:
        return None
    found = _LISTEN.fullmatch(text)
    if found is None or int(found["port"]) > 65535:
        hint = ' (write an IPv6 address in brackets: "[::1]:9464")' if text.count(":") > 1 else ""
        raise ValueError(
            f'must be host:port like "127.0.0.1:9464" (use 0.0.0.0 for every interface), '
            f"or empty to turn metrics off (got {text!r}){hint}"
        )
    if found["ipv6"] is not None:
        host, usable = found["ipv6"], _is_ip_address(found["ipv6"], version=6)
    else:
        host = found["host"]
        usable = host == "localhost" or _is_ip_address(host, version=4)
    if not usable:
        raise ValueError(
            f"{host!r} is not an IP address; use 127.0.0.1 (this machine), 0.0.0.0 (every "
            f"interface), [::1], [::] or localhost (got {text!r})"
        )
    return host, int(found["port"])


def _is_ip_address(text: str, *, version: int) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return address.version == version


class Endpoint(NamedTuple):
    url: str  # the base URL routes are appended to, without a trailing slash
    host: str  # host[:port], for messages


def parse_endpoint(text: str) -> Endpoint:
    """The one rule for nucleus.endpoint, which the client applies too. Raises ValueError.

    A message never repeats a URL that holds credentials.
    """
    url = text.strip()
    shown = "" if "@" in url else f" (got {url!r})"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (reading the port is what checks it)
    except ValueError as exc:
        raise ValueError(f"is not a valid URL: {exc}{shown}") from None
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain credentials (user:password@); the API key is sent apart")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL{shown}")
    if any(char.isspace() or not char.isprintable() for char in url):
        raise ValueError(f"must not contain spaces or control characters{shown}")
    if parts.query or parts.fragment:
        raise ValueError(f"must not have a query (?...) or a fragment (#...){shown}")
    # Routes are joined as f"{endpoint}/dataset/..."; a trailing slash would double it.
    return Endpoint(urlunsplit(parts).rstrip("/"), parts.netloc)
