"""The delivery promise under faults, with the real daemon and the real devserver.

Every image that is complete on disk reaches the dataset, byte-identical, at least once;
re-sends use the same reference_id, so the dataset holds one item per file; nothing the server
confirmed is sent again unless the file or its metadata changed. Faults come from the devserver
(5xx, 429, connection reset, stall, answer lost after store, endpoint down, 401) and from
`kill -9`. Run with -s to see the measured numbers.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.configfactory import API_KEY, watcher_env, write_config
from tests.daemonprocess import DaemonProcess, wait_until
from tests.imagefactory import write_jpeg
from tests.reliability import (
    Commands,
    DaemonPool,
    RequestKiller,
    SecretAudit,
    assert_one_item_each,
    cpu_seconds,
    events_named,
    is_append,
    leaks,
    log_events,
    tally_sends,
    wait_delivered,
    wait_log_event,
    write_images,
)
from watcher.devserver import DevServer

DATASET = "ds_faults"
RANDOM_FAULTS = ["500", "503", "429", "reset", "stall", "lost"]
# Two keys for the 401 scenario; 16 characters, so base64(key + ":") ends in "=" padding.
RIGHT_KEY = "right_key_R7k2Pq"
WRONG_KEY = "wrong_key_W3n8Lx"


@pytest.fixture
def daemons() -> Iterator[DaemonPool]:
    pool = DaemonPool()
    yield pool
    pool.kill_all()


@pytest.fixture
def cli() -> Commands:
    return Commands()


@pytest.fixture(autouse=True)
def secret_audit(tmp_path: Path, cli: Commands, daemons: DaemonPool) -> Iterator[SecretAudit]:
    """After every test in this file: no daemon log, command output or state db holds a key."""
    audit = SecretAudit(keys=[API_KEY], commands=cli, roots=[tmp_path])
    yield audit
    daemons.kill_all()  # logs complete before they are read
    assert audit.problems() == {}


@pytest.fixture
def own_servers() -> Iterator[list[DevServer]]:
    """Devservers a test builds itself (other options than the shared fixture's)."""
    servers: list[DevServer] = []
    yield servers
    for server in servers:
        server.stop()


def fault_config(tmp_path: Path, endpoint: str, root: Path, **sections: dict[str, Any]) -> Path:
    """A 2 s request deadline (a stall costs 2 s), 4 workers, batches of up to 10."""
    merged: dict[str, dict[str, Any]] = {
        "nucleus": {"timeout_seconds": 2},
        "upload": {"concurrency": 4, "max_files_per_request": 10},
        "settle": {"seconds": 0.3, "max_wait_seconds": 10},
    }
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    return write_config(
        tmp_path,
        endpoint=endpoint,
        watches=[{"path": str(root), "dataset_id": DATASET}],
        **merged,
    )


def report(label: str, **numbers: object) -> str:
    line = f"[{label}] " + ", ".join(f"{key}={value}" for key, value in numbers.items())
    print(line)
    return line


def reconciles_done(daemon: DaemonProcess) -> int:
    return len(events_named([daemon.log_text()], "reconcile_done"))


# -- 1. random faults -----------------------------------------------------------------------


def test_random_faults_daemon_delivers_each_file_once(
    tmp_path: Path, devserver: DevServer, daemons: DaemonPool, cli: Commands
) -> None:
    root = tmp_path / "cam"
    files = write_images(root, (f"before/f{i:03}.jpg" for i in range(150)), first_seed=0)
    # Seed 20 puts every kind of fault (3 stalls, 4 lost answers) among the first 40 requests.
    devserver.set_fault_rate(0.3, RANDOM_FAULTS, seed=20, retry_after_seconds=0.2)
    config = fault_config(tmp_path, devserver.base_url, root)

    started = time.monotonic()
    daemon = daemons.start(config, tmp_path / "run")
    # The other half arrives while the daemon runs (the live path, not the start-up walk).
    files |= write_images(root, (f"during/f{i:03}.jpg" for i in range(150)), first_seed=1000)
    wait_delivered(devserver, DATASET, files, timeout_seconds=120)
    totals = cli.wait_drained(config, uploaded=300, timeout_seconds=60)
    seconds = time.monotonic() - started

    assert totals["failed"] == 0 and totals["incomplete"] == 0, totals
    assert_one_item_each(devserver, DATASET, files)
    tally = tally_sends(devserver, DATASET, [daemon.log_text()])
    line = report(
        "random faults, daemon",
        files=300,
        wall_seconds=round(seconds, 1),
        duplicate_item_sends=tally.duplicate_item_sends,
        tally=tally.describe(),
    )
    assert set(RANDOM_FAULTS) <= set(tally.faults), line  # every kind really happened
    # A repeat is only allowed for items whose answer never arrived.
    assert tally.duplicate_item_sends <= tally.lost_item_sends, line

    # Nothing the server confirmed goes again: not on a reload's walk, not after a restart.
    devserver.set_fault_rate(0.0, [])
    sent = devserver.append_request_count()
    walks = reconciles_done(daemon)
    daemon.signal(signal.SIGHUP)
    assert wait_until(lambda: reconciles_done(daemon) > walks, 15)
    time.sleep(0.5)
    assert daemon.stop() == 0
    daemon.start()  # READY comes after the start-up walk
    time.sleep(1.0)
    assert devserver.append_request_count() == sent, "confirmed files were sent again"
    assert daemon.stop() == 0


def test_random_faults_scan_delivers_each_file_once(
    tmp_path: Path, devserver: DevServer, cli: Commands
) -> None:
    root = tmp_path / "cam"
    files = write_images(root, (f"f{i:03}.jpg" for i in range(300)), first_seed=0)
    old = time.time() - 60  # settled long ago: the scan takes them at once
    for path in files.values():
        os.utime(path, (old, old))
    devserver.set_fault_rate(0.3, RANDOM_FAULTS, seed=20, retry_after_seconds=0.2)
    config = fault_config(tmp_path, devserver.base_url, root)

    started = time.monotonic()
    # A scan gives up on an item after 5 tries and exits 1 (it stays pending); run it again
    # like a cron job would, a bounded number of times.
    runs = []
    for _ in range(6):
        result = cli.run("scan", "-c", str(config))
        runs.append(result.returncode)
        if result.returncode == 0:
            break
    seconds = time.monotonic() - started

    assert runs[-1] == 0, (runs, result.stdout, result.stderr)
    totals = cli.status(config)["totals"]
    assert totals["uploaded"] == 300 and totals["failed"] == 0 and totals["pending"] == 0, totals
    assert_one_item_each(devserver, DATASET, files)
    tally = tally_sends(devserver, DATASET, [])
    line = report(
        "random faults, scan",
        files=300,
        scan_runs=len(runs),
        wall_seconds=round(seconds, 1),
        duplicate_item_sends=tally.duplicate_item_sends,
        tally=tally.describe(),
    )
    assert set(RANDOM_FAULTS) <= set(tally.faults), line
    assert tally.duplicate_item_sends <= tally.lost_item_sends, line


def test_a_later_scan_gives_pending_items_a_fresh_set_of_tries(
    tmp_path: Path, devserver: DevServer, cli: Commands
) -> None:
    root = tmp_path / "cam"
    files = write_images(root, ["a.jpg"], first_seed=7)
    old = time.time() - 60
    os.utime(files["a.jpg"], (old, old))
    config = fault_config(tmp_path, devserver.base_url, root)
    devserver.inject_faults(*["503"] * 5, retry_after_seconds=0.05)
    first = cli.run("scan", "-c", str(config))
    assert first.returncode == 1, first.stdout
    assert cli.status(config)["totals"]["pending"] == 1  # five tries spent, still pending
    # One more transient failure: a fresh scan has tries to spare for it.
    devserver.inject_faults("503", retry_after_seconds=0.05)
    second = cli.run("scan", "-c", str(config))
    assert second.returncode == 0, second.stdout
    assert_one_item_each(devserver, DATASET, files)


# -- 2. kill -9 -------------------------------------------------------------------------------


def test_kill_9_at_ten_random_points_loses_nothing(
    tmp_path: Path, own_servers: list[DevServer], daemons: DaemonPool, cli: Commands
) -> None:
    killer = RequestKiller()
    server = DevServer(data_dir=tmp_path / "devserver", on_request=killer.on_request).start()
    own_servers.append(server)
    root = tmp_path / "cam"
    files = write_images(root, (f"before/f{i:03}.jpg" for i in range(100)), first_seed=0)
    during = {f"during/f{i:03}.jpg": root / "during" / f"f{i:03}.jpg" for i in range(200)}
    config = fault_config(tmp_path, server.base_url, root)

    stop_writing = threading.Event()

    def writer() -> None:
        for index, path in enumerate(during.values()):
            if stop_writing.wait(0.05):
                return
            write_jpeg(path, seed=1000 + index)

    rng = random.Random(20251126)
    kills: list[str] = []
    started = time.monotonic()
    thread = threading.Thread(target=writer, name="test-writer")
    thread.start()
    try:
        daemon = daemons.start(config, tmp_path / "run", wait_ready=False)
        for round_number in range(10):
            if round_number:
                daemon.start(wait_ready=False)
            assert daemon.process is not None
            pid = daemon.process.pid
            if rng.random() < 0.5:
                delay = rng.uniform(0.05, 1.5)  # start-up, the walk, or mid-upload
                time.sleep(delay)
                assert daemon.process.poll() is None, daemon.log_text()
                daemon.kill()
                kills.append(f"after {delay:.2f} s")
            else:
                nth = rng.randint(1, 6)  # as the n-th append arrives, before its answer
                killer.arm(pid, nth)
                fired = wait_until(lambda: daemon.process.poll() is not None, 4)
                killer.disarm()
                daemon.kill()
                kills.append(f"at append #{nth}" if fired else "fallback after 4 s")
        thread.join(30)
    finally:
        stop_writing.set()
        thread.join(30)
    files |= during

    daemon.start()
    wait_delivered(server, DATASET, files, timeout_seconds=60)
    cli.wait_drained(config, uploaded=300, timeout_seconds=30)
    seconds = time.monotonic() - started
    assert_one_item_each(server, DATASET, files)
    logs = daemons.log_texts()
    tally = tally_sends(server, DATASET, logs)
    released = sum(int(e["items"]) for e in events_named(logs, "resending_interrupted"))
    line = report(
        "kill -9",
        kills=kills,
        wall_seconds=round(seconds, 1),
        in_flight_rows_released_at_restarts=released,
        duplicate_item_sends=tally.duplicate_item_sends,
        tally=tally.describe(),
    )
    assert sum(k.startswith("at append") for k in kills) >= 3, line
    assert not events_named(logs, "state_db_corrupt"), line
    assert daemon.stop() == 0


# -- 3. endpoint down -------------------------------------------------------------------------


def test_endpoint_down_then_back_drains_without_busy_looping(
    tmp_path: Path, devserver: DevServer, daemons: DaemonPool, cli: Commands
) -> None:
    root = tmp_path / "cam"
    config = fault_config(tmp_path, devserver.base_url, root)
    root.mkdir()
    daemon = daemons.start(config, tmp_path / "run")
    assert daemon.process is not None
    files = write_images(root, (f"up/f{i:02}.jpg" for i in range(10)), first_seed=0)
    wait_delivered(devserver, DATASET, files, timeout_seconds=20)

    devserver.set_down(True)
    down_at = time.monotonic()
    late: dict[str, Path] = {}
    for index in range(20):  # files keep arriving while it is down
        late |= write_images(root, [f"down/f{index:02}.jpg"], first_seed=100 + index)
        time.sleep(0.1)
    cli.wait_totals(config, lambda t: t["pending"] + t["in_flight"] == 20, 20)
    wait_log_event(daemon, lambda e: e.get("event") == "upload_retry")

    before_requests = devserver.append_request_count()
    cpu_before = cpu_seconds(daemon.process.pid)
    window_started = time.monotonic()
    time.sleep(3.0)
    cpu_used = cpu_seconds(daemon.process.pid) - cpu_before
    window = time.monotonic() - window_started
    probes = devserver.append_request_count() - before_requests

    devserver.set_down(False)
    down_seconds = time.monotonic() - down_at
    files |= late
    drain_seconds = wait_delivered(devserver, DATASET, files, timeout_seconds=30)
    cli.wait_drained(config, uploaded=30, timeout_seconds=20)
    assert_one_item_each(devserver, DATASET, files)
    line = report(
        "endpoint down",
        down_seconds=round(down_seconds, 1),
        cpu_seconds_in_window=round(cpu_used, 3),
        window_seconds=round(window, 2),
        probes_in_window=probes,
        drain_seconds_after_up=round(drain_seconds, 2),
    )
    assert cpu_used < 0.3, line
    assert probes >= 1, line  # it kept trying (backoff, not giving up)
    assert daemon.stop() == 0


# -- 4. 401 -----------------------------------------------------------------------------------


def test_wrong_key_pauses_once_and_a_new_key_file_resumes_without_restart(
    tmp_path: Path,
    own_servers: list[DevServer],
    daemons: DaemonPool,
    cli: Commands,
    secret_audit: SecretAudit,
) -> None:
    secret_audit.keys += [RIGHT_KEY, WRONG_KEY]
    server = DevServer(data_dir=tmp_path / "devserver", api_key=RIGHT_KEY).start()
    own_servers.append(server)
    key_file = tmp_path / "api_key"
    key_file.write_text(WRONG_KEY + "\n")
    key_file.chmod(0o600)
    root = tmp_path / "cam"
    root.mkdir()
    config = fault_config(tmp_path, server.base_url, root, nucleus={"api_key_file": str(key_file)})
    daemon = daemons.start(config, tmp_path / "run")
    assert daemon.process is not None
    pid = daemon.process.pid

    files = write_images(root, (f"a/f{i:02}.jpg" for i in range(8)), first_seed=0)
    wait_log_event(daemon, lambda e: e.get("event") == "nucleus_unauthorized")
    files |= write_images(root, (f"b/f{i:02}.jpg" for i in range(8)), first_seed=50)
    cli.wait_totals(config, lambda t: t["pending"] + t["in_flight"] == 16, 20)
    refused = server.append_request_count()
    time.sleep(1.5)
    assert server.append_request_count() == refused, "still sending with a refused key"
    assert refused <= 4, f"{refused} requests: more than one per worker"  # not one per file
    assert wait_until(lambda: daemon.has_message("PAUSED"), 5), daemon.read_notifications()
    assert server.items(DATASET) == {}

    key_file.write_text(RIGHT_KEY + "\n")  # same file, mode stays 600
    wait_delivered(server, DATASET, files, timeout_seconds=20)
    cli.wait_drained(config, uploaded=16, timeout_seconds=20)
    assert daemon.process.pid == pid and daemon.process.poll() is None
    events = log_events(daemon.log_text())
    unauthorized = [e for e in events if e.get("event") == "nucleus_unauthorized"]
    assert len(unauthorized) == 1, unauthorized
    assert "401" in unauthorized[0]["reason"] and "hint" in unauthorized[0]
    assert any(e.get("event") == "uploads_resumed" for e in events)
    assert_one_item_each(server, DATASET, files)
    report("401", refused_requests=refused, unauthorized_log_lines=len(unauthorized))
    assert daemon.stop() == 0


# -- 5. asynchronous jobs ---------------------------------------------------------------------


def test_async_jobs_with_faults_and_a_restart_are_all_confirmed(
    tmp_path: Path, own_servers: list[DevServer], daemons: DaemonPool, cli: Commands
) -> None:
    server = DevServer(data_dir=tmp_path / "devserver", job_delay_seconds=0.8).start()
    own_servers.append(server)
    # Seed 5: 18 faults of every kind among the first 40 requests.
    server.set_fault_rate(0.3, RANDOM_FAULTS, seed=5, retry_after_seconds=0.2)
    root = tmp_path / "cam"
    files = write_images(root, (f"before/f{i:02}.jpg" for i in range(30)), first_seed=0)
    config = fault_config(
        tmp_path,
        server.base_url,
        root,
        nucleus={"asynchronous": True, "job_poll_seconds": 0.1},
        # Small batches: enough requests (about 20) for the 30 % fault rate to bite.
        upload={"max_files_per_request": 3},
    )
    started = time.monotonic()
    daemon = daemons.start(config, tmp_path / "run")
    files |= write_images(root, (f"during/f{i:02}.jpg" for i in range(30)), first_seed=500)
    # Stop while a job is still running: the next start must follow it, not send it again.
    wait_log_event(daemon, lambda e: e.get("event") == "job_submitted")
    assert daemon.stop() == 0
    first_log = daemon.log_text()
    submitted = {e["job_id"] for e in events_named([first_log], "job_submitted")}
    finished = {e["job_id"] for e in events_named([first_log], "job_finished")}
    carried = submitted - finished

    daemon.start()
    wait_delivered(server, DATASET, files, timeout_seconds=60)
    totals = cli.wait_drained(config, uploaded=60, timeout_seconds=30)
    seconds = time.monotonic() - started
    assert totals["failed"] == 0, totals
    followed = {e["job_id"] for e in events_named([daemon.log_text()], "job_finished")}
    assert_one_item_each(server, DATASET, files)
    assert all(r.query == "async=1" for r in server.requests() if is_append(r.method, r.path)), (
        "an append went without ?async=1"
    )
    tally = tally_sends(server, DATASET, [first_log, daemon.log_text()])
    line = report(
        "async",
        files=60,
        wall_seconds=round(seconds, 1),
        jobs_carried_over_restart=len(carried),
        duplicate_item_sends=tally.duplicate_item_sends,
        tally=tally.describe(),
    )
    assert carried, line  # the restart really had jobs to follow
    assert carried <= followed, line
    assert sum(tally.faults.values()) >= 3, line
    assert tally.duplicate_item_sends <= tally.lost_item_sends, line
    assert daemon.stop() == 0


# -- 6. secrets -------------------------------------------------------------------------------


def test_the_key_never_appears_in_logs_outputs_or_state(
    tmp_path: Path,
    devserver: DevServer,
    own_servers: list[DevServer],
    daemons: DaemonPool,
    cli: Commands,
    secret_audit: SecretAudit,
) -> None:
    """The places a key would leak from: debug logs, error messages about refused keys and
    failed requests, every command's output. The autouse audit checks the other tests."""
    root = tmp_path / "cam"
    files = write_images(root, (f"f{i}.jpg" for i in range(3)), first_seed=0)
    config = fault_config(tmp_path, devserver.base_url, root, log={"level": "debug"})
    devserver.inject_faults("500", "reset", "429", "lost", retry_after_seconds=0.1)
    daemon = daemons.start(config, tmp_path / "run")
    files |= write_images(root, (f"f{i}.jpg" for i in range(3, 6)), first_seed=3)
    wait_delivered(devserver, DATASET, files, timeout_seconds=20)
    daemon.signal(signal.SIGHUP)  # a reload reads the key again
    assert wait_until(lambda: "config_reloaded" in daemon.log_text(), 10)
    assert daemon.stop() == 0

    assert cli.run("check", "-c", str(config), "--online").returncode == 0
    cli.run("status", "-c", str(config))
    cli.status(config)
    cli.explain(config, root / "f0.jpg")
    cli.run("retry", "-c", str(config))

    # A server that refuses this key: the refusal is reported, the key is not.
    strict = DevServer(data_dir=tmp_path / "strict", api_key=RIGHT_KEY).start()
    own_servers.append(strict)
    (tmp_path / "refused").mkdir()
    refused_config = fault_config(tmp_path / "refused", strict.base_url, root)
    refused_scan = cli.run("scan", "-c", str(refused_config), timeout_seconds=60)
    refused_check = cli.run("check", "-c", str(refused_config), "--online")
    assert refused_scan.returncode == 1 and "401" in refused_scan.stdout, refused_scan.stdout
    assert refused_check.returncode == 1 and "401" in refused_check.stderr, refused_check.stderr
    env_scan = cli.run(
        "scan", "-c", str(refused_config), env=watcher_env(NUCLEUS_API_KEY=API_KEY + "x")
    )
    assert env_scan.returncode == 1

    log_text = daemon.log_text()
    assert any(e.get("level") == "debug" for e in log_events(log_text)), "no debug lines"
    assert "upload_retry" in log_text  # the faults were logged, with their reasons
    texts = secret_audit.texts()
    assert any(str(path).endswith("state.db") for path in texts), list(texts)
    assert len(texts) >= 10, list(texts)
    assert secret_audit.problems() == {}
    assert not leaks((tmp_path / "state" / "state.db").read_bytes(), [API_KEY])
