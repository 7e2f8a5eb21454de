"""Which paths under a watch root are candidates: include globs on the name, exclude on any part.

Include globs look at the file name only (`*.jpg`), so a rule does not have to know how deep a
camera nests its folders. Exclude globs look at every segment of the relative path, so `.*`
hides dot files *and* everything below a dot folder, and temp names (`*.part`, rsync's
`.name.XXXXXX`) are never picked up however deep they are. Both compare case-insensitively:
cameras write `IMG_0001.JPG` as often as `img_0001.jpg`.

The defaults live in the configuration; this class applies what it is given.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence


class PathFilter:
    """Decides from a relative path ("a/b/c.jpg", "/" separators) whether a file is wanted.

    An empty `include` accepts every name that no exclude glob rejects.
    """

    def __init__(self, include: Sequence[str], exclude: Sequence[str]) -> None:
        # A bare string is a Sequence[str] too; iterating it would make one glob per character.
        if isinstance(include, str) or isinstance(exclude, str):
            raise TypeError("include and exclude must be lists of globs, not a single string")
        self.include: tuple[str, ...] = tuple(include)
        self.exclude: tuple[str, ...] = tuple(exclude)
        for kind, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns:
                _refuse_bad_glob(kind, pattern)
        self._include_re = _compile_any(self.include)
        self._exclude_re = _compile_any(self.exclude)

    def accepts(self, relpath: str) -> bool:
        """True when the file at `relpath` (relative to the watch root) should be watched."""
        segments = _segments(relpath)
        if not segments:
            return False
        if any(self._is_excluded(segment) for segment in segments):
            return False
        if self._include_re is None:
            return True
        return self._include_re.match(segments[-1]) is not None

    def accepts_dir(self, rel_dir: str) -> bool:
        """True when a walk should descend into `rel_dir` ("" or "." is the root itself)."""
        return not any(self._is_excluded(segment) for segment in _segments(rel_dir))

    def _is_excluded(self, segment: str) -> bool:
        return self._exclude_re is not None and self._exclude_re.match(segment) is not None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PathFilter):
            return NotImplemented
        return (self.include, self.exclude) == (other.include, other.exclude)

    def __hash__(self) -> int:
        return hash((self.include, self.exclude))

    def __repr__(self) -> str:
        return f"PathFilter(include={list(self.include)!r}, exclude={list(self.exclude)!r})"


def _refuse_bad_glob(kind: str, pattern: str) -> None:
    # Refused when the filter is built, so a typo in the config fails at start, not silently.
    if not pattern:
        raise ValueError(f"{kind} glob is empty")
    if "/" in pattern:
        where = "the file name" if kind == "include" else "each path segment"
        raise ValueError(f"{kind} glob {pattern!r} contains '/' but is matched against {where}")


def _compile_any(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    alternatives = "|".join(f"(?:{fnmatch.translate(pattern)})" for pattern in patterns)
    return re.compile(alternatives, re.IGNORECASE)


def _segments(relpath: str) -> list[str]:
    # "./a//b/" and "a/b" are the same place; "." and empty segments carry no name to match.
    return [segment for segment in relpath.split("/") if segment not in ("", ".")]
