"""Which paths under a watch root are candidates: include and exclude globs.

A glob without '/' looks at names. An include glob looks at the file name (`*.jpg`), so a rule
does not have to know how deep a camera nests its folders. An exclude glob looks at every segment
of the relative path, so `.*` hides dot files *and* everything below a dot folder, and temp names
(`*.part`, rsync's `.name.XXXXXX`) are never picked up however deep they are.

A glob with '/' looks at the path relative to the watch root (a leading '/' changes nothing):
`*`, `?` and `[abc]` stay within one folder name, and a `**` segment spans any number of folders.
An include path glob must match the whole relative path (`raw/*.jpg`: the files directly in
raw/). An exclude path glob drops a file when it matches the file's path or any folder above it
(`raw/tmp` drops everything below raw/tmp, and a walk does not descend into it).

Everything compares case-insensitively: cameras write `IMG_0001.JPG` as often as `img_0001.jpg`.
The defaults live in the configuration, which refuses a glob this module cannot use
(`glob_problem`) with the same words the constructor would raise.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

_ANY_FOLDERS = "**"


def glob_problem(pattern: str) -> str | None:
    """Why `pattern` cannot be used as an include or exclude glob, or None when it can."""
    if not pattern:
        return "is empty"
    if "/" not in pattern:
        return None
    if pattern.endswith("/"):
        return (
            f"{pattern!r} ends with '/'; globs match files: write 'raw/**' for everything below "
            f"raw/, or a name like 'raw' for any folder so named"
        )
    segments = pattern.removeprefix("/").split("/")
    if "" in segments:
        return f"{pattern!r} has an empty folder name ('//')"
    if "." in segments or ".." in segments:
        return f"{pattern!r} uses '.' or '..'; paths are matched below the watch folder as they are"
    return None


def min_depth(pattern: str) -> int:
    """The fewest path segments a relative path matched by `pattern` has (name globs: 1)."""
    if "/" not in pattern:
        return 1
    return sum(1 for segment in pattern.removeprefix("/").split("/") if segment != _ANY_FOLDERS)


class _PathGlob:
    """A glob with '/': one case-insensitive regex per segment; None stands for `**`."""

    def __init__(self, pattern: str) -> None:
        self._parts = tuple(
            None
            if segment == _ANY_FOLDERS
            else re.compile(fnmatch.translate(segment), re.IGNORECASE)
            for segment in pattern.removeprefix("/").split("/")
        )

    def matched_prefixes(self, segments: Sequence[str]) -> set[int]:
        """Every n for which the glob matches segments[:n] as a whole."""
        # One pass over the glob's parts, keeping the set of reachable positions in the path:
        # linear in both, however many `**` the glob has.
        positions = {0}
        for part in self._parts:
            if part is None:
                positions = set(range(min(positions), len(segments) + 1))
            else:
                positions = {
                    at + 1
                    for at in positions
                    if at < len(segments) and part.match(segments[at]) is not None
                }
            if not positions:
                break
        return positions


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
                problem = glob_problem(pattern)
                if problem is not None:
                    # Refused when the filter is built, so a typo fails at start, not silently.
                    raise ValueError(f"{kind} glob {problem}")
        self._include_names = _compile_any(_name_globs(self.include))
        self._exclude_names = _compile_any(_name_globs(self.exclude))
        self._include_paths = _path_globs(self.include)
        self._exclude_paths = _path_globs(self.exclude)

    def accepts(self, relpath: str) -> bool:
        """True when the file at `relpath` (relative to the watch root) should be watched."""
        segments = _segments(relpath)
        if not segments or self._is_excluded(segments):
            return False
        if not self.include:
            return True
        if self._include_names is not None and self._include_names.match(segments[-1]):
            return True
        return any(len(segments) in glob.matched_prefixes(segments) for glob in self._include_paths)

    def accepts_dir(self, rel_dir: str) -> bool:
        """True when a walk should descend into `rel_dir` ("" or "." is the root itself)."""
        return not self._is_excluded(_segments(rel_dir))

    def _is_excluded(self, segments: list[str]) -> bool:
        names = self._exclude_names
        if names is not None and any(names.match(segment) for segment in segments):
            return True
        # The path itself or any folder above it (a prefix of at least one segment).
        return any(
            max(glob.matched_prefixes(segments), default=0) > 0 for glob in self._exclude_paths
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PathFilter):
            return NotImplemented
        return (self.include, self.exclude) == (other.include, other.exclude)

    def __hash__(self) -> int:
        return hash((self.include, self.exclude))

    def __repr__(self) -> str:
        return f"PathFilter(include={list(self.include)!r}, exclude={list(self.exclude)!r})"


def _name_globs(patterns: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(pattern for pattern in patterns if "/" not in pattern)


def _path_globs(patterns: tuple[str, ...]) -> tuple[_PathGlob, ...]:
    return tuple(_PathGlob(pattern) for pattern in patterns if "/" in pattern)


def _compile_any(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    alternatives = "|".join(f"(?:{fnmatch.translate(pattern)})" for pattern in patterns)
    return re.compile(alternatives, re.IGNORECASE)


def _segments(relpath: str) -> list[str]:
    # "./a//b/" and "a/b" are the same place; "." and empty segments carry no name to match.
    return [segment for segment in relpath.split("/") if segment not in ("", ".")]
