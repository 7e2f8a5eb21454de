"""`nucleus-watcher status` on a real store with rows in every state, directly and as a command."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from watcher.commands import print_status
from watcher.config import Settings, load_settings
from watcher.errors import StoreError
from watcher.store import Candidate, StateStore


@dataclass(frozen=True)
class Layout:
    config: Path
    db: Path
    cam: Path  # watch[0]
    yard: Path  # watch[1]
    old: Path  # only in the database: a watch removed from the config


def write_config(tmp_path: Path) -> Layout:
    layout = Layout(
        config=tmp_path / "config.toml",
        db=tmp_path / "state" / "state.db",
        cam=tmp_path / "cam",
        yard=tmp_path / "yard",
        old=tmp_path / "old",
    )
    layout.config.write_text(
        f"""
[state]
path = "{layout.db}"

[metrics]
listen = ""

[[watch]]
path = "{layout.cam}"
dataset_id = "ds_cam"

[[watch]]
path = "{layout.yard}"
dataset_id = "ds_yard"
"""
    )
    return layout


def candidate(root: Path, relpath: str, size_bytes: int) -> Candidate:
    return Candidate(
        watch=str(root),
        relpath=relpath,
        dataset_id=f"ds_{root.name}",
        reference_id=relpath,
        size_bytes=size_bytes,
        mtime_ns=1,
        content_sha256=hashlib.sha256(relpath.encode()).hexdigest(),
        metadata={},
        metadata_sha256="m",
        remote_url=None,
    )


def fill_store(store: StateStore, layout: Layout, now: float) -> None:
    """Rows in every state. Times are relative to `now`; pending rows go in last because a
    claim takes every due pending row."""
    cam, yard = layout.cam, layout.yard

    def confirmed(root: Path, relpath: str, size_bytes: int, at: float) -> list[int]:
        store.record_candidate(candidate(root, relpath, size_bytes), now=at - 5)
        ids = [r.id for r in store.claim_batch(10, now=at)]
        store.mark_confirmed(ids, now=at)
        return ids

    confirmed(cam, "a1.jpg", 1_500_000, now - 30)
    confirmed(cam, "a2.jpg", 2_000_000, now - 200)
    confirmed(yard, "b1.jpg", 3_000_000, now - 600)
    confirmed(cam, "a7.jpg", 700_000, now - 3600)
    store.mark_gone(str(cam), "a7.jpg", now=now - 3000)
    confirmed(layout.old, "x.jpg", 10_000, now - 7200)

    store.record_candidate(candidate(cam, "a3.jpg", 100), now=now - 400)
    ids = [r.id for r in store.claim_batch(10, now=now - 21)]
    store.mark_failed(ids, "HTTP 413:\nfile too large", now=now - 20)

    store.record_problem(
        watch=str(cam),
        relpath="a6.jpg",
        dataset_id="ds_cam",
        size_bytes=50,
        mtime_ns=1,
        state="incomplete",
        reason="still changing after 600 s",
        now=now - 10,
    )

    store.record_candidate(candidate(yard, "b2.jpg", 100), now=now - 50)
    ids = [r.id for r in store.claim_batch(10, now=now - 49)]
    store.mark_retry(ids, "HTTP 503: Service Unavailable", next_attempt_at=now + 3600)

    store.record_candidate(candidate(cam, "a4.jpg", 100), now=now - 100)
    store.claim_batch(10, now=now - 99)  # stays in flight
    store.record_candidate(candidate(cam, "a5.jpg", 100), now=now - 192)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return write_config(tmp_path)


@pytest.fixture
def daemon_store(layout: Layout) -> Iterator[StateStore]:
    """The writer, open the whole time as the daemon's would be while `status` reads."""
    store = StateStore.open(layout.db)
    yield store
    store.close()


