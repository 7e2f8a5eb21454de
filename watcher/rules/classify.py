"""Classifying a path: rendering one watch's compiled templates and rules for one file."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from watcher.errors import PathRuleError
from watcher.rules.compile import MAX_REFERENCE_ID_CHARS, CompiledWatch, MetadataEntry
from watcher.rules.template import Template
from watcher.rules.text import first_control_character, has_control_character, join_key, shorten


@dataclass(frozen=True)
class Classification:
    reference_id: str
    metadata: dict[str, Any]  # JSON-ready; numbers are int/float, bools are bool
    remote_url: str | None
    # sha256 of canonical JSON of what we would send besides the bytes: a change here (new rules,
    # a renamed folder feeding a capture) means the item must be re-sent with update=true.
    metadata_sha256: str


def _canonical_sha256(reference_id: str, metadata: dict[str, Any], remote_url: str | None) -> str:
    document = {"metadata": metadata, "reference_id": reference_id, "remote_url": remote_url}
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


def _mtime_iso(mtime_ns: int) -> str:
    seconds, nanoseconds = divmod(mtime_ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, tz=UTC).replace(microsecond=nanoseconds // 1000)
    return moment.isoformat().replace("+00:00", "Z")


class _PathVariables:
    """Built-in variables of one path; `sha256` and `mtime` are computed only when asked for."""

    def __init__(
        self, relpath: str, device: str, mtime_ns: int, sha256: Callable[[], str] | None
    ) -> None:
        # Plain string work, not PurePosixPath: this runs once per file of every walk. The
        # results match PurePosixPath's name, stem, suffix and parent ("" at the root).
        parent, _, name = relpath.rpartition("/")
        dot = name.rfind(".")
        has_suffix = 0 < dot < len(name) - 1
        self._values: dict[str, str] = {
            "relpath": relpath,
            "name": name,
            "stem": name[:dot] if has_suffix else name,
            "ext": name[dot + 1 :].lower() if has_suffix else "",
            "parent": parent,
            "device": device,
        }
        self._mtime_ns = mtime_ns
        self._sha256 = sha256

    def get(self, name: str) -> str:
        value = self._values.get(name)
        if value is not None:
            return value
        if name == "mtime":
            value = _mtime_iso(self._mtime_ns)
        elif name == "sha256":
            if self._sha256 is None:
                raise ValueError("classify() needs sha256= because a template uses {sha256}")
            value = self._sha256()
        else:  # unreachable: templates were checked against the known names at load
            raise KeyError(name)
        self._values[name] = value
        return value


class RuleSet:
    """One watch's compiled rules with the device they render `{device}` as.

    Everything was checked by `compile_watch`; `classify` only renders. `where` ("watch[0]")
    names the watch in a PathRuleError.
    """

    def __init__(self, compiled: CompiledWatch, device: str, where: str) -> None:
        self.compiled = compiled
        self._device = device
        self.where = where
        self.needs_sha256: bool = compiled.needs_sha256
        self.metadata_types: dict[str, type] = dict(compiled.metadata_types)

    def classify(
        self, relpath: str, *, mtime_ns: int, sha256: Callable[[], str] | None = None
    ) -> Classification:
        variables = _PathVariables(relpath, self._device, mtime_ns, sha256)
        metadata: dict[str, Any] = {}
        self._merge(metadata, self.compiled.metadata, variables.get, self.where)
        for rule in self.compiled.rules:
            captures = rule.captures(relpath)
            if captures is None:
                continue

            def lookup(name: str, captures: dict[str, str | None] = captures) -> str | None:
                return captures[name] if name in captures else variables.get(name)

            self._merge(metadata, rule.metadata, lookup, join_key(self.where, rule.key))
        reference_id = self._reference_id(variables)
        remote_url = self._remote_url(variables)
        return Classification(
            reference_id=reference_id,
            metadata=metadata,
            remote_url=remote_url,
            metadata_sha256=_canonical_sha256(reference_id, metadata, remote_url),
        )

    @staticmethod
    def _merge(
        metadata: dict[str, Any],
        entries: Sequence[MetadataEntry],
        lookup: Callable[[str], str | None],
        where: str,
    ) -> None:
        for name, entry in entries:
            if not isinstance(entry, Template):
                metadata[name] = entry
                continue
            value = entry.render(lookup, f"metadata {name!r} ({where})")
            if value is None:
                metadata.pop(name, None)
            else:
                metadata[name] = value

    def _reference_id(self, variables: _PathVariables) -> str:
        rendered = self.compiled.reference_id.render(variables.get, "reference_id")
        text = rendered if isinstance(rendered, str) else ""
        if not text:
            raise PathRuleError("reference_id renders empty for this path")
        if has_control_character(text):
            raise PathRuleError(
                f"reference_id {shorten(text)} contains a control character "
                f"({first_control_character(text)})"
            )
        if len(text) > MAX_REFERENCE_ID_CHARS:
            raise PathRuleError(
                f"reference_id is {len(text)} characters long; the limit is "
                f"{MAX_REFERENCE_ID_CHARS}"
            )
        return text

    def _remote_url(self, variables: _PathVariables) -> str | None:
        template = self.compiled.remote_url
        if template is None:
            return None
        # An http(s) URL needs its path percent-encoded (spaces, '#', '%'); bucket URLs name
        # object keys, which are used as they are.
        escape = (
            (lambda text: quote(text, safe="/"))
            if template.literal_prefix.startswith(("http://", "https://"))
            else None
        )
        rendered = template.render(variables.get, "remote_url", escape)
        url = rendered if isinstance(rendered, str) else ""
        if has_control_character(url):
            raise PathRuleError(
                f"remote_url {shorten(url)} contains a control character "
                f"({first_control_character(url)})"
            )
        return url
