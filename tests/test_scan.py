"""`nucleus-watcher scan` end to end: real files, the real command, a real devserver."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.configfactory import API_KEY, run_watcher, watcher_env, write_config
from tests.imagefactory import jpeg_bytes, sha256_of, write_jpeg, write_large_jpeg, write_png
from watcher.devserver import DevServer

DATASET = "ds_weather"
WEATHER_RULE = {"match": "{weather}/**", "metadata": {"weather": "{weather}"}}


def make_tree(root: Path) -> dict[str, Path]:
    """Sunny/Foggy/Rainy folders holding real JPEGs and PNGs (one nested a level deeper)."""
    files: dict[str, Path] = {}
    seed = 0
    for weather in ("Sunny", "Foggy", "Rainy"):
        for index in range(3):
            seed += 1
            path = root / weather / f"frame_{index}.jpg"
            write_jpeg(path, seed=seed)
            files[f"{weather}/frame_{index}.jpg"] = path
        seed += 1
        png = root / weather / "deeper" / "still.png"
        write_png(png, seed=seed)
        files[f"{weather}/deeper/still.png"] = png
    old = time.time() - 60  # written a minute ago: settled
    for path in files.values():
        os.utime(path, (old, old))
    return files


def config_for(
    tmp_path: Path,
    devserver: DevServer,
    root: Path,
    *,
    rules: list[dict[str, Any]] | None = None,
    **sections: dict[str, Any],
) -> Path:
    watch = {
        "path": str(root),
        "dataset_id": DATASET,
        "include": ["*.jpg", "*.png"],
        "rules": [WEATHER_RULE] if rules is None else rules,
    }
    return write_config(tmp_path, endpoint=devserver.base_url, watches=[watch], **sections)


def assert_all_stored(devserver: DevServer, files: dict[str, Path]) -> None:
    items = devserver.items(DATASET)
    assert set(items) == set(files)
    for relpath, path in files.items():
        item = items[relpath]
        assert item.image_sha256 == sha256_of(path), relpath
        assert item.metadata == {"weather": relpath.split("/")[0]}


def scan(config: Path) -> subprocess.CompletedProcess[str]:
    result = run_watcher("scan", "-c", str(config))
    assert API_KEY not in result.stdout + result.stderr
    return result


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_scan_uploads_tree_then_only_changes(
    tmp_path: Path, devserver: DevServer, asynchronous: bool
) -> None:
    root = tmp_path / "camera"
    files = make_tree(root)
    config = config_for(tmp_path, devserver, root, nucleus={"asynchronous": asynchronous})

    first = scan(config)
    assert first.returncode == 0, first.stderr
    assert "12 uploaded (12 new, 0 updated)" in first.stdout
    assert_all_stored(devserver, files)
    if asynchronous:
        assert all(r.query == "async=1" for r in devserver.requests() if "append" in r.path)

    # Nothing changed: not one request.
    requests_before = devserver.append_request_count()
    second = scan(config)
    assert second.returncode == 0, second.stderr
    assert devserver.append_request_count() == requests_before
    assert "0 uploaded" in second.stdout

    # One file's content changed: exactly one re-send, as an update.
    edited = files["Foggy/frame_1.jpg"]
    write_jpeg(edited, seed=999)
    third = scan(config)
    assert third.returncode == 0, third.stderr
    assert devserver.append_request_count() == requests_before + 1
    assert "1 uploaded (0 new, 1 updated)" in third.stdout
    item = devserver.items(DATASET)["Foggy/frame_1.jpg"]
    assert item.image_sha256 == sha256_of(edited) and item.times_written == 2


def test_changed_rules_resend_every_file_as_update(tmp_path: Path, devserver: DevServer) -> None:
    root = tmp_path / "camera"
    files = make_tree(root)
    assert scan(config_for(tmp_path, devserver, root)).returncode == 0

    rules = [
        WEATHER_RULE,
        {"regex": r"frame_(?P<frame>\d+)", "metadata": {"frame": "{frame:int}"}},
    ]
    result = scan(config_for(tmp_path, devserver, root, rules=rules))
    assert result.returncode == 0, result.stderr
    # The nine frames get a new key; the three stills' metadata is the same, so they stay put.
    assert "9 uploaded (0 new, 9 updated), 3 unchanged" in result.stdout
    items = devserver.items(DATASET)
    assert items["Rainy/frame_2.jpg"].metadata == {"weather": "Rainy", "frame": 2}
    assert items["Rainy/deeper/still.png"].metadata == {"weather": "Rainy"}
    for relpath in files:
        assert items[relpath].times_written == (1 if relpath.endswith(".png") else 2), relpath


@pytest.mark.parametrize("max_files", [1, 10])
def test_batching_on_and_off(tmp_path: Path, devserver: DevServer, max_files: int) -> None:
    root = tmp_path / "camera"
    files = make_tree(root)
    config = config_for(
        tmp_path, devserver, root, upload={"concurrency": 1, "max_files_per_request": max_files}
    )
    result = scan(config)
    assert result.returncode == 0, result.stderr
    assert_all_stored(devserver, files)
    assert devserver.append_request_count() == (12 if max_files == 1 else 2)


def test_on_conflict_skip_and_update(tmp_path: Path, devserver: DevServer) -> None:
    """The server has a reference_id we never recorded (say the state db was lost)."""
    root = tmp_path / "camera"
    files = make_tree(root)
    assert scan(config_for(tmp_path, devserver, root)).returncode == 0
    (tmp_path / "state" / "state.db").unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{tmp_path / 'state' / 'state.db'}{suffix}").unlink(missing_ok=True)
    rules = [{"match": "{weather}/**", "metadata": {"weather": "{weather}", "v": "2"}}]

    skipped = scan(config_for(tmp_path, devserver, root, rules=rules))
    assert skipped.returncode == 0, skipped.stderr
    assert all(item.metadata.get("v") is None for item in devserver.items(DATASET).values())

    (tmp_path / "state" / "state.db").unlink()
    updated = scan(
        config_for(tmp_path, devserver, root, rules=rules, upload={"on_conflict": "update"})
    )
    assert updated.returncode == 0, updated.stderr
    items = devserver.items(DATASET)
    assert all(items[relpath].metadata.get("v") == "2" for relpath in files)


def test_remote_url_watch_sends_json_items(tmp_path: Path, devserver: DevServer) -> None:
    root = tmp_path / "camera"
    make_tree(root)
    config = write_config(
        tmp_path,
        endpoint=devserver.base_url,
        watches=[
            {
                "path": str(root),
                "dataset_id": DATASET,
                "include": ["*.jpg"],
                "remote_url": "s3://fleet-bucket/cam7/{relpath}",
            }
        ],
    )
    result = scan(config)
    assert result.returncode == 0, result.stderr
    items = devserver.items(DATASET)
    assert len(items) == 9
    assert items["Sunny/frame_0.jpg"].image_url == "s3://fleet-bucket/cam7/Sunny/frame_0.jpg"
    assert items["Sunny/frame_0.jpg"].image_sha256 is None


def test_bad_files_are_listed_and_exit_1(tmp_path: Path, devserver: DevServer) -> None:
    root = tmp_path / "camera"
    files = make_tree(root)
    (root / "Sunny" / "notes.jpg").write_text("not an image at all")
    truncated = root / "Sunny" / "cut.jpg"
    write_jpeg(truncated, seed=77)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    old = time.time() - 60
    for path in (root / "Sunny" / "notes.jpg", truncated):
        os.utime(path, (old, old))
    result = scan(config_for(tmp_path, devserver, root))
    assert result.returncode == 1
    assert f"failed: {root / 'Sunny' / 'notes.jpg'}: not an image" in result.stdout
    assert f"incomplete: {truncated}: JPEG" in result.stdout
    assert_all_stored(devserver, files)


def test_two_hundred_megabyte_file_streams_in_bounded_memory(
    tmp_path: Path, devserver: DevServer
) -> None:
    """Peak RSS of the scan process grows by less than 32 MB between a tiny and a 200 MB file."""

    def peak_rss_kib(config: Path) -> int:
        process = subprocess.Popen(
            [sys.executable, "-m", "watcher", "scan", "-c", str(config)],
            env=watcher_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        assert process.returncode == 0
        return int(usage.ru_maxrss)

    small_root, big_root = tmp_path / "small", tmp_path / "big"
    write_jpeg(small_root / "a.jpg", seed=1)
    big_sha = write_large_jpeg(big_root / "big.jpg", 200 * 1024 * 1024, seed=2)
    old = time.time() - 60
    for path in (small_root / "a.jpg", big_root / "big.jpg"):
        os.utime(path, (old, old))
    upload = {"max_file_bytes": 300 * 1024 * 1024}
    (tmp_path / "s").mkdir()
    (tmp_path / "b").mkdir()
    small = write_config(
        tmp_path / "s",
        endpoint=devserver.base_url,
        watches=[{"path": str(small_root), "dataset_id": "ds_small"}],
        upload=upload,
    )
    big = write_config(
        tmp_path / "b",
        endpoint=devserver.base_url,
        watches=[{"path": str(big_root), "dataset_id": "ds_big"}],
        upload=upload,
    )
    baseline_kib = peak_rss_kib(small)
    big_kib = peak_rss_kib(big)
    assert devserver.items("ds_big")["big.jpg"].image_sha256 == big_sha
    assert big_kib - baseline_kib < 32 * 1024, (baseline_kib, big_kib)


def test_config_errors_are_one_line_each_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        "[upload]\nconcurrency = 0\nmax_files_per_request = 11\n"
        '[[watch]]\npath = "relative/dir"\ndataset_id = "ds_x"\n'
    )
    result = run_watcher("scan", "-c", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "config.toml: at 'upload.concurrency': must be at least 1 (got 0)" in lines
    assert any(line.startswith("config.toml: at 'upload.max_files_per_request':") for line in lines)
    assert any(line.startswith("config.toml: at 'watch[0].path':") for line in lines)
    assert "Traceback" not in result.stderr

    missing = run_watcher("scan", "-c", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == "nope.toml: cannot read: No such file or directory"


def test_a_file_from_the_future_is_uploaded_and_an_unfinished_one_is_listed(
    tmp_path: Path, devserver: DevServer
) -> None:
    # A camera whose clock runs an hour ahead; and a JPEG that never gets its end marker.
    root = tmp_path / "camera"
    future = root / "Sunny" / "ahead.jpg"
    write_jpeg(future, seed=1)
    ahead = time.time() + 3600
    os.utime(future, (ahead, ahead))
    cut = root / "Sunny" / "cut.jpg"
    cut.write_bytes(jpeg_bytes(seed=2)[:-200])
    config = config_for(tmp_path, devserver, root, settle={"seconds": 0.3, "max_wait_seconds": 2.0})
    started = time.monotonic()
    result = scan(config)
    assert time.monotonic() - started < 30  # not settle.max_wait_seconds per round
    assert result.returncode == 1, result.stdout + result.stderr
    assert devserver.items(DATASET)["Sunny/ahead.jpg"].image_sha256 == sha256_of(future)
    assert f"  incomplete: {cut}: " in result.stdout
    assert "1 incomplete" in result.stdout