def expected_report(layout: Layout, backlog_age: str) -> list[str]:
    cam, yard, old = str(layout.cam), str(layout.yard), f"{layout.old} (not in config)"
    w = len(old)
    return [
        f"state database: {layout.db}",
        "",
        f"{'watch':<{w}}  pending  in_flight  uploaded  failed  incomplete  gone  total",
        f"{cam:<{w}}        1          1         2       1           1     1      7",
        f"{yard:<{w}}        1          0         1       0           0     0      2",
        f"{old:<{w}}        0          0         1       0           0     0      1",
        f"{'total':<{w}}        2          1         4       1           1     1     10",
        "",
        f"backlog: 3 files, oldest waiting {backlog_age}",
        "",
        "throughput  files    MB",
        "last 1m         1  1.50",
        "last 5m         2  3.50",
        "last 15m        3  6.50",
        "",
        "last errors (newest first):",
        f"  incomplete  {cam}/a6.jpg: still changing after 600 s",
        f"  failed      {cam}/a3.jpg: HTTP 413: file too large",
        f"  pending     {yard}/b2.jpg: HTTP 503: Service Unavailable",
    ]


def test_table_counts_backlog_throughput_and_errors(
    layout: Layout, daemon_store: StateStore
) -> None:
    now = 1_750_000_000.0
    fill_store(daemon_store, layout, now)
    out = io.StringIO()

    code = print_status(load_settings(layout.config, environ={}), as_json=False, out=out, now=now)

    assert code == 0
    assert out.getvalue().splitlines() == expected_report(layout, "3m12s")


def test_json_has_the_same_data_under_stable_keys(layout: Layout, daemon_store: StateStore) -> None:
    now = 1_750_000_000.0
    fill_store(daemon_store, layout, now)
    out = io.StringIO()

    assert (
        print_status(load_settings(layout.config, environ={}), as_json=True, out=out, now=now) == 0
    )

    data = json.loads(out.getvalue())
    assert sorted(data) == [
        "backlog",
        "generated_at",
        "recent_errors",
        "state_path",
        "states",
        "throughput",
        "total",
        "totals",
        "watches",
    ]
    assert data["state_path"] == str(layout.db)
    assert data["generated_at"] == now
    assert data["states"] == ["pending", "in_flight", "uploaded", "failed", "incomplete", "gone"]
    assert data["watches"][0] == {
        "watch": str(layout.cam),
        "configured": True,
        "counts": {
            "pending": 1,
            "in_flight": 1,
            "uploaded": 2,
            "failed": 1,
            "incomplete": 1,
            "gone": 1,
        },
        "total": 7,
    }
    assert [(w["watch"], w["configured"], w["total"]) for w in data["watches"]] == [
        (str(layout.cam), True, 7),
        (str(layout.yard), True, 2),
        (str(layout.old), False, 1),
    ]
    assert data["totals"] == {
        "pending": 2,
        "in_flight": 1,
        "uploaded": 4,
        "failed": 1,
        "incomplete": 1,
        "gone": 1,
    }
    assert data["total"] == 10
    assert data["backlog"] == {
        "files": 3,
        "oldest_first_seen_at": now - 192,
        "age_seconds": 192.0,
    }
    assert data["throughput"] == [
        {"window_seconds": 60, "files": 1, "bytes": 1_500_000},
        {"window_seconds": 300, "files": 2, "bytes": 3_500_000},
        {"window_seconds": 900, "files": 3, "bytes": 6_500_000},
    ]
    assert data["recent_errors"][0] == {
        "path": str(layout.cam / "a6.jpg"),
        "watch": str(layout.cam),
        "relpath": "a6.jpg",
        "dataset_id": "ds_cam",
        "reference_id": "",
        "state": "incomplete",
        "reason": "still changing after 600 s",
        "attempts": 0,
    }
    assert [(e["relpath"], e["state"], e["reason"]) for e in data["recent_errors"]] == [
        ("a6.jpg", "incomplete", "still changing after 600 s"),
        ("a3.jpg", "failed", "HTTP 413:\nfile too large"),
        ("b2.jpg", "pending", "HTTP 503: Service Unavailable"),
    ]


