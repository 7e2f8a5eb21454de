"""Every config key with edge values: `check` refuses it in one line naming the key, or it works.

Each row sets one key (sometimes with a companion key it needs) on top of a small working config
and runs the real `nucleus-watcher check`. A refusal must be exit 2 and exactly one line that
starts with `config.toml: at '<key>'`. An accepted value must then work where it is used: a
`scan` against the devserver uploads exactly what the value says, the metrics server binds the
address, the client is built, the free-space guard runs; values only the daemon uses run in real
daemons (`test_daemon_runs_with_the_accepted_values_of_daemon_only_keys`).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import certifi
import pytest
import requests
from pydantic import BaseModel

from tests.configfactory import API_KEY
from tests.daemonprocess import DaemonProcess, wait_until
from tests.imagefactory import write_jpeg
from watcher import cli
from watcher.commands import run_scan
from watcher.config import Settings, load_settings, resolve_api_key
from watcher.config.messages import MODEL_BY_CONTAINER
from watcher.devserver import DevServer
from watcher.pipeline import FreeSpaceGuard
from watcher.pipeline import wiring as pipeline
from watcher.service import Metrics, reset_logging

DATASET = "ds_edge"
# What the watch folder holds; every file is 30 days old, so no settle window holds it back.
FILES = ("top.jpg", "raw/a.jpg", "raw/deep/b.jpg", "other/c.jpg")
ALL = frozenset(FILES)
NONE: frozenset[str] = frozenset()
OLD_SECONDS = 30 * 86400
WEEK = "604800"


# --------------------------------------------------------------------------------------------
# What a row expects


@dataclass(frozen=True)
class Refused:
    """`check` exits 2 with one line naming `key` (the row's own key when empty)."""

    key: str = ""
    not_in_line: str = ""


@dataclass(frozen=True)
class Scans:
    """`scan` exits `exit_code` and the dataset then holds exactly these reference_ids."""

    uploaded: frozenset[str] = ALL
    dataset: str = DATASET
    exit_code: int = 0


@dataclass(frozen=True)
class BuildsClient:
    """The NucleusClient is built from the settings and closed (no server is asked)."""


@dataclass(frozen=True)
class Listens:
    """The metrics server starts on the parsed address (None: metrics off) and answers."""


@dataclass(frozen=True)
class GuardsDisk:
    """The free-space guard is built from the settings and looks at the watch root once."""


@dataclass(frozen=True)
class InDaemon:
    """`check` accepts it here; a real daemon runs with it in the daemon test below."""


Outcome = Refused | Scans | BuildsClient | Listens | GuardsDisk | InDaemon
REFUSED = Refused()


@dataclass(frozen=True)
class Row:
    key: str  # as messages name it: "upload.concurrency", "watch[0].rules[0].match"
    value: str  # TOML text; @TMP@, @ROOT@, @URL@ and @HOSTPORT@ are filled in
    outcome: Outcome
    # Companion keys the value needs (None removes a key of the base config).
    also: Mapping[str, str | None] = field(default_factory=dict)


def scans(*uploaded: str, dataset: str = DATASET, exit_code: int = 0) -> Scans:
    return Scans(frozenset(uploaded), dataset, exit_code)


MOVE = {"upload.after_upload": '"move"'}
NOT_RECURSIVE = {"watch[0].recursive": "false"}
ASYNC = {"nucleus.asynchronous": "true"}
WEEK_SETTLE = {"settle.max_wait_seconds": WEEK}
NO_MATCH = {"watch[0].rules[0].match": None}

ROWS: tuple[Row, ...] = (
    # top level
    Row("device_id", '""', Scans()),
    Row(
        "device_id",
        '"cam 7 ü"',
        scans(*(f"cam 7 ü/{name}" for name in FILES)),
        {"watch[0].reference_id": '"{device}/{relpath}"'},
    ),
    Row("device_id", '"' + "d" * 253 + '"', Scans()),
    Row("device_id", '"' + "d" * 254 + '"', REFUSED),
    Row("device_id", '"a\\u0001b"', REFUSED),
    Row("device_id", "7", REFUSED),
    # [nucleus]
    Row("nucleus.endpoint", '"@URL@/"', Scans()),
    Row("nucleus.endpoint", '" @URL@ "', Scans()),
    Row("nucleus.endpoint", '"HTTP://@HOSTPORT@/v1/nucleus"', Scans()),
    Row("nucleus.endpoint", '"https://[::1]:1/v1/nucleus"', BuildsClient()),
    Row("nucleus.endpoint", '"https://bücher.example/v1/nucleus"', BuildsClient()),
    Row(
        "nucleus.endpoint",
        '"http://user:s3cret@@HOSTPORT@/v1/nucleus"',
        Refused(not_in_line="s3cret"),
    ),
    Row("nucleus.endpoint", '"http://127.0.0.1:99999/v1/nucleus"', REFUSED),
    Row("nucleus.endpoint", '"@URL@?x=1"', REFUSED),
    Row("nucleus.endpoint", '"@URL@#top"', REFUSED),
    Row("nucleus.endpoint", '"http:///v1/nucleus"', REFUSED),
    Row("nucleus.endpoint", '"http://exa mple.com/v1/nucleus"', REFUSED),
    Row("nucleus.endpoint", '"ftp://example.com/v1/nucleus"', REFUSED),
    Row("nucleus.endpoint", '""', REFUSED),
    Row("nucleus.endpoint", "42", REFUSED),
    Row("nucleus.api_key_file", '""', Scans()),
    Row("nucleus.api_key_file", '"@TMP@/key dir ü/api key"', Scans()),
    Row("nucleus.api_key_file", '"key dir ü/api key"', Scans()),
    Row("nucleus.api_key_file", '"@TMP@/missing key"', REFUSED),
    Row("nucleus.api_key_file", '"@TMP@/open key"', REFUSED),
    Row("nucleus.api_key_file", '"@TMP@/a dir"', REFUSED),
    Row("nucleus.api_key_file", '"@TMP@/a\\u0000b"', REFUSED),
    Row("nucleus.api_key_file", "1", REFUSED),
    Row("nucleus.timeout_seconds", WEEK, Scans()),
    Row("nucleus.timeout_seconds", '"30"', Scans()),
    Row("nucleus.timeout_seconds", "0.001", BuildsClient()),
    Row("nucleus.timeout_seconds", "0", REFUSED),
    Row("nucleus.timeout_seconds", "-1", REFUSED),
    Row("nucleus.timeout_seconds", "inf", REFUSED),
    Row("nucleus.timeout_seconds", "nan", REFUSED),
    Row("nucleus.timeout_seconds", "1e300", REFUSED),
    Row("nucleus.timeout_seconds", "true", REFUSED),
    Row("nucleus.timeout_seconds", '"soon"', REFUSED),
    Row("nucleus.ca_bundle", '""', Scans()),
    Row("nucleus.ca_bundle", '"@TMP@/ca bundle ü.pem"', Scans()),
    Row("nucleus.ca_bundle", '"@TMP@/garbage.pem"', REFUSED),
    Row("nucleus.ca_bundle", '"@TMP@/missing.pem"', REFUSED),
    Row("nucleus.ca_bundle", '"@TMP@/a dir"', REFUSED),
    Row("nucleus.ca_bundle", "[]", REFUSED),
    Row("nucleus.asynchronous", "true", Scans()),
    Row("nucleus.asynchronous", '"yes please"', REFUSED),
    Row("nucleus.asynchronous", "2", REFUSED),
    Row("nucleus.job_poll_seconds", "0.01", Scans(), ASYNC),
    Row("nucleus.job_poll_seconds", "0", REFUSED),
    Row("nucleus.job_poll_seconds", "-0.0", REFUSED),
    Row("nucleus.job_poll_seconds", "inf", REFUSED),
    # [upload]
    Row("upload.concurrency", "1", Scans()),
    Row("upload.concurrency", "64", Scans()),
    Row("upload.concurrency", '"4"', Scans()),
    Row("upload.concurrency", "0", REFUSED),
    Row("upload.concurrency", "-1", REFUSED),
    Row("upload.concurrency", "65", REFUSED),
    Row("upload.concurrency", "1000000000", REFUSED),
    Row("upload.concurrency", "true", REFUSED),
    Row("upload.concurrency", "2.5", REFUSED),
    Row("upload.max_files_per_request", "1", Scans()),
    Row("upload.max_files_per_request", "10", Scans()),
    Row("upload.max_files_per_request", "0", REFUSED),
    Row("upload.max_files_per_request", "11", REFUSED),
    Row("upload.max_file_bytes", "1", scans(exit_code=1)),
    Row("upload.max_file_bytes", "1e9", Scans()),
    Row("upload.max_file_bytes", "99999999999999999999", Scans()),
    Row("upload.max_file_bytes", "0", REFUSED),
    Row("upload.bandwidth_limit", '""', Scans()),
    Row("upload.bandwidth_limit", '"1B/s"', Scans()),
    Row("upload.bandwidth_limit", '"1000 GB / s"', Scans()),
    Row("upload.bandwidth_limit", '"0B/s"', REFUSED),
    Row("upload.bandwidth_limit", '"2Mb/s"', REFUSED),
    Row("upload.bandwidth_limit", '"fast"', REFUSED),
    Row("upload.bandwidth_limit", '"\uff12MB/s"', REFUSED),  # a full-width digit
    Row("upload.bandwidth_limit", '"1' + "0" * 400 + 'B/s"', REFUSED),
    Row("upload.bandwidth_limit", "5", REFUSED),
    Row("upload.retry_initial_seconds", "0.001", Scans()),
    Row("upload.retry_initial_seconds", "1", REFUSED),  # more than the base retry_max 0.5
    Row("upload.retry_initial_seconds", "0", REFUSED),
    Row("upload.retry_initial_seconds", "inf", REFUSED),
    Row("upload.retry_max_seconds", WEEK, Scans()),
    Row("upload.retry_max_seconds", "0.01", Refused("upload.retry_initial_seconds")),
    Row("upload.retry_max_seconds", "inf", REFUSED),
    Row("upload.after_upload", '"delete"', InDaemon()),
    Row("upload.after_upload", '"move"', InDaemon(), {"upload.archive_dir": '"archive ü"'}),
    Row("upload.after_upload", '"move"', Refused("upload.archive_dir")),
    Row("upload.after_upload", '"MOVE"', REFUSED),
    Row("upload.archive_dir", '"@TMP@/archive dir"', InDaemon(), MOVE),
    Row("upload.archive_dir", '"@ROOT@/archive"', REFUSED, MOVE),
    Row("upload.archive_dir", '"@TMP@/a file"', REFUSED, MOVE),
    Row("upload.archive_dir", '"@TMP@/a\\u0000b"', REFUSED, MOVE),
    Row("upload.on_conflict", '"update"', Scans()),
    Row("upload.on_conflict", '"overwrite"', REFUSED),
    Row("upload.order", '"newest-first"', Scans()),
    Row("upload.order", '"newest"', REFUSED),
    Row("upload.stop_timeout_seconds", "0.001", Scans()),
    Row("upload.stop_timeout_seconds", WEEK, InDaemon()),
    Row("upload.stop_timeout_seconds", "0", REFUSED),
    Row("upload.stop_timeout_seconds", "inf", REFUSED),
    # [settle]
    Row("settle.seconds", "0.001", InDaemon()),
    Row("settle.seconds", WEEK, Scans(), WEEK_SETTLE),
    Row("settle.seconds", "0", REFUSED),
    Row("settle.seconds", "inf", REFUSED),
    Row("settle.seconds", "1e9", REFUSED),
    Row("settle.max_wait_seconds", WEEK, InDaemon()),
    Row("settle.max_wait_seconds", "0.01", REFUSED, {"settle.seconds": "0.02"}),
    Row("settle.max_wait_seconds", "inf", REFUSED),
    Row("settle.verify_image", "false", Scans()),
    Row("settle.verify_image", '"no"', Scans()),  # pydantic reads yes/no, on/off too
    Row("settle.verify_image", '"nope"', REFUSED),
    # [scan]
    Row("scan.interval_seconds", "0.05", InDaemon()),
    Row("scan.interval_seconds", WEEK, InDaemon()),
    Row("scan.interval_seconds", "0", REFUSED),
    Row("scan.interval_seconds", "inf", REFUSED),
    Row("scan.interval_seconds", "1e10", REFUSED),
    Row("scan.polling", "true", InDaemon()),
    Row("scan.polling", '"sometimes"', REFUSED),
    # [state]
    Row("state.path", '"state.db"', Scans()),
    Row("state.path", '"@TMP@/state dir ü/s.db"', Scans()),
    Row("state.path", '"@TMP@/a dir"', REFUSED),
    Row("state.path", '"@TMP@/a file/state.db"', REFUSED),
    Row("state.path", '"@TMP@/a\\u0000b.db"', REFUSED),
    Row("state.path", '""', REFUSED),
    # [log]
    Row("log.format", '"console"', Scans()),
    Row("log.format", '"JSON"', Scans()),
    Row("log.format", '"xml"', REFUSED),
    Row("log.level", '"DEBUG"', Scans()),
    Row("log.level", '"warn"', Scans()),
    Row("log.level", '" error "', Scans()),
    Row("log.level", '"verbose"', REFUSED),
    Row("log.level", "10", REFUSED),
    # [metrics]
    Row("metrics.listen", '""', Listens()),
    Row("metrics.listen", '"127.0.0.1:0"', Listens()),
    Row("metrics.listen", '"[::1]:0"', Listens()),
    Row("metrics.listen", '"0.0.0.0:0"', Listens()),
    Row("metrics.listen", '"[::]:0"', Listens()),
    Row("metrics.listen", '"localhost:0"', Listens()),
    Row("metrics.listen", '"127.0.0.1:0"', InDaemon()),
    Row("metrics.listen", '"::1:9464"', REFUSED),
    Row("metrics.listen", '":9464"', REFUSED),
    Row("metrics.listen", '"9464"', REFUSED),
    Row("metrics.listen", '"[::1]"', REFUSED),
    Row("metrics.listen", '"127.0.0.1:99999"', REFUSED),
    Row("metrics.listen", '"127.0.0.1:-1"', REFUSED),
    Row("metrics.listen", '"127.0.0.1:٩٤٦٤"', REFUSED),
    Row("metrics.listen", '"127.0.0.1:²"', REFUSED),
    Row("metrics.listen", '"nosuchhost.invalid:9464"', REFUSED),
    Row("metrics.listen", "9464", REFUSED),
    # [disk]
    Row("disk.min_free_bytes", "0", GuardsDisk()),
    Row("disk.min_free_bytes", "9223372036854775807", GuardsDisk()),
    Row("disk.min_free_bytes", "-1", REFUSED),
    Row("disk.min_free_bytes", "0.5", REFUSED),
    Row("disk.delete_uploaded_when_low", "true", GuardsDisk(), {"disk.min_free_bytes": "1"}),
    Row("disk.delete_uploaded_when_low", '"maybe"', REFUSED),
    # [[watch]]
    Row("watch[0].path", '"@ROOT@/"', Scans()),
    Row("watch[0].path", '"@TMP@/missing"', scans()),
    Row("watch[0].path", '"cam"', REFUSED),
    Row("watch[0].path", '""', REFUSED),
    Row("watch[0].path", '"@TMP@/a file"', REFUSED),
    Row("watch[0].path", '"@TMP@/a\\u0000b"', REFUSED),
    Row("watch[0].path", "[]", REFUSED),
    Row("watch[0].dataset_id", '"ds_A-1.b"', Scans(dataset="ds_A-1.b")),
    Row("watch[0].dataset_id", '"ds_ü?#%"', REFUSED),
    Row("watch[0].dataset_id", '""', REFUSED),
    Row("watch[0].dataset_id", '"ds a"', REFUSED),
    Row("watch[0].dataset_id", '"ds/a"', REFUSED),
    Row("watch[0].dataset_id", "5", REFUSED),
    Row("watch[0].recursive", "false", scans("top.jpg")),
    Row("watch[0].recursive", '"no"', scans("top.jpg")),
    Row("watch[0].recursive", '"nah"', REFUSED),
    Row("watch[0].include", '["raw/*.jpg"]', scans("raw/a.jpg")),
    Row("watch[0].include", '["raw/**"]', scans("raw/a.jpg", "raw/deep/b.jpg")),
    Row("watch[0].include", '["**/b.jpg"]', scans("raw/deep/b.jpg")),
    Row("watch[0].include", '["/top.jpg", "RAW/*/*.JPG"]', scans("top.jpg", "raw/deep/b.jpg")),
    Row("watch[0].include", '["*.JPG"]', Scans()),
    Row("watch[0].include", "[]", Scans()),
    Row("watch[0].include", '["top.jpg"]', scans("top.jpg"), NOT_RECURSIVE),
    Row("watch[0].include", '["raw/*.jpg"]', REFUSED, NOT_RECURSIVE),
    Row("watch[0].include", '["raw/"]', REFUSED),
    Row("watch[0].include", '["../*.jpg"]', REFUSED),
    Row("watch[0].include", '["/"]', REFUSED),
    Row("watch[0].include", '[""]', REFUSED),
    Row("watch[0].include", '"*.jpg"', REFUSED),
    Row("watch[0].include", "[1]", Refused("watch[0].include[0]")),
    Row("watch[0].exclude", '["raw"]', scans("top.jpg", "other/c.jpg")),
    Row("watch[0].exclude", '["raw/deep"]', scans("top.jpg", "raw/a.jpg", "other/c.jpg")),
    Row("watch[0].exclude", '["raw/*.jpg"]', scans("top.jpg", "raw/deep/b.jpg", "other/c.jpg")),
    Row("watch[0].exclude", '["*"]', scans()),
    Row("watch[0].exclude", "[]", Scans()),
    Row("watch[0].exclude", '["raw/"]', REFUSED),
    Row("watch[0].exclude", '["a/../b"]', REFUSED),
    Row("watch[0].exclude", '[""]', REFUSED),
    Row("watch[0].reference_id", '"cam/{relpath}"', scans(*(f"cam/{name}" for name in FILES))),
    Row("watch[0].reference_id", '"{name}"', scans("top.jpg", "a.jpg", "b.jpg", "c.jpg")),
    Row("watch[0].reference_id", '""', REFUSED),
    Row("watch[0].reference_id", '"{nope}"', REFUSED),
    Row("watch[0].reference_id", '"{parent}"', REFUSED),
    Row("watch[0].reference_id", '"' + "x" * 1025 + '{relpath}"', REFUSED),
    Row("watch[0].metadata", '{ camera = "ü 1", n = 3, ok = true, x = 1.5 }', Scans()),
    Row("watch[0].metadata", '{ "" = 1 }', Refused('watch[0].metadata.""')),
    Row("watch[0].metadata", "{ a = [1] }", Refused("watch[0].metadata.a")),
    Row("watch[0].metadata", "{ a = { b = 1 } }", Refused("watch[0].metadata.a")),
    Row("watch[0].metadata", "{ a = inf }", Refused("watch[0].metadata.a")),
    Row("watch[0].metadata", "{ a = nan }", Refused("watch[0].metadata.a")),
    Row("watch[0].metadata", '"text"', REFUSED),
    Row("watch[0].remote_url", '"https://cdn.example/{relpath}"', Scans()),
    Row("watch[0].remote_url", '"ftp://cdn.example/{relpath}"', REFUSED),
    Row("watch[0].remote_url", '"{relpath}"', REFUSED),
    Row("watch[0].rules", '"x"', REFUSED),
    Row("watch[0].rules[0].match", '"raw/{kind}.jpg"', Scans()),
    Row("watch[0].rules[0].match", '"{a}/{a}"', REFUSED),
    Row("watch[0].rules[0].match", "5", REFUSED),
    Row("watch[0].rules[0].regex", '"(?P<kind>raw)/"', Scans(), NO_MATCH),
    Row("watch[0].rules[0].regex", '"("', REFUSED, NO_MATCH),
    Row("watch[0].rules[0].regex", '"raw"', Refused("watch[0].rules[0]")),
    Row("watch[0].rules[0].metadata", '{ n = "{kind}" }', Scans()),
    Row("watch[0].rules[0].metadata", "{ n = inf }", Refused("watch[0].rules[0].metadata.n")),
    Row("watch[0].rules[0].metadata", '{ n = "{nope}" }', Refused("watch[0].rules[0].metadata.n")),
)


# --------------------------------------------------------------------------------------------
# Writing a config from a row


BASE: dict[str, dict[str, str]] = {
    "": {},
    "nucleus": {"endpoint": '"@URL@"', "timeout_seconds": "30", "job_poll_seconds": "0.05"},
    "upload": {"retry_initial_seconds": "0.05", "retry_max_seconds": "0.5"},
    "settle": {"seconds": "0.2", "max_wait_seconds": "5"},
    "scan": {},
    "state": {"path": '"@TMP@/state/state.db"'},
    "log": {"format": '"json"', "level": '"info"'},
    "metrics": {"listen": '""'},
    "disk": {},
}
BASE_WATCH = {"path": '"@ROOT@"', "dataset_id": f'"{DATASET}"'}
BASE_RULE = {"match": '"raw/{kind}.jpg"', "metadata": '{ kind = "{kind}" }'}
_RULE_KEY = re.compile(r"watch\[0\]\.rules\[0\]\.(\w+)")
_WATCH_KEY = re.compile(r"watch\[0\]\.(\w+)")


def config_text(overrides: Mapping[str, str | None]) -> str:
    sections = {name: dict(values) for name, values in BASE.items()}
    watch: dict[str, str | None] = dict(BASE_WATCH)
    rule: dict[str, str | None] | None = None
    for key, value in overrides.items():
        if found := _RULE_KEY.fullmatch(key):
            rule = dict(BASE_RULE) if rule is None else rule
            rule[found[1]] = value
        elif found := _WATCH_KEY.fullmatch(key):
            watch[found[1]] = value
        else:
            section, _, name = key.rpartition(".")
            if value is None:
                sections[section].pop(name, None)
            else:
                sections[section][name] = value
    lines = [f"{name} = {value}" for name, value in sections.pop("").items()]
    for section, values in sections.items():
        lines += [f"[{section}]", *(f"{name} = {value}" for name, value in values.items())]
    lines += ["[[watch]]", *(f"{k} = {v}" for k, v in watch.items() if v is not None)]
    if rule is not None:
        lines += ["[[watch.rules]]", *(f"{k} = {v}" for k, v in rule.items() if v is not None)]
    return "\n".join(lines) + "\n"


@dataclass
class Places:
    tmp: Path
    root: Path
    url: str

    def fill(self, text: str) -> str:
        hostport = self.url.split("/")[2]
        for marker, value in (
            ("@TMP@", str(self.tmp)),
            ("@ROOT@", str(self.root)),
            ("@URL@", self.url),
            ("@HOSTPORT@", hostport),
        ):
            text = text.replace(marker, value)
        return text

    def write(self, overrides: Mapping[str, str | None], name: str = "config.toml") -> Path:
        config = self.tmp / name
        config.write_text(self.fill(config_text(overrides)), encoding="utf-8")
        return config


def make_places(tmp_path: Path, url: str) -> Places:
    """The watch folder with FILES, plus the files and folders the rows point at."""
    root = tmp_path / "cam ü"
    old = time.time() - OLD_SECONDS
    for index, name in enumerate(FILES):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jpeg(path, seed=index)
        os.utime(path, (old, old))
    key_file = tmp_path / "key dir ü" / "api key"
    key_file.parent.mkdir()
    key_file.write_text(API_KEY + "\n")
    key_file.chmod(0o600)
    (tmp_path / "open key").write_text(API_KEY + "\n")
    (tmp_path / "open key").chmod(0o644)
    shutil.copyfile(certifi.where(), tmp_path / "ca bundle ü.pem")
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    (tmp_path / "a file").write_text("a file, not a folder\n")
    (tmp_path / "a dir").mkdir()
    return Places(tmp_path, root, url)


# --------------------------------------------------------------------------------------------
# Fixtures and probes


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No NUCLEUS_* variable from the outside; logging put back after the in-process CLI."""
    for name in list(os.environ):
        if name.startswith("NUCLEUS"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NUCLEUS_API_KEY", API_KEY)
    try:
        yield
    finally:
        reset_logging()


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    assert API_KEY not in out + err
    assert "Traceback" not in out + err, out + err
    return code, out, err


def row_id(row: Row) -> str:
    return f"{row.key}={row.value[:40]}"


def check_scan(
    server: DevServer, settings: Settings, expected: Scans, capsys: pytest.CaptureFixture[str]
) -> None:
    # What `nucleus-watcher scan` does after loading the config (check has set up logging), with
    # the summary written where this test can read it.
    api_key = resolve_api_key(settings.nucleus)
    summary = io.StringIO()
    code = run_scan(settings, api_key, out=summary)
    out, err = capsys.readouterr()
    assert code == expected.exit_code, summary.getvalue() + err
    assert set(server.items(expected.dataset)) == expected.uploaded, summary.getvalue() + err
    assert API_KEY not in summary.getvalue() + out + err


def check_listens(settings: Settings) -> None:
    address = settings.metrics.listen_address
    if address is None:
        assert settings.metrics.listen == ""
        return
    host, port = address
    metrics = Metrics()
    metrics.start_http_server(host, port)
    try:
        assert metrics.port
        ask = "[::1]" if ":" in host else "127.0.0.1"
        answer = requests.get(f"http://{ask}:{metrics.port}/metrics", timeout=10)
        assert answer.status_code == 200
    finally:
        metrics.stop()


def check_disk(settings: Settings) -> None:
    store = pipeline.open_store(settings)
    try:
        guard = FreeSpaceGuard(
            store,
            [(str(watch.path), watch.path) for watch in settings.watch],
            settings.disk.min_free_bytes,
            settings.disk.delete_uploaded_when_low,
        )
        assert guard.check() == 0  # nothing was confirmed, so nothing may be deleted
    finally:
        store.close()


# --------------------------------------------------------------------------------------------
# The table


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_each_value_is_refused_in_one_line_or_works(
    row: Row, tmp_path: Path, clean_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    server = DevServer(data_dir=tmp_path / "devserver", api_key=API_KEY).start()
    try:
        places = make_places(tmp_path, server.base_url)
        config = places.write({**row.also, row.key: row.value})

        code, out, err = run_cli(capsys, "check", "-c", str(config))

        if isinstance(row.outcome, Refused):
            key = row.outcome.key or row.key
            assert code == 2, out + err
            [line] = err.splitlines()
            assert line.startswith(f"config.toml: at '{key}'"), line
            if row.outcome.not_in_line:
                assert row.outcome.not_in_line not in line
            return
        assert code == 0, out + err
        assert out.startswith("config ok: 1 watch(es)"), out
        settings = load_settings(config, environ={})
        if isinstance(row.outcome, Scans):
            check_scan(server, settings, row.outcome, capsys)
        elif isinstance(row.outcome, BuildsClient):
            pipeline.nucleus_client(settings, API_KEY).close()
        elif isinstance(row.outcome, Listens):
            check_listens(settings)
        elif isinstance(row.outcome, GuardsDisk):
            check_disk(settings)
    finally:
        server.stop()


# The config's own map of sections to models, keyed as this table's rows name them.
_ROW_PREFIX = {"watch": "watch[0]", "rules": "watch[0].rules[0]"}
_MODELS: dict[str, type[BaseModel]] = {
    _ROW_PREFIX.get(container, container): model for container, model in MODEL_BY_CONTAINER.items()
}


def test_the_table_covers_every_key_with_a_refusal_and_a_working_value() -> None:
    keys = {"device_id"} | {
        f"{prefix}.{name}" for prefix, model in _MODELS.items() for name in model.model_fields
    }
    accepted = {row.key for row in ROWS if not isinstance(row.outcome, Refused)}
    refused = {row.key for row in ROWS if isinstance(row.outcome, Refused)}
    assert keys - {"watch[0].rules"} <= accepted, sorted(keys - accepted)
    assert keys <= refused, sorted(keys - refused)
    assert {row.key for row in ROWS} <= keys


# --------------------------------------------------------------------------------------------
# Keys only the daemon uses


def _daemon_groups() -> list[dict[str, str | None]]:
    """The InDaemon rows packed into as few configs as possible, one value per key in each."""
    groups: list[dict[str, str | None]] = []
    for row in ROWS:
        if not isinstance(row.outcome, InDaemon):
            continue
        overrides = {**row.also, row.key: row.value}
        home = next((g for g in groups if not set(g) & set(overrides)), None)
        if home is None:
            groups.append(overrides)
        else:
            home.update(overrides)
    return groups


@pytest.mark.parametrize("overrides", _daemon_groups(), ids=lambda g: ",".join(sorted(g)))
def test_daemon_runs_with_the_accepted_values_of_daemon_only_keys(
    overrides: dict[str, str | None], tmp_path: Path
) -> None:
    server = DevServer(data_dir=tmp_path / "devserver", api_key=API_KEY).start()
    daemon = DaemonProcess(make_places(tmp_path, server.base_url).write(overrides), tmp_path)
    try:
        daemon.start()
        fresh = tmp_path / "cam ü" / "fresh" / "new.jpg"
        fresh.parent.mkdir()
        write_jpeg(fresh, seed=99)
        assert wait_until(lambda: "fresh/new.jpg" in server.items(DATASET), 30), daemon.log_text()
        assert daemon.stop() == 0, daemon.log_text()
        assert "Traceback" not in daemon.log_text()
    finally:
        if daemon.process is not None:
            daemon.kill()
        server.stop()
