"""The state store on a real SQLite file: the queue's transitions and what counts as confirmed."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from watcher.errors import StoreError
from watcher.store import (
    Candidate,
    FileState,
    StateStore,
    UnknownState,
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore.open(tmp_path / "state.db")
    yield s
    s.close()


def candidate(
    relpath: str = "Sunny/a.jpg", *, sha: str = "c1", meta: str = "m1", **kw: object
) -> Candidate:
    fields: dict[str, object] = {
        "watch": "/srv/cam",
        "relpath": relpath,
        "dataset_id": "ds_1",
        "reference_id": relpath,
        "size_bytes": 10,
        "mtime_ns": 1,
        "content_sha256": sha,
        "metadata": {"weather": "Sunny"},
        "metadata_sha256": meta,
        "remote_url": None,
    }
    fields.update(kw)
    return Candidate(**fields)  # type: ignore[arg-type]


def send_and_confirm(store: StateStore) -> list[int]:
    batch = store.claim_batch(10)
    ids = [r.id for r in batch]
    store.mark_confirmed(ids)
    return ids


def test_database_settings_and_schema_version(store: StateStore, tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "state.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == 4
    db.close()


def test_new_file_is_queued_claimed_and_confirmed(store: StateStore) -> None:
    assert store.record_candidate(candidate()) == "new"
    [claimed] = store.claim_batch(10)
    assert claimed.state == FileState.PENDING  # the row as it was read; it is now in flight
    assert store.get("/srv/cam", "Sunny/a.jpg").state == FileState.IN_FLIGHT  # type: ignore[union-attr]
    assert store.claim_batch(10) == []
    store.mark_confirmed([claimed.id])
    record = store.get("/srv/cam", "Sunny/a.jpg")
    assert (
        record is not None
        and record.state == FileState.UPLOADED
        and record.confirmed_at is not None
    )
    assert record.metadata == {"weather": "Sunny"}


def test_unchanged_file_is_not_sent_again(store: StateStore) -> None:
    store.record_candidate(candidate())
    send_and_confirm(store)
    assert store.record_candidate(candidate(mtime_ns=99)) == "unchanged"  # touched only
    assert store.claim_batch(10) == []


def test_changed_content_is_resent_once_as_update(store: StateStore) -> None:
    store.record_candidate(candidate())
    send_and_confirm(store)
    assert store.record_candidate(candidate(sha="c2")) == "changed"
    assert store.record_candidate(candidate(sha="c2")) == "unchanged"
    [again] = store.claim_batch(10)
    assert again.update_flag is True
    store.mark_confirmed([again.id])
    assert store.claim_batch(10) == []


def test_changed_metadata_is_resent_as_update(store: StateStore) -> None:
    store.record_candidate(candidate())
    send_and_confirm(store)
    assert store.record_candidate(candidate(meta="m2", metadata={"weather": "Foggy"})) == "changed"
    [again] = store.claim_batch(10)
    assert again.update_flag and again.metadata == {"weather": "Foggy"}


def test_new_reference_id_is_not_an_update(store: StateStore) -> None:
    store.record_candidate(candidate())
    send_and_confirm(store)
    store.record_candidate(candidate(reference_id="other", meta="m2"))
    [again] = store.claim_batch(10)
    assert again.update_flag is False


def test_change_while_in_flight_goes_out_after_the_send(store: StateStore) -> None:
    store.record_candidate(candidate())
    [first] = store.claim_batch(10)
    assert store.record_candidate(candidate(sha="c2")) == "deferred"
    assert store.claim_batch(10) == []  # never two sends of one file at once
    store.mark_confirmed([first.id])
    [second] = store.claim_batch(10)
    assert second.content_sha256 == "c2" and second.update_flag


def test_retry_backs_off_and_failed_is_parked(store: StateStore) -> None:
    store.record_candidate(candidate())
    [item] = store.claim_batch(10, now=100.0)
    store.mark_retry([item.id], "HTTP 503", next_attempt_at=200.0)
    assert store.claim_batch(10, now=150.0) == []
    [item] = store.claim_batch(10, now=200.0)
    assert item.attempts == 1 and item.last_error == "HTTP 503"
    store.mark_failed([item.id], "HTTP 400: bad image")
    record = store.get("/srv/cam", "Sunny/a.jpg")
    assert (
        record is not None
        and record.state == FileState.FAILED
        and record.last_error == "HTTP 400: bad image"
    )
    assert store.record_candidate(candidate()) == "unchanged"  # parked until it changes
    assert store.requeue_failed([Path("/srv/cam/Sunny/a.jpg")]) == 1
    assert len(store.claim_batch(10, now=1e12)) == 1


def test_batches_share_dataset_and_kind(store: StateStore) -> None:
    for i in range(3):
        store.record_candidate(candidate(f"a{i}.jpg", mtime_ns=i))
    store.record_candidate(candidate("b.jpg", dataset_id="ds_2", mtime_ns=10))
    store.record_candidate(candidate("r.jpg", remote_url="s3://b/r.jpg", mtime_ns=11))
    first = store.claim_batch(10)
    assert [r.relpath for r in first] == ["a0.jpg", "a1.jpg", "a2.jpg"]
    assert [r.relpath for r in store.claim_batch(10)] == ["b.jpg"]
    assert [r.relpath for r in store.claim_batch(10)] == ["r.jpg"]


def test_newest_first_order(store: StateStore) -> None:
    for i in range(3):
        store.record_candidate(candidate(f"a{i}.jpg", mtime_ns=i))
    assert [r.relpath for r in store.claim_batch(2, newest_first=True)] == ["a2.jpg", "a1.jpg"]


def test_interrupted_send_is_released_but_a_submitted_job_is_followed(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "state.db")
    store.record_candidate(candidate("a.jpg"))
    store.record_candidate(candidate("b.jpg"))
    [a] = store.claim_batch(1)
    [b] = store.claim_batch(1)
    store.mark_job_submitted([b.id], "job_7")
    store.close()
    reopened = StateStore.open(tmp_path / "state.db")
    assert reopened.release_in_flight() == 1
    assert reopened.jobs_in_flight() == {"job_7": [b.id]}
    assert [r.id for r in reopened.claim_batch(10)] == [a.id]
    reopened.close()


def test_gone_file_keeps_record_and_reappearing_file_is_not_resent(store: StateStore) -> None:
    store.record_candidate(candidate())
    send_and_confirm(store)
    assert store.mark_gone_many("/srv/cam", ["Sunny/a.jpg"]) == 1
    assert store.get("/srv/cam", "Sunny/a.jpg").state == FileState.GONE  # type: ignore[union-attr]
    assert store.record_candidate(candidate()) == "unchanged"
    assert store.get("/srv/cam", "Sunny/a.jpg").state == FileState.UPLOADED  # type: ignore[union-attr]


def test_corrupt_database_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database" * 100)
    store = StateStore.open(path)
    store.record_candidate(candidate())
    store.close()
    aside = [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].startswith("state.db.corrupt-")


def test_read_only_open_sees_rows_and_refuses_writes(store: StateStore, tmp_path: Path) -> None:
    store.record_candidate(candidate())
    reader = StateStore.open_read_only(tmp_path / "state.db")
    assert reader.state_counts()[FileState.PENDING] == 1
    with pytest.raises(sqlite3.OperationalError):
        reader.record_candidate(candidate("b.jpg"))
    reader.close()
    with pytest.raises(StoreError, match="no state database yet"):
        StateStore.open_read_only(tmp_path / "missing.db")


def test_a_second_writer_process_is_refused_with_the_owner_pid(tmp_path: Path) -> None:
    first = StateStore.open(tmp_path / "state.db")
    probe = (
        "import sys; from pathlib import Path; from watcher.store.state_store import StateStore;"
        "from watcher.errors import StoreBusyError\n"
        "try:\n StateStore.open(Path(sys.argv[1]))\n"
        "except StoreBusyError as exc:\n print(exc); sys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "state.db")], capture_output=True, text=True
    )
    assert result.returncode == 3, result.stderr
    assert result.stdout.strip() == (
        f"{tmp_path / 'state.db'}: in use by another nucleus-watcher process (pid {os.getpid()})"
    )
    first.close()
    StateStore.open(tmp_path / "state.db").close()  # released on close


# -- after an unknown outcome the server may hold what we sent: the next send is an update ------


def test_change_after_an_unanswered_send_goes_as_update(store: StateStore) -> None:
    store.record_candidate(candidate())
    [first] = store.claim_batch(10)
    assert first.update_flag is False  # never sent before: a plain create
    store.mark_retry([first.id], "timed out", next_attempt_at=0)  # the answer never came
    assert store.record_candidate(candidate(sha="c2")) == "changed"
    [second] = store.claim_batch(10)
    assert second.content_sha256 == "c2" and second.update_flag is True


def test_change_after_a_send_cut_off_by_a_restart_goes_as_update(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "state.db")
    store.record_candidate(candidate())
    store.claim_batch(10)
    store.close()  # kill -9 mid-request: the row is still in flight
    reopened = StateStore.open(tmp_path / "state.db")
    assert reopened.release_in_flight() == 1
    assert reopened.record_candidate(candidate(sha="c2")) == "changed"
    [again] = reopened.claim_batch(10)
    assert again.content_sha256 == "c2" and again.update_flag is True
    reopened.close()


def test_revert_after_an_unanswered_update_is_sent_again(store: StateStore) -> None:
    store.record_candidate(candidate())
    send_and_confirm(store)
    store.record_candidate(candidate(sha="c2"))
    [update] = store.claim_batch(10)
    store.mark_retry([update.id], "connection reset", next_attempt_at=0)  # server may hold c2
    # Back to the bytes the server confirmed before: it may now hold c2, so c1 must go again.
    assert store.record_candidate(candidate(sha="c1")) == "changed"
    [again] = store.claim_batch(10)
    assert again.content_sha256 == "c1" and again.update_flag is True


def test_reference_id_of_a_gone_file_passes_to_the_next_file_as_update(store: StateStore) -> None:
    # A camera counter restarting at IMG_0001 with reference_id = "{name}".
    store.record_candidate(candidate("day1/IMG_0001.jpg", reference_id="IMG_0001.jpg"))
    send_and_confirm(store)
    store.mark_gone("/srv/cam", "day1/IMG_0001.jpg")
    outcome = store.record_candidate(
        candidate("day2/IMG_0001.jpg", reference_id="IMG_0001.jpg", sha="c2")
    )
    assert outcome == "new"
    [reused] = store.claim_batch(10)
    assert reused.relpath == "day2/IMG_0001.jpg" and reused.update_flag is True


def test_resend_of_the_same_version_after_a_lost_answer_is_not_an_update(
    store: StateStore,
) -> None:
    store.record_candidate(candidate())
    [first] = store.claim_batch(10)
    store.mark_retry([first.id], "answer lost", next_attempt_at=0)
    [again] = store.claim_batch(10)  # the server holds exactly this or nothing: `ignored` is fine
    assert again.update_flag is False


# -- a delete while the request is out --------------------------------------------------------


def test_file_deleted_while_in_flight_ends_gone_after_the_answer(store: StateStore) -> None:
    store.record_candidate(candidate())
    [item] = store.claim_batch(10)
    assert store.mark_gone("/srv/cam", "Sunny/a.jpg") is True
    store.mark_confirmed([item.id])
    record = store.get("/srv/cam", "Sunny/a.jpg")
    assert record is not None and record.state == FileState.GONE
    # What the server confirmed is still known: the same file coming back is not re-sent.
    assert store.record_candidate(candidate()) == "unchanged"


def test_file_deleted_while_in_flight_and_the_send_failed_is_gone(store: StateStore) -> None:
    store.record_candidate(candidate("a.jpg"))
    store.record_candidate(candidate("b.jpg"))
    batch = store.claim_batch(10)
    assert store.mark_gone_many("/srv/cam", ["a.jpg"]) == 1
    store.mark_retry([r.id for r in batch], "HTTP 503", next_attempt_at=0)
    states = {r.relpath: r.state for r in store.get_many([r.id for r in batch])}
    assert states == {"a.jpg": FileState.GONE, "b.jpg": FileState.PENDING}
    assert [r.relpath for r in store.claim_batch(10)] == ["b.jpg"]


def test_file_deleted_while_in_flight_before_a_restart_is_gone(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "state.db")
    store.record_candidate(candidate())
    store.claim_batch(10)
    store.mark_gone("/srv/cam", "Sunny/a.jpg")
    store.close()
    reopened = StateStore.open(tmp_path / "state.db")
    reopened.release_in_flight()
    assert reopened.claim_batch(10) == []
    assert reopened.get("/srv/cam", "Sunny/a.jpg").state == FileState.GONE  # type: ignore[union-attr]
    reopened.close()


def test_file_back_while_in_flight_is_not_gone(store: StateStore) -> None:
    store.record_candidate(candidate())
    [item] = store.claim_batch(10)
    store.mark_gone("/srv/cam", "Sunny/a.jpg")
    store.record_candidate(candidate())  # deleted and written again while the request was out
    store.mark_confirmed([item.id])
    assert store.get("/srv/cam", "Sunny/a.jpg").state == FileState.UPLOADED  # type: ignore[union-attr]


def test_upgrade_from_schema_2_knows_what_was_sent(tmp_path: Path) -> None:
    from watcher.store.schema import _MIGRATIONS

    path = tmp_path / "state.db"
    db = sqlite3.connect(path, isolation_level=None)
    for step in _MIGRATIONS[:2]:
        db.executescript(step)
    db.execute("PRAGMA user_version = 2")
    row = (
        "INSERT INTO files (watch, relpath, dataset_id, reference_id, size_bytes, mtime_ns,"
        " content_sha256, metadata_json, metadata_sha256, state, attempts, confirmed_dataset_id,"
        " confirmed_reference_id, confirmed_content_sha256, confirmed_metadata_sha256,"
        " sent_content_sha256, sent_metadata_sha256, first_seen_at, changed_at)"
        " VALUES ('/srv/cam', ?, 'ds_1', ?, 1, 1, ?, '{}', 'm1', ?, ?, ?, ?, ?, ?, ?, ?, 0, 0)"
    )
    confirmed = ("ds_1", "a.jpg", "c0", "m1")
    db.execute(row, ("a.jpg", "a.jpg", "c1", FileState.PENDING, 0, *confirmed, "c0", "m1"))
    db.execute(
        row, ("b.jpg", "b.jpg", "c1", FileState.IN_FLIGHT, 0, None, None, None, None, "c1", "m1")
    )
    db.execute(
        row, ("c.jpg", "c.jpg", "c1", FileState.PENDING, 2, None, None, None, None, "c0", "m1")
    )
    db.execute(
        row, ("d.jpg", "d.jpg", "c1", FileState.PENDING, 2, None, None, None, None, "c1", "m1")
    )
    db.execute(
        row, ("e.jpg", "e.jpg", "c1", FileState.PENDING, 0, None, None, None, None, None, None)
    )
    db.close()
    store = StateStore.open(path)
    store.release_in_flight()
    updates = {r.relpath: r.update_flag for r in store.claim_batch(10)}
    # a: changed since confirmed; b: cut off, same version again; c: an unanswered send of
    # other bytes; d: unanswered sends of these bytes; e: never sent.
    assert updates == {"a.jpg": True, "b.jpg": False, "c.jpg": True, "d.jpg": False, "e.jpg": False}
    store.close()


def test_bytes_rewritten_while_streaming_count_as_sent_and_the_file_goes_again(
    store: StateStore,
) -> None:
    # Claimed as c1; the file was rewritten (and back) while it streamed: cX went out.
    store.record_candidate(candidate())
    [item] = store.claim_batch(10)
    store.note_streamed_bytes(item.id, "cX")
    assert store.mark_confirmed([item.id]) == 1  # back to the queue, not uploaded
    [again] = store.claim_batch(10)
    assert again.content_sha256 == "c1" and again.update_flag is True
    store.mark_confirmed([again.id])
    record = store.get("/srv/cam", "Sunny/a.jpg")
    assert record is not None and record.state == FileState.UPLOADED
    assert record.confirmed_content_sha256 == "c1"


# -- files refused before classification, and files to look at again -------------------------


def problem(store: StateStore, relpath: str = "Sunny/a.jpg", **kw: object) -> None:
    fields: dict[str, object] = {
        "watch": "/srv/cam",
        "relpath": relpath,
        "dataset_id": "ds_1",
        "size_bytes": 10,
        "mtime_ns": 1,
        "state": FileState.FAILED,
        "reason": "not an image (unknown file signature)",
    }
    fields.update(kw)
    store.record_problem(**fields)  # type: ignore[arg-type]


def test_a_file_refused_before_classification_is_recorded_unclassified(
    store: StateStore,
) -> None:
    store.record_candidate(candidate())
    problem(store)
    known = store.known_file("/srv/cam", "Sunny/a.jpg")
    assert known is not None and not known.classified and not known.reexamine
    assert (known.size_bytes, known.mtime_ns) == (10, 1)
    record = store.get("/srv/cam", "Sunny/a.jpg")
    assert record is not None and not record.classified and record.reference_id == ""
    # It holds no reference_id: another file may take the name over.
    assert store.record_candidate(candidate("b.jpg", reference_id="Sunny/a.jpg")) == "new"


def test_retry_of_an_unclassified_file_asks_the_next_walk_to_look_again(
    store: StateStore,
) -> None:
    problem(store)
    assert store.requeue_failed() == 1
    known = store.known_file("/srv/cam", "Sunny/a.jpg")
    assert known is not None and known.reexamine and known.state == FileState.FAILED
    assert (known.size_bytes, known.mtime_ns) == (10, 1)  # what was seen stays on record
    assert store.record_candidate(candidate()) == "changed"
    known = store.known_file("/srv/cam", "Sunny/a.jpg")
    assert known is not None and known.classified and not known.reexamine


def test_a_file_that_could_not_be_stated_is_looked_at_again(store: StateStore) -> None:
    problem(store, "new.jpg", size_bytes=None, mtime_ns=None, reason="cannot stat")
    problem(store, size_bytes=10, mtime_ns=1)
    problem(store, size_bytes=None, mtime_ns=None, reason="cannot stat")
    new = store.known_file("/srv/cam", "new.jpg")
    assert new is not None and new.reexamine and not new.classified
    known = store.known_file("/srv/cam", "Sunny/a.jpg")
    assert known is not None and known.reexamine and (known.size_bytes, known.mtime_ns) == (10, 1)
    problem(store, size_bytes=12, mtime_ns=2)  # seen again: the walk knows it as it is now
    known = store.known_file("/srv/cam", "Sunny/a.jpg")
    assert known is not None and not known.reexamine and known.size_bytes == 12


def test_upgrade_from_schema_3_turns_sentinel_values_into_columns(tmp_path: Path) -> None:
    from watcher.store.schema import _MIGRATIONS

    path = tmp_path / "state.db"
    db = sqlite3.connect(path, isolation_level=None)
    for step in _MIGRATIONS[:3]:
        db.executescript(step)
    db.execute("PRAGMA user_version = 3")
    # The rows as schema 3's code wrote them: a sent file, a file refused before
    # classification, and one `retry` marked for the next walk (size and mtime -1).
    db.execute(
        "INSERT INTO files (watch, relpath, dataset_id, reference_id, size_bytes, mtime_ns,"
        " content_sha256, metadata_json, metadata_sha256, state, first_seen_at, changed_at)"
        " VALUES ('/srv/cam', 'sent.jpg', 'ds_1', 'sent.jpg', 10, 1, 'c1', '{}', 'm1', ?, 0, 0)",
        (FileState.UPLOADED,),
    )
    for relpath, size_bytes, mtime_ns in (("parked.jpg", 20, 2), ("retried.jpg", -1, -1)):
        db.execute(
            "INSERT INTO files (watch, relpath, dataset_id, reference_id, size_bytes,"
            " mtime_ns, metadata_json, metadata_sha256, state, last_error, first_seen_at,"
            " changed_at) VALUES ('/srv/cam', ?, 'ds_1', '', ?, ?, '{}', '', ?, 'bad', 0, 0)",
            (relpath, size_bytes, mtime_ns, FileState.FAILED),
        )
    db.close()
    store = StateStore.open(path)
    known = store.known_files("/srv/cam")
    migrated = {
        relpath: (k.classified, k.reexamine, k.size_bytes, k.mtime_ns)
        for relpath, k in known.items()
    }
    assert migrated == {
        "sent.jpg": (True, False, 10, 1),
        "parked.jpg": (False, False, 20, 2),
        "retried.jpg": (False, True, 0, 0),
    }
    records = {r.relpath: r.classified for r in store.records_in_state(FileState.FAILED)}
    assert records == {"parked.jpg": False, "retried.jpg": False}
    store.close()
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == 4


def test_a_state_this_version_does_not_know_is_kept_as_read_and_counted_nowhere(
    store: StateStore, tmp_path: Path
) -> None:
    store.record_candidate(candidate("a.jpg"))
    store.record_candidate(candidate("b.jpg"))
    with sqlite3.connect(tmp_path / "state.db") as db:  # as a newer version might leave it
        db.execute("UPDATE files SET state = 'archived', last_error = 'x' WHERE relpath = 'b.jpg'")
    db.close()
    record = store.get("/srv/cam", "b.jpg")
    assert record is not None and isinstance(record.state, UnknownState)
    assert record.state == "archived"
    assert store.state_counts() == {state: int(state == FileState.PENDING) for state in FileState}
    assert store.counts() == {"/srv/cam": {FileState.PENDING: 1}}
    assert [r.relpath for r in store.recent_errors()] == ["b.jpg"]


def test_state_names_are_the_strings_the_database_and_status_use() -> None:
    assert [state.value for state in FileState] == [
        "pending",
        "in_flight",
        "uploaded",
        "failed",
        "incomplete",
        "gone",
    ]