def test_an_empty_database_says_none(layout: Layout, daemon_store: StateStore) -> None:
    out = io.StringIO()

    print_status(load_settings(layout.config, environ={}), as_json=False, out=out, now=1e9)

    lines = out.getvalue().splitlines()
    # Both configured watches are listed even before they have a file.
    assert [line.split() for line in lines[2:6]] == [
        ["watch", "pending", "in_flight", "uploaded", "failed", "incomplete", "gone", "total"],
        [str(layout.cam), "0", "0", "0", "0", "0", "0", "0"],
        [str(layout.yard), "0", "0", "0", "0", "0", "0", "0"],
        ["total", "0", "0", "0", "0", "0", "0", "0"],
    ]
    assert lines[6:] == [
        "",
        "backlog: none",
        "",
        "throughput  files    MB",
        "last 1m         0  0.00",
        "last 5m         0  0.00",
        "last 15m        0  0.00",
        "",
        "last errors: none",
    ]


def test_no_database_raises_the_line_cli_prints(layout: Layout) -> None:
    settings: Settings = load_settings(layout.config, environ={})
    with pytest.raises(StoreError) as caught:
        print_status(settings, as_json=False, out=io.StringIO())
    assert str(caught.value) == (
        f"{layout.db}: no state database yet (has the daemon or scan run?)"
    )
    assert not layout.db.exists()  # status never creates one


def test_a_state_this_version_does_not_know_is_neither_backlog_nor_a_problem(
    layout: Layout,
) -> None:
    store = StateStore.open(layout.db)
    try:
        store.record_candidate(candidate(layout.cam, "known.jpg", 100), now=1e9 - 60)
        store.record_candidate(candidate(layout.cam, "newer.jpg", 100), now=1e9 - 120)
    finally:
        store.close()
    # As a newer version might leave it: a state name this one has never heard of.
    with sqlite3.connect(layout.db) as db:
        db.execute("UPDATE files SET state = 'archived' WHERE relpath = 'newer.jpg'")
    db.close()
    out = io.StringIO()

    code = print_status(load_settings(layout.config, environ={}), as_json=True, out=out, now=1e9)

    assert code == 0
    data = json.loads(out.getvalue())
    assert "archived" not in data["states"]
    assert data["watches"][0]["counts"] == {
        "pending": 1,
        "in_flight": 0,
        "uploaded": 0,
        "failed": 0,
        "incomplete": 0,
        "gone": 0,
    }
    assert data["backlog"]["files"] == 1
    assert data["backlog"]["age_seconds"] == 60.0
    assert data["recent_errors"] == []


# -- the command -------------------------------------------------------------------------------


def run_status(layout: Layout, *extra: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NUCLEUS")}
    environ["NUCLEUS_API_KEY"] = "sk-status-must-never-show-this"
    return subprocess.run(
        [sys.executable, "-m", "watcher", "status", "-c", str(layout.config), *extra],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )


def test_status_command_reads_while_the_writer_is_open(
    layout: Layout, daemon_store: StateStore
) -> None:
    now = time.time()
    fill_store(daemon_store, layout, now)
    before = layout.db.read_bytes()

    result = run_status(layout)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    # The command measures its own "now" a moment later: the age may have grown a second or two.
    assert re.fullmatch(r"backlog: 3 files, oldest waiting 3m1[2-9]s", lines[8])
    assert lines[:8] + lines[9:] == [
        line for i, line in enumerate(expected_report(layout, "")) if i != 8
    ]
    assert "sk-status-must-never-show-this" not in result.stdout
    assert layout.db.read_bytes() == before  # read-only: not a byte of the database changed


def test_status_command_json(layout: Layout, daemon_store: StateStore) -> None:
    now = time.time()
    fill_store(daemon_store, layout, now)

    result = run_status(layout, "--json")

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["total"] == 10
    assert data["backlog"]["files"] == 3
    assert 192 <= data["backlog"]["age_seconds"] < 200
    assert [t["files"] for t in data["throughput"]] == [1, 2, 3]
    assert "sk-status-must-never-show-this" not in result.stdout


def test_status_command_without_a_database(layout: Layout) -> None:
    result = run_status(layout)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"nucleus-watcher: {layout.db}: no state database yet (has the daemon or scan run?)\n"
    )
    assert not layout.db.exists()
