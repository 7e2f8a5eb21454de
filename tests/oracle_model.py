"""The world of the model-based oracle test (test_oracle.py): a watch folder the test writes to,
the real daemon as a subprocess, the devserver in-process, and the model of what the dataset
must hold.

The model is what the TEST did, never what it observed: relpath -> the version it last wrote
there, the rule values and dataset_id it configured. Hypothesis draws the next operation from the
model only, so a seed gives the same operations whatever the daemon's timing. What the daemon
did on its own (after_upload = "delete") is found by comparing the disk with the model, and is
checked, not folded back into the model.

The oracle, after quiescence:
1. every complete file on disk is in the CURRENT dataset under its reference_id, with exactly
   its bytes (sha256) and the metadata the current rules give its path;
2. every version the daemon deleted locally had its bytes stored under its reference_id (the
   devserver's items.jsonl journal is the full history of what each dataset held);
3. the daemon never died on its own and logged no traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.configfactory import write_config
from tests.daemonprocess import DaemonProcess, wait_until
from tests.imagefactory import jpeg_bytes
from tests.reliability import DaemonPool, RequestKiller, is_append
from watcher.devserver import DevServer
from watcher.store import FileState, StateStore

# The path space is small on purpose: names get reused, moved onto and renamed over often.
FOLDERS = ("", "Sunny", "Foggy")  # "" is the watch root: no rule matches there
NAMES = ("a.jpg", "b.jpg", "c.jpg")
RULE_FOLDERS = ("Sunny", "Foggy")
STATIC_METADATA = {"camera": "oracle"}
FIRST_DATASET = "ds_oracle_0"

REQUEST_TIMEOUT_SECONDS = 2  # what a stalled request costs
STOP_TIMEOUT_SECONDS = 3
JOB_DELAY_SECONDS = 0.3  # asynchronous jobs stay Running this long: restarts meet live jobs
# Quiescence normally takes well under 5 s; every stall still armed costs a request deadline
# plus a back-off on top of this.
QUIESCE_TIMEOUT_SECONDS = 20.0
QUIESCE_POLL_SECONDS = 0.25
DAEMON_DEATH_TIMEOUT_SECONDS = 10.0


def all_relpaths() -> list[str]:
    return [join(folder, name) for folder in FOLDERS for name in NAMES]


def join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def folder_of(relpath: str) -> str:
    return relpath.rpartition("/")[0]


def name_of(relpath: str) -> str:
    return relpath.rpartition("/")[2]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Version:
    """One content the test wrote: `seed` makes the bytes; `write_id` tells writes apart (a
    revert writes an old seed again, as a new write)."""

    seed: int
    sha256: str
    write_id: int


@dataclass
class DeletedVersion:
    """A version the daemon deleted locally: its bytes must be in the dataset's history under
    `reference_id`, in one of `dataset_ids` (those configured while the version existed)."""

    relpath: str
    version: Version
    dataset_ids: set[str]


@dataclass
class Model:
    files: dict[str, Version] = field(default_factory=dict)
    # Every seed written at a relpath, oldest first (revert picks from these).
    history: dict[str, list[int]] = field(default_factory=dict)
    deleted_by_test: set[str] = field(default_factory=set)
    # Dataset ids configured since each live write (write_id -> ids), for oracle clause 2.
    datasets_since_write: dict[int, set[str]] = field(default_factory=dict)
    rule_values: dict[str, str] = field(
        default_factory=lambda: {folder: folder.lower() for folder in RULE_FOLDERS}
    )
    dataset_id: str = FIRST_DATASET
    asynchronous: bool = False
    after_upload: str = "keep"
    next_seed: int = 1
    next_write_id: int = 1

    def reference_id(self, relpath: str) -> str:
        return relpath  # the config's reference_id template is "{relpath}"

    def expected_metadata(self, relpath: str) -> dict[str, Any]:
        metadata: dict[str, Any] = dict(STATIC_METADATA)
        folder = folder_of(relpath)
        if folder in self.rule_values:
            metadata["weather"] = self.rule_values[folder]
        return metadata

    def free_relpaths(self) -> list[str]:
        return [p for p in all_relpaths() if p not in self.files]

    def fresh_seed(self) -> int:
        seed = self.next_seed
        self.next_seed += 1
        return seed

    def new_version(self, seed: int) -> Version:
        version = Version(seed, sha256_hex(image_bytes(seed)), self.next_write_id)
        self.next_write_id += 1
        self.datasets_since_write[version.write_id] = {self.dataset_id}
        return version

    def place(self, relpath: str, version: Version) -> None:
        self.files[relpath] = version
        self.history.setdefault(relpath, []).append(version.seed)
        self.deleted_by_test.discard(relpath)

    def set_dataset(self, dataset_id: str) -> None:
        self.dataset_id = dataset_id
        for write_id in (v.write_id for v in self.files.values()):
            self.datasets_since_write[write_id].add(dataset_id)


_image_cache: dict[int, bytes] = {}


def image_bytes(seed: int) -> bytes:
    """A small decodable JPEG per seed; seeds give distinct bytes."""
    data = _image_cache.get(seed)
    if data is None:
        data = _image_cache[seed] = jpeg_bytes(32, 24, seed=seed)
    return data


# -- the world ------------------------------------------------------------------------------


class OracleFailure(AssertionError):
    pass


class World:
    """One example's folders, devserver and daemon. `close()` stops and joins everything."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.root = Path(tempfile.mkdtemp(prefix="nucleus-oracle-"))
        self.watch = self.root / "watch"
        for folder in FOLDERS:
            (self.watch / folder).mkdir(parents=True, exist_ok=True)
        self.killer = RequestKiller()
        self.devserver = DevServer(
            data_dir=self.root / "devserver",
            job_delay_seconds=JOB_DELAY_SECONDS,
            on_request=self.killer.on_request,
        ).start()
        self.pool = DaemonPool()
        self.daemon: DaemonProcess | None = None
        try:
            self.config = self.write_config()
        except BaseException:
            self.close(keep_files=False)
            raise
        self.faults_armed = 0
        self.faults_awaited = 0
        self.stalls_armed = 0
        self._last_mtime_ns = 0
        self.deleted_versions: dict[int, DeletedVersion] = {}
        self.checked_deletions: set[int] = set()

    # -- config and daemon

    def write_config(self) -> Path:
        model = self.model
        rules = [
            {"match": f"{folder}/**", "metadata": {"weather": model.rule_values[folder]}}
            for folder in RULE_FOLDERS
        ]
        return write_config(
            self.root,
            endpoint=self.devserver.base_url,
            watches=[
                {
                    "path": str(self.watch),
                    "dataset_id": model.dataset_id,
                    "reference_id": "{relpath}",
                    "metadata": STATIC_METADATA,
                    "rules": rules,
                }
            ],
            nucleus={
                "timeout_seconds": REQUEST_TIMEOUT_SECONDS,
                "asynchronous": model.asynchronous,
                "job_poll_seconds": 0.1,
            },
            upload={
                "concurrency": 3,
                "after_upload": model.after_upload,
                "stop_timeout_seconds": STOP_TIMEOUT_SECONDS,
            },
            settle={"seconds": 0.3, "max_wait_seconds": 10},
            # Only events, the start-up walk and reloads find files: a periodic walk would
            # paper over a missed change.
            scan={"interval_seconds": 3600},
        )

    def start_daemon(self) -> None:
        if self.daemon is None:
            self.daemon = self.pool.start(self.config, self.root / "run")
        else:
            self.daemon.start()

    def running_daemon(self) -> DaemonProcess:
        assert self.daemon is not None and self.daemon.process is not None
        return self.daemon

    def assert_alive(self) -> None:
        """Oracle clause 3: the daemon only ever exits because the test stopped it."""
        daemon = self.running_daemon()
        assert daemon.process is not None
        code = daemon.process.poll()
        if code is not None:
            raise OracleFailure(
                f"the daemon died on its own (exit code {code}):\n{daemon.log_text()[-3000:]}"
            )

    def kill9_and_restart(self) -> None:
        self.assert_alive()
        self.running_daemon().kill()
        self.start_daemon()

    def stop_and_restart(self) -> None:
        """SIGTERM (in-flight requests may finish), then start with the config as it is now."""
        self.assert_alive()
        code = self.running_daemon().stop(STOP_TIMEOUT_SECONDS + 30)
        if code != 0:
            raise OracleFailure(f"SIGTERM stop exited {code}:\n{self.log_tail()}")
        self.start_daemon()

    def reload(self) -> None:
        self.assert_alive()
        self.running_daemon().signal(signal.SIGHUP)

    def kill9_during_next_append(self) -> bool:
        """SIGKILL as the next append request is recorded (the server acted on it, the daemon
        never heard the answer); restart. False when no append came in time (then killed
        anyway)."""
        daemon = self.running_daemon()
        assert daemon.process is not None
        self.killer.arm(daemon.process.pid, 1)
        try:
            died = wait_until(
                lambda: daemon.process is not None and daemon.process.poll() is not None,
                DAEMON_DEATH_TIMEOUT_SECONDS,
                0.05,
            )
        finally:
            self.killer.disarm()
        daemon.kill()  # reaps it; kills it first when no append came
        self.start_daemon()
        return died

    def has_backlog(self) -> bool:
        counts = self.store_counts()
        return counts[FileState.PENDING] + counts[FileState.IN_FLIGHT] > 0

    # -- faults

    def arm_faults(self, kind: str, count: int) -> None:
        self.devserver.inject_faults(*([kind] * count), retry_after_seconds=0.2)
        self.faults_armed += count
        if kind == "stall":
            self.stalls_armed += count

    def faults_used(self, kind: str | None = None) -> int:
        return sum(
            1
            for r in self.devserver.requests()
            if is_append(r.method, r.path) and r.fault and kind in (None, r.fault)
        )

    def wait_faults_used(self, timeout_seconds: float = 10.0) -> bool:
        """Until every armed fault has hit a request (or the deadline: nothing to send)."""
        return wait_until(lambda: self.faults_used() >= self.faults_armed, timeout_seconds, 0.05)

    def wait_lost_answer(self, before: int, timeout_seconds: float = 10.0) -> bool:
        return wait_until(lambda: self.lost_answers() > before, timeout_seconds, 0.05)

    def lost_answers(self) -> int:
        return sum(1 for r in self.devserver.requests() if r.fault == "lost")

    # -- files (every write gets an mtime above all earlier ones: a rewrite with the same size
    #    and mtime is invisible to a stat-based watcher by design, and not what is tested here)

    def path(self, relpath: str) -> Path:
        return self.watch / relpath

    def _fresh_mtime(self, path: Path) -> None:
        st = path.stat()
        if st.st_mtime_ns <= self._last_mtime_ns:
            bumped = self._last_mtime_ns + 1_000_000
            os.utime(path, ns=(st.st_atime_ns, bumped))
            self._last_mtime_ns = bumped
        else:
            self._last_mtime_ns = st.st_mtime_ns

    def write_in_place(self, relpath: str, version: Version) -> None:
        self.note_if_deleted(relpath)
        path = self.path(relpath)
        with path.open("wb") as out:  # O_TRUNC: the watcher may see it empty, then full
            out.write(image_bytes(version.seed))
        self._fresh_mtime(path)

    def write_by_rename(self, relpath: str, version: Version) -> None:
        """Write a hidden temp name (excluded by the default globs), then rename over."""
        self.note_if_deleted(relpath)
        path = self.path(relpath)
        temp = path.with_name(f".{path.name}.tmp")
        temp.write_bytes(image_bytes(version.seed))
        self._fresh_mtime(temp)
        os.replace(temp, path)

    def delete(self, relpath: str) -> None:
        self.note_if_deleted(relpath)
        self.path(relpath).unlink(missing_ok=True)

    def rename(self, source: str, destination: str, version: Version) -> None:
        """Rename; when the daemon deleted the source (after_upload = "delete"), the same
        content reaches `destination` by a write instead, so the model stays the truth."""
        self.note_if_deleted(destination)
        try:
            os.rename(self.path(source), self.path(destination))
        except FileNotFoundError:
            self.note_if_deleted(source)
            self.write_by_rename(destination, version)

    def note_if_deleted(self, relpath: str) -> None:
        """Before the test touches a path the model says exists: if it is missing, the daemon
        deleted it; remember that version for oracle clause 2."""
        version = self.model.files.get(relpath)
        if version is None or version.write_id in self.deleted_versions:
            return
        if not self.path(relpath).exists():
            self._record_deletion(relpath, version)

    def _record_deletion(self, relpath: str, version: Version) -> None:
        if self.model.after_upload != "delete":
            raise OracleFailure(
                f"{relpath} vanished with after_upload = {self.model.after_upload!r}:"
                f" the daemon deleted a file it must keep\n{self.log_tail()}"
            )
        self.deleted_versions[version.write_id] = DeletedVersion(
            relpath, version, set(self.model.datasets_since_write[version.write_id])
        )

    # -- what is where

    def disk_files(self) -> dict[str, str]:
        """relpath -> sha256 of every non-hidden file under the watch folder now."""
        found: dict[str, str] = {}
        for path in self.watch.rglob("*"):
            if path.name.startswith(".") or not path.is_file():
                continue
            with suppress(FileNotFoundError):  # the daemon may delete it under us
                found[path.relative_to(self.watch).as_posix()] = sha256_hex(path.read_bytes())
        return found

    def store_counts(self) -> dict[str, int]:
        store = StateStore.open_read_only(self.root / "state" / "state.db")
        try:
            return store.state_counts()
        finally:
            store.close()

    def journal(self, dataset_id: str) -> list[dict[str, Any]]:
        """Every item write of the dataset, oldest first (the devserver's items.jsonl)."""
        path = self.devserver.data_dir / "datasets" / dataset_id / "items.jsonl"
        if not path.exists():
            return []
        entries = []
        for line in path.read_text().splitlines():
            with suppress(ValueError):
                entries.append(json.loads(line))
        return entries

    def log_tail(self, chars: int = 3000) -> str:
        return self.running_daemon().log_text()[-chars:] if self.daemon else ""

    # -- quiescence and the oracle

    def dataset_problems(self, disk: dict[str, str]) -> list[str]:
        """Oracle clause 1 for the files in `disk`."""
        model = self.model
        items = self.devserver.items(model.dataset_id)
        problems = []
        for relpath, sha256 in sorted(disk.items()):
            reference_id = model.reference_id(relpath)
            item = items.get(reference_id)
            if item is None:
                problems.append(f"{relpath}: no item {reference_id!r} in {model.dataset_id}")
                continue
            if item.image_sha256 != sha256:
                problems.append(
                    f"{relpath}: {model.dataset_id} holds other bytes under {reference_id!r}"
                    f" (server {str(item.image_sha256)[:12]}, disk {sha256[:12]},"
                    f" {self.version_name(relpath, item.image_sha256)})"
                )
            expected = model.expected_metadata(relpath)
            if item.metadata != expected:
                problems.append(
                    f"{relpath}: metadata {item.metadata} in {model.dataset_id}, rules say"
                    f" {expected}"
                )
        return problems

    def version_name(self, relpath: str, sha256: str | None) -> str:
        seeds = [s for s in self.model.history.get(relpath, []) if image_sha(s) == sha256]
        return f"server has seed {seeds[-1]}" if seeds else "server bytes never written here"

    def quiesce(self) -> tuple[bool, float]:
        """Until the store has nothing pending or in flight, no append request arrived since
        the last poll, and the dataset matches the disk; (reached, seconds waited)."""
        started = time.monotonic()
        last_requests = -1

        def quiet() -> bool:
            nonlocal last_requests
            self.assert_alive()
            requests = self.devserver.append_request_count()
            stable, last_requests = requests == last_requests, requests
            if not stable or self.has_backlog():
                return False
            return not self.dataset_problems(self.disk_files())

        stalls_left = max(0, self.stalls_armed - self.faults_used("stall"))
        timeout_seconds = QUIESCE_TIMEOUT_SECONDS + stalls_left * (REQUEST_TIMEOUT_SECONDS + 1)
        reached = wait_until(quiet, timeout_seconds, QUIESCE_POLL_SECONDS)
        return reached, time.monotonic() - started

    def check_oracle(self) -> list[str]:
        """All three clauses; the problems (empty when the oracle holds)."""
        self.assert_alive()
        disk = self.disk_files()
        problems = []
        for relpath, sha256 in sorted(disk.items()):
            version = self.model.files.get(relpath)
            if version is None or version.sha256 != sha256:
                problems.append(f"{relpath}: on disk but not what the test wrote (harness bug?)")
        for relpath, version in sorted(self.model.files.items()):
            if relpath not in disk and version.write_id not in self.deleted_versions:
                self._record_deletion(relpath, version)
        problems += self.dataset_problems(disk)
        problems += self.deletion_problems()
        problems += self.traceback_problems()
        return problems

    def deletion_problems(self) -> list[str]:
        """Oracle clause 2."""
        problems = []
        for write_id, deleted in sorted(self.deleted_versions.items()):
            if write_id in self.checked_deletions:
                continue
            reference_id = self.model.reference_id(deleted.relpath)
            held = any(
                entry.get("reference_id") == reference_id
                and entry.get("image_sha256") == deleted.version.sha256
                for dataset_id in sorted(deleted.dataset_ids)
                for entry in self.journal(dataset_id)
            )
            if held:
                self.checked_deletions.add(write_id)
            else:
                problems.append(
                    f"{deleted.relpath} (seed {deleted.version.seed}) was deleted locally but no"
                    f" dataset of {sorted(deleted.dataset_ids)} ever held those bytes under"
                    f" {reference_id!r}"
                )
        return problems

    def traceback_problems(self) -> list[str]:
        assert self.daemon is not None
        problems = []
        for log in sorted(self.daemon.workdir.glob("daemon-*.log")):
            text = log.read_text(errors="replace")
            if "Traceback (most recent call last)" in text:
                at = text.index("Traceback (most recent call last)")
                problems.append(
                    f"{log.name} holds a traceback: {text[max(0, at - 300) : at + 1500]}"
                )
        return problems

    def close(self, *, keep_files: bool) -> None:
        self.killer.disarm()
        self.pool.kill_all()
        self.devserver.stop()
        if not keep_files:
            shutil.rmtree(self.root, ignore_errors=True)


def image_sha(seed: int) -> str:
    return sha256_hex(image_bytes(seed))
