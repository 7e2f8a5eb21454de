"""PathFilter: name globs (include on the file name, exclude on every segment) and path globs."""

from __future__ import annotations

import pytest

from watcher.files import PathFilter

DEFAULT_EXCLUDE = [".*", "*.tmp", "*.part", "*~"]


@pytest.fixture
def camera_filter() -> PathFilter:
    return PathFilter(["*.jpg", "*.jpeg", "*.png"], DEFAULT_EXCLUDE)


@pytest.mark.parametrize(
    "relpath",
    ["a.jpg", "A.JPG", "deep/er/frame_001.Jpeg", "2024-05-01/x.png", "./a.jpg", "a//b.jpg"],
)
def test_accepts_images_at_any_depth_in_any_case(camera_filter: PathFilter, relpath: str) -> None:
    assert camera_filter.accepts(relpath)


@pytest.mark.parametrize(
    ("relpath", "why"),
    [
        ("notes.txt", "not an included name"),
        ("jpg", "no extension"),
        ("x.jpg.tmp", "temp suffix"),
        ("x.jpg.part", "partial download"),
        ("x.jpg~", "editor backup"),
        (".x.jpg", "dot file"),
        (".frame_001.jpg.Xy12Ab", "rsync temp name"),
        (".cache/x.jpg", "inside a dot folder"),
        ("a/.hidden/b/x.jpg", "below a dot folder, deep"),
        ("upload.tmp/x.jpg", "inside a folder named like a temp file"),
        ("X.JPG.TMP", "temp suffix, upper case"),
        ("", "empty path"),
        ("a/b/", "a folder, no file name"),
    ],
)
def test_refuses(camera_filter: PathFilter, relpath: str, why: str) -> None:
    assert not camera_filter.accepts(relpath), why


def test_include_matches_the_name_only() -> None:
    path_filter = PathFilter(["frame_*.jpg"], [])
    assert path_filter.accepts("cam1/frame_001.jpg")
    # "cam1/frame_..." as a whole would match "*" across the slash; the name alone does not.
    assert not path_filter.accepts("frame_dir/other.jpg")


def test_empty_include_accepts_everything_not_excluded() -> None:
    path_filter = PathFilter([], [".*"])
    assert path_filter.accepts("any/thing.bin")
    assert not path_filter.accepts("any/.thing.bin")


def test_accepts_dir_prunes_excluded_folders(camera_filter: PathFilter) -> None:
    assert camera_filter.accepts_dir("")
    assert camera_filter.accepts_dir(".")
    assert camera_filter.accepts_dir("2024/05")
    assert not camera_filter.accepts_dir(".git")
    assert not camera_filter.accepts_dir("a/.Trash-1000/files")
    assert not camera_filter.accepts_dir("staging.part")


@pytest.mark.parametrize(
    ("include", "exclude"),
    [
        ([""], []),
        ([], [""]),
        (["raw/"], []),
        ([], ["cache/"]),
        (["/"], []),
        (["raw//*.jpg"], []),
        (["../*.jpg"], []),
        ([], ["a/./b"]),
    ],
)
def test_refuses_globs_that_can_never_match(include: list[str], exclude: list[str]) -> None:
    with pytest.raises(ValueError):
        PathFilter(include, exclude)


@pytest.mark.parametrize(
    ("include", "accepted", "refused"),
    [
        (["raw/*.jpg"], ["raw/a.jpg", "RAW/B.JPG"], ["a.jpg", "raw/deep/a.jpg", "x/raw/a.jpg"]),
        (["/raw/*.jpg"], ["raw/a.jpg"], ["x/raw/a.jpg"]),
        (["raw/**"], ["raw/a.jpg", "raw/d/e/f.png"], ["a.jpg", "x/raw/a.jpg"]),
        (["**/raw/*.jpg"], ["raw/a.jpg", "x/y/raw/a.jpg"], ["raw/d/a.jpg"]),
        (["cam?/**/*.png", "*.jpg"], ["cam1/a.png", "cam2/x/y/b.png", "z/c.jpg"], ["cam1/a.gif"]),
        (["[ab]/*.jpg"], ["a/1.jpg", "B/2.jpg"], ["c/3.jpg"]),
    ],
)
def test_include_globs_with_a_slash_match_the_path_below_the_root(
    include: list[str], accepted: list[str], refused: list[str]
) -> None:
    path_filter = PathFilter(include, [".*"])
    for relpath in accepted:
        assert path_filter.accepts(relpath), relpath
    for relpath in refused:
        assert not path_filter.accepts(relpath), relpath
    assert not path_filter.accepts("raw/.hidden.jpg")  # name excludes still apply


def test_exclude_globs_with_a_slash_drop_a_path_and_everything_below_it() -> None:
    path_filter = PathFilter(["*.jpg"], ["raw/tmp", "**/drafts/*.jpg"])

    assert path_filter.accepts("raw/a.jpg")
    assert path_filter.accepts("tmp/a.jpg")
    assert path_filter.accepts("x/raw/tmp/a.jpg")
    assert not path_filter.accepts("raw/tmp/a.jpg")
    assert not path_filter.accepts("raw/TMP/deep/a.jpg")
    assert not path_filter.accepts("drafts/a.jpg")
    assert not path_filter.accepts("x/drafts/a.jpg")
    assert path_filter.accepts("x/drafts/deeper/a.jpg")
    assert not path_filter.accepts_dir("raw/tmp")
    assert not path_filter.accepts_dir("raw/tmp/deep")
    assert path_filter.accepts_dir("raw")
    assert path_filter.accepts_dir("x/drafts")


def test_many_double_stars_stay_fast() -> None:
    path_filter = PathFilter(["/".join(["**"] * 30 + ["*.jpg"])], [])
    deep = "/".join(["d"] * 200) + "/x.jpg"
    assert path_filter.accepts(deep)
    assert not path_filter.accepts(deep + ".txt")


def test_refuses_a_bare_string() -> None:
    with pytest.raises(TypeError):
        PathFilter("*.jpg", [])


def test_equality_follows_the_globs() -> None:
    assert PathFilter(["*.jpg"], [".*"]) == PathFilter(["*.jpg"], [".*"])
    assert PathFilter(["*.jpg"], [".*"]) != PathFilter(["*.png"], [".*"])
    assert len({PathFilter(["*.jpg"], []), PathFilter(["*.jpg"], [])}) == 1
