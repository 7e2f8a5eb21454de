"""A backlog over a thin uplink: the real `scan` command against a devserver that reads request
bodies at a set rate (one link shared by every connection), with the default upload settings and
a short idle timeout. Run with -s to see the measured rates."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.configfactory import run_watcher, write_config
from tests.imagefactory import write_large_jpeg
from watcher.devserver import DevServer, RequestRecord

DATASET = "ds_uplink"
# Short, so a stall costs little; the link makes every upload take many times longer.
TIMEOUT_SECONDS = 3


class LinkServer:
    """A devserver behind a thin link, and the append requests it has answered."""

    def __init__(self, data_dir: Path, rate_bytes_per_second: int) -> None:
        self.appends: list[RequestRecord] = []
        self.server = DevServer(
            data_dir=data_dir,
            link_rate_bytes_per_second=rate_bytes_per_second,
            on_request=self._seen,
        )

    def _seen(self, record: RequestRecord) -> None:
        if record.path.endswith("/append"):
            self.appends.append(record)


@pytest.fixture
def link_servers() -> Iterator[list[LinkServer]]:
    servers: list[LinkServer] = []
    yield servers
    for link in servers:
        link.server.stop()


def start_link(servers: list[LinkServer], data_dir: Path, rate: int) -> LinkServer:
    link = LinkServer(data_dir, rate)
    servers.append(link)
    link.server.start()
    return link


def write_backlog(root: Path, count: int, size_bytes: int) -> dict[str, str]:
    """`count` settled JPEGs of about `size_bytes`; reference_id -> sha256."""
    digests = {}
    old = time.time() - 60
    for index in range(count):
        path = root / f"frame_{index:03}.jpg"
        digests[path.name] = write_large_jpeg(path, size_bytes, seed=index)
        os.utime(path, (old, old))
    return digests


def scan_backlog(tmp_path: Path, link: LinkServer, root: Path) -> tuple[float, str]:
    """Run `scan` with default upload settings; the bytes/s of files it moved and its output.

    Its own clock (from opening the store to the last answer) and the files' sizes: the
    multipart framing is left out, so the rate is, if anything, understated."""
    config = write_config(
        tmp_path,
        endpoint=link.server.base_url,
        watches=[{"path": str(root), "dataset_id": DATASET}],
        nucleus={"timeout_seconds": TIMEOUT_SECONDS},
    )
    result = run_watcher("scan", "-c", str(config), timeout_seconds=120)
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"still pending in ([0-9.]+) s", result.stdout)
    assert found is not None, result.stdout
    file_bytes = sum(path.stat().st_size for path in root.iterdir())
    return file_bytes / float(found.group(1)), result.stdout


def assert_stored(link: LinkServer, digests: dict[str, str]) -> None:
    items = link.server.items(DATASET)
    assert {ref: item.image_sha256 for ref, item in items.items()} == digests


@pytest.mark.parametrize(
    ("rate", "count", "size_bytes"),
    [
        (1024 * 1024, 10, 2_200_000),  # camera JPEGs over a 1 MiB/s link
        (96 * 1024, 6, 330_000),  # a thin link: every file takes several timeouts
    ],
    ids=["1MiB/s", "96KiB/s"],
)
def test_a_backlog_drains_at_the_links_rate(
    tmp_path: Path, link_servers: list[LinkServer], rate: int, count: int, size_bytes: int
) -> None:
    root = tmp_path / "cam"
    digests = write_backlog(root, count, size_bytes)
    link = start_link(link_servers, tmp_path / "srv", rate)

    measured, output = scan_backlog(tmp_path, link, root)

    assert_stored(link, digests)
    share = measured / rate
    print(f"[thin link {rate} B/s] measured {measured:.0f} B/s = {share:.0%}: {output.strip()}")
    assert share >= 0.8, output
    # Requests were sized to the link: none carried a whole batch of ten several-MB files.
    sizes = [record.item_count for record in link.appends if record.status == 200]
    assert sum(sizes) == count and max(sizes) < count, sizes


def test_a_file_bigger_than_a_requests_budget_still_goes_whole(
    tmp_path: Path, link_servers: list[LinkServer]
) -> None:
    # 3 MB at 256 KiB/s is ~12 s in one request: four times the idle timeout, and far more
    # than the few seconds a request is sized for. It goes anyway, in one piece.
    root = tmp_path / "cam"
    digests = write_backlog(root, 1, 3_000_000)
    link = start_link(link_servers, tmp_path / "srv", 256 * 1024)

    scan_backlog(tmp_path, link, root)

    assert_stored(link, digests)
    assert [(r.status, r.item_count) for r in link.appends] == [(200, 1)]
