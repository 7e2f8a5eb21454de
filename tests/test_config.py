"""Settings: the example file, one-line errors, environment overrides, API key lookup."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import get_args

import certifi
import pydantic
import pytest

from watcher.config import (
    LogFormat,
    LogLevel,
    NucleusSettings,
    Settings,
    check_files,
    load_settings,
    parse_bandwidth_limit,
    parse_endpoint,
    parse_listen_address,
    resolve_api_key,
)
from watcher.errors import ConfigError
from watcher.nucleus import NucleusClient
from watcher.pipeline import wiring as pipeline

EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "config.example.toml"
MINIMAL_WATCH = '[[watch]]\npath = "/srv/camera"\ndataset_id = "ds_a"\n'
SECRET_KEY = "live_9f8e7d6c5b4a3210secret"


def write_config(tmp_path: Path, text: str) -> Path:
    config_file = tmp_path / "config.toml"
    config_file.write_text(text, encoding="utf-8")
    return config_file


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Settings:
    return load_settings(write_config(tmp_path, text), environ=environ or {})


def problems_of(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, environ)
    return caught.value.problems


# ---------------------------------------------------------------------------------------------
# The example file


def test_example_file_loads_as_is() -> None:
    settings = load_settings(EXAMPLE_CONFIG, environ={})

    assert settings.nucleus.endpoint == "https://api.scale.com/v1/nucleus"
    assert settings.nucleus.api_key_file == ""
    assert settings.upload.concurrency == 4
    assert settings.upload.bandwidth_limit_bytes_per_second is None
    assert settings.metrics.listen_address == ("127.0.0.1", 9464)
    assert settings.state.path == Path("/var/lib/nucleus-watcher/state.db")
    assert settings.watch[0].path == Path("/srv/camera")
    result = settings.rule_sets[0].classify("Foggy/2024-05-01/frame_12.jpg", mtime_ns=0)
    assert result.reference_id == "Foggy/2024-05-01/frame_12.jpg"
    assert result.metadata == {
        "camera": "back",
        "weather": "Foggy",
        "Recording Date": "2024-05-01",
        "frame": 12,
    }


def test_example_file_shows_every_key_of_every_section() -> None:
    text = EXAMPLE_CONFIG.read_text()
    settings = load_settings(EXAMPLE_CONFIG, environ={})
    sections = ["nucleus", "upload", "settle", "scan", "state", "log", "metrics", "disk"]

    for section in sections:
        for key in type(getattr(settings, section)).model_fields:
            assert f"\n{key} = " in text.split(f"[{section}]", 1)[1], f"{section}.{key}"
    for key in type(settings.watch[0]).model_fields:
        assert f"\n{key} = " in text or f"\n  {key} = " in text or key == "rules", key


def test_settings_are_frozen() -> None:
    settings = load_settings(EXAMPLE_CONFIG, environ={})

    with pytest.raises(pydantic.ValidationError):
        settings.upload.concurrency = 9  # type: ignore[misc]


def test_device_defaults_to_hostname_and_device_id_wins(tmp_path: Path) -> None:
    assert load(tmp_path, MINIMAL_WATCH).device == os.uname().nodename
    assert load(tmp_path, 'device_id = "rig-3"\n' + MINIMAL_WATCH).device == "rig-3"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        '[state]\npath = "state/db.sqlite"\n[nucleus]\napi_key_file = "key.txt"\n' + MINIMAL_WATCH,
    )

    assert settings.state.path == tmp_path / "state/db.sqlite"
    assert settings.nucleus.api_key_file == str(tmp_path / "key.txt")


# ---------------------------------------------------------------------------------------------
# One line per problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "[upload]\nconcurency = 3\n" + MINIMAL_WATCH,
            ["config.toml: at 'upload.concurency': unknown key (did you mean 'concurrency'?)"],
            id="misspelt-key",
        ),
        pytest.param(
            "[uplod]\nconcurrency = 3\n" + MINIMAL_WATCH,
            ["config.toml: at 'uplod': unknown key (did you mean 'upload'?)"],
            id="misspelt-section",
        ),
        pytest.param(
            "[upload]\nconcurrency = 0\nmax_files_per_request = 11\n" + MINIMAL_WATCH,
            [
                "config.toml: at 'upload.concurrency': must be at least 1 (got 0)",
                "config.toml: at 'upload.max_files_per_request': must be at most 10 (got 11)",
            ],
            id="out-of-range",
        ),
        pytest.param(
            "[upload]\nconcurrency = true\n" + MINIMAL_WATCH,
            ["config.toml: at 'upload.concurrency': must be a number, not true/false"],
            id="bool-for-number",
        ),
        pytest.param(
            "[nucleus]\ntimeout_seconds = 0\n" + MINIMAL_WATCH,
            ["config.toml: at 'nucleus.timeout_seconds': must be more than 0 (got 0)"],
            id="zero-timeout",
        ),
        pytest.param(
            "[nucleus]\ntimeout_seconds = inf\njob_poll_seconds = 1e300\n"
            "[scan]\ninterval_seconds = 604801\n" + MINIMAL_WATCH,
            [
                "config.toml: at 'nucleus.timeout_seconds': must be at most 604800 (got inf)",
                "config.toml: at 'nucleus.job_poll_seconds': must be at most 604800 (got 1e+300)",
                "config.toml: at 'scan.interval_seconds': must be at most 604800 (got 604801)",
            ],
            id="seconds-beyond-a-week",
        ),
        pytest.param(
            '[upload]\nconcurrency = 1000\nbandwidth_limit = "1e400"\n' + MINIMAL_WATCH,
            [
                "config.toml: at 'upload.concurrency': must be at most 64 (got 1000)",
                "config.toml: at 'upload.bandwidth_limit': cannot read '1e400' as a rate; write "
                'e.g. "2MiB/s", "500KB/s", "800kbit/s", or leave it empty for no limit',
            ],
            id="concurrency-and-rate-limits",
        ),
        pytest.param(
            '[upload]\nbandwidth_limit = "1' + "0" * 400 + 'B/s"\n' + MINIMAL_WATCH,
            [
                "config.toml: at 'upload.bandwidth_limit': '1" + "0" * 400 + "B/s' is more than "
                "1 TB/s; leave it empty for no limit"
            ],
            id="rate-overflow",
        ),
        pytest.param(
            '[[watch]]\npath = "/srv/a\\u0000b"\ndataset_id = "ds_\u00fc?#"\n'
            "metadata = { gain = inf, bias = -nan }\n",
            [
                "config.toml: at 'watch[0].path': must not contain a NUL character (\\u0000)",
                "config.toml: at 'watch[0].dataset_id': 'ds_\u00fc?#' is not a dataset id: "
                "letters, digits, '_', '-' and '.' only; it looks like \"ds_...\"",
                "config.toml: at 'watch[0].metadata.gain': must be a finite number (got inf)",
                "config.toml: at 'watch[0].metadata.bias': must be a finite number (got nan)",
            ],
            id="nul-dataset-id-non-finite",
        ),
        pytest.param(
            f'device_id = "{"d" * 254}"\n' + MINIMAL_WATCH,
            ["config.toml: at 'device_id': must be at most 253 characters (got 254)"],
            id="long-device-id",
        ),
        pytest.param(
            "[upload]\nretry_initial_seconds = 600\nretry_max_seconds = 300\n" + MINIMAL_WATCH,
            [
                "config.toml: at 'upload.retry_initial_seconds': must not be more than "
                "retry_max_seconds (600 > 300)"
            ],
            id="retry-order",
        ),
        pytest.param(
            '[upload]\nafter_upload = "archive"\non_conflict = "replace"\n' + MINIMAL_WATCH,
            [
                "config.toml: at 'upload.after_upload': must be 'keep', 'delete' or 'move' "
                "(got 'archive')",
                "config.toml: at 'upload.on_conflict': must be 'skip' or 'update' (got 'replace')",
            ],
            id="enums",
        ),
        pytest.param(
            '[upload]\nafter_upload = "move"\n' + MINIMAL_WATCH,
            ["config.toml: at 'upload.archive_dir': is required when after_upload = \"move\""],
            id="move-without-archive",
        ),
        pytest.param(
            '[upload]\nafter_upload = "move"\narchive_dir = "/srv/camera/done"\n' + MINIMAL_WATCH,
            [
                "config.toml: at 'upload.archive_dir': is inside watch[0] (/srv/camera); moved "
                "files would be found again"
            ],
            id="archive-inside-watch",
        ),
        pytest.param(
            '[upload]\nbandwidth_limit = "fast"\n' + MINIMAL_WATCH,
            [
                "config.toml: at 'upload.bandwidth_limit': cannot read 'fast' as a rate; write "
                'e.g. "2MiB/s", "500KB/s", "800kbit/s", or leave it empty for no limit'
            ],
            id="bandwidth",
        ),
        pytest.param(
            '[log]\nformat = "xml"\nlevel = "loud"\n' + MINIMAL_WATCH,
            [
                "config.toml: at 'log.format': must be 'auto', 'json' or 'console' (got 'xml')",
                "config.toml: at 'log.level': must be 'debug', 'info', 'warning', 'error' or "
                "'critical' (got 'loud')",
            ],
            id="log",
        ),
        pytest.param(
            '[metrics]\nlisten = "9464"\n' + MINIMAL_WATCH,
            [
                "config.toml: at 'metrics.listen': must be host:port like \"127.0.0.1:9464\" "
                "(use 0.0.0.0 for every interface), or empty to turn metrics off (got '9464')"
            ],
            id="metrics-listen",
        ),
        pytest.param(
            '[nucleus]\nendpoint = "api.scale.com"\n' + MINIMAL_WATCH,
            [
                "config.toml: at 'nucleus.endpoint': must be an http:// or https:// URL "
                "(got 'api.scale.com')"
            ],
            id="endpoint",
        ),
        pytest.param(
            "[settle]\nseconds = 5\nmax_wait_seconds = 1\n" + MINIMAL_WATCH,
            ["config.toml: at 'settle.max_wait_seconds': must be at least settle.seconds (1 < 5)"],
            id="settle-order",
        ),
        pytest.param(
            "[upload]\nconcurrency = 2\n",
            ["config.toml: at 'watch': at least one [[watch]] is required"],
            id="no-watch",
        ),
        pytest.param(
            '[watch]\npath = "/srv/camera"\ndataset_id = "ds_a"\n',
            ["config.toml: at 'watch': must be an array of tables: write [[watch]], not [watch]"],
            id="watch-as-table",
        ),
        pytest.param(
            '[[watch]]\npath = "camera"\ndataset_id = ""\ninclude = "*.jpg"\n',
            [
                "config.toml: at 'watch[0].path': must be an absolute path (got 'camera')",
                "config.toml: at 'watch[0].dataset_id': must not be empty; "
                'it looks like "ds_..."',
                "config.toml: at 'watch[0].include': must be a list of strings like [\"*.jpg\"] "
                "(got '*.jpg')",
            ],
            id="watch-fields",
        ),
        pytest.param(
            MINIMAL_WATCH + '[watch.rules]\nmatch = "a/**"\n',
            [
                "config.toml: at 'watch[0].rules': must be an array of tables: write "
                "[[watch.rules]], not [watch.rules]"
            ],
            id="rules-as-table",
        ),
        pytest.param(
            '[[watch]]\npath = "/srv/camera"\n',
            ["config.toml: at 'watch[0].dataset_id': is required"],
            id="missing-dataset",
        ),
        pytest.param(
            MINIMAL_WATCH + '[[watch.rules]]\nmatch = "a/**"\nregex = "a"\n'
            '[[watch.rules]]\nmetadata = { a = "b" }\n',
            [
                "config.toml: at 'watch[0].rules[0]': has both match and regex; give exactly one",
                "config.toml: at 'watch[0].rules[1]': needs match (a glob) or regex",
            ],
            id="rule-selector",
        ),
        pytest.param(
            MINIMAL_WATCH + "[[watch.rules]]\nregex = '(?P<frame>\\d+'\n",
            [
                "config.toml: at 'watch[0].rules[0].regex': is not a valid regular expression: "
                "missing ), unterminated subpattern at position 0"
            ],
            id="bad-regex",
        ),
        pytest.param(
            MINIMAL_WATCH + "metadata = { size = { w = 1 } }\n",
            ["config.toml: at 'watch[0].metadata.size': must be text, a number or true/false"],
            id="nested-metadata",
        ),
        pytest.param(
            MINIMAL_WATCH + 'include = ["raw/", "*.jpg"]\nexclude = ["../x"]\n',
            [
                "config.toml: at 'watch[0].include': 'raw/' ends with '/'; globs match files: "
                "write 'raw/**' for everything below raw/, or a name like 'raw' for any folder "
                "so named",
                "config.toml: at 'watch[0].exclude': '../x' uses '.' or '..'; paths are matched "
                "below the watch folder as they are",
            ],
            id="path-globs",
        ),
        pytest.param(
            MINIMAL_WATCH + 'recursive = false\ninclude = ["*.png", "raw/*.jpg"]\n',
            [
                "config.toml: at 'watch[0].include': 'raw/*.jpg' matches only files in "
                "sub-folders, but recursive = false watches only the files directly in /srv/camera"
            ],
            id="path-glob-without-recursion",
        ),
        pytest.param(
            f'[nucleus]\napi_key = "{SECRET_KEY}"\n' + MINIMAL_WATCH,
            [
                "config.toml: at 'nucleus.api_key': unknown key; the API key never goes in the "
                "config: name a file in nucleus.api_key_file or set NUCLEUS_API_KEY"
            ],
            id="api-key-in-file",
        ),
    ],
)
def test_bad_config_gives_one_line_per_problem(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    assert problems_of(tmp_path, text) == expected


@pytest.mark.parametrize(
    ("format_text", "level_text", "format_name", "level_name"),
    [
        ("JSON", "WARN", "json", "warning"),
        (" console ", " Debug ", "console", "debug"),
        ("auto", "critical", "auto", "critical"),
    ],
)
def test_log_names_are_read_once_into_the_names_logging_takes(
    tmp_path: Path, format_text: str, level_text: str, format_name: str, level_name: str
) -> None:
    text = f'[log]\nformat = "{format_text}"\nlevel = "{level_text}"\n' + MINIMAL_WATCH
    settings = load(tmp_path, text)

    assert (settings.log.format, settings.log.level) == (format_name, level_name)
    assert get_args(LogFormat) == ("auto", "json", "console")
    assert settings.log.level in get_args(LogLevel)


def _watches(*watches: tuple[str, str, bool]) -> str:
    return "".join(
        f'[[watch]]\npath = "{path}"\ndataset_id = "{dataset}"\n'
        f"recursive = {'true' if recursive else 'false'}\n"
        for path, dataset, recursive in watches
    )


TWICE = "each file would be sent twice"


@pytest.mark.parametrize(
    ("watches", "expected"),
    [
        pytest.param(
            [("/srv/cam", "ds_x", True), ("/srv/cam/a", "ds_x", True)],
            [
                "config.toml: at 'watch[1].path': /srv/cam/a is inside watch[0] (/srv/cam), "
                f"which feeds the same dataset ds_x; {TWICE}"
            ],
            id="inner-after-outer",
        ),
        pytest.param(
            [("/srv/cam/a/b", "ds_x", False), ("/srv/cam", "ds_x", True)],
            [
                "config.toml: at 'watch[1].path': /srv/cam holds watch[0] (/srv/cam/a/b), "
                f"which feeds the same dataset ds_x; {TWICE}"
            ],
            id="outer-after-inner",
        ),
        pytest.param(
            [("/srv/cam", "ds_x", False), ("/srv/cam/", "ds_x", True)],
            [
                "config.toml: at 'watch[1].path': /srv/cam is also the folder of watch[0] "
                f"(/srv/cam), which feeds the same dataset ds_x; {TWICE}"
            ],
            id="same-folder",
        ),
        pytest.param(
            [("/srv/cam", "ds_x", True), ("/srv/x/../cam/a", "ds_x", True)],
            [
                "config.toml: at 'watch[1].path': /srv/x/../cam/a is inside watch[0] (/srv/cam), "
                f"which feeds the same dataset ds_x; {TWICE}"
            ],
            id="dot-dot",
        ),
        pytest.param(
            [("/srv/cam", "ds_x", True), ("/srv/cam/a", "ds_x", True), ("/srv/cam", "ds_x", True)],
            [
                "config.toml: at 'watch[1].path': /srv/cam/a is inside watch[0] (/srv/cam), "
                f"which feeds the same dataset ds_x; {TWICE}",
                "config.toml: at 'watch[2].path': /srv/cam is also the folder of watch[0] "
                f"(/srv/cam), which feeds the same dataset ds_x; {TWICE}",
                "config.toml: at 'watch[2].path': /srv/cam holds watch[1] (/srv/cam/a), "
                f"which feeds the same dataset ds_x; {TWICE}",
            ],
            id="three",
        ),
    ],
)
def test_watches_that_see_the_same_file_for_the_same_dataset_are_refused(
    tmp_path: Path, watches: list[tuple[str, str, bool]], expected: list[str]
) -> None:
    assert problems_of(tmp_path, _watches(*watches)) == expected


@pytest.mark.parametrize(
    "watches",
    [
        pytest.param([("/srv/cam", "ds_x", True), ("/srv/cam", "ds_y", True)], id="same-folder"),
        pytest.param([("/srv/cam", "ds_x", True), ("/srv/cam/a", "ds_y", True)], id="nested"),
        pytest.param(
            [("/srv/cam", "ds_x", False), ("/srv/cam/a", "ds_x", True)], id="outer-not-recursive"
        ),
        pytest.param([("/srv/cam", "ds_x", True), ("/srv/camera", "ds_x", True)], id="prefix"),
    ],
)
def test_watches_that_share_no_file_or_feed_other_datasets_are_accepted(
    tmp_path: Path, watches: list[tuple[str, str, bool]]
) -> None:
    assert len(load(tmp_path, _watches(*watches)).watch) == len(watches)


def test_include_globs_with_a_slash_reach_the_watch_plan(tmp_path: Path) -> None:
    settings = load(tmp_path, MINIMAL_WATCH + 'include = ["raw/*.jpg", "*.png"]\n')

    [plan] = pipeline.watch_plans(settings)

    assert plan.path_filter.accepts("raw/a.jpg")
    assert plan.path_filter.accepts("deep/b.png")
    assert not plan.path_filter.accepts("a.jpg")
    assert not plan.path_filter.accepts("raw/deep/a.jpg")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path / "config.toml", environ={})

    assert caught.value.problems == ["config.toml: cannot read: No such file or directory"]


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "[upload]\nconcurrency = = 3\n") == [
        "config.toml: invalid TOML: Invalid value (at line 2, column 15)"
    ]


# ---------------------------------------------------------------------------------------------
# Environment


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        "[upload]\nconcurrency = 2\n[scan]\npolling = false\n" + MINIMAL_WATCH,
        {
            "NUCLEUS_WATCHER_UPLOAD__CONCURRENCY": "8",
            "NUCLEUS_WATCHER_SCAN__POLLING": "true",
            "NUCLEUS_WATCHER_SETTLE__SECONDS": "0.5",
            "NUCLEUS_WATCHER_WATCH__0__DATASET_ID": "ds_from_env",
            "NUCLEUS_WATCHER_DEVICE_ID": "rig-9",
            "NUCLEUS_WATCHER_CONFIG": "/etc/ignored-single-names.toml",
        },
    )

    assert settings.upload.concurrency == 8
    assert settings.scan.polling is True
    assert settings.settle.seconds == 0.5
    assert settings.watch[0].dataset_id == "ds_from_env"
    assert settings.device == "rig-9"


def test_nucleus_endpoint_variable_and_its_precedence(tmp_path: Path) -> None:
    text = '[nucleus]\nendpoint = "https://file.example/v1/nucleus"\n' + MINIMAL_WATCH

    official = load(tmp_path, text, {"NUCLEUS_ENDPOINT": "http://127.0.0.1:8080/v1/nucleus/"})
    both = load(
        tmp_path,
        text,
        {
            "NUCLEUS_ENDPOINT": "http://127.0.0.1:8080/v1/nucleus",
            "NUCLEUS_WATCHER_NUCLEUS__ENDPOINT": "http://127.0.0.1:9090/v1/nucleus",
        },
    )

    assert official.nucleus.endpoint == "http://127.0.0.1:8080/v1/nucleus"
    assert both.nucleus.endpoint == "http://127.0.0.1:9090/v1/nucleus"
    assert load(tmp_path, text).nucleus.endpoint == "https://file.example/v1/nucleus"


def test_bad_environment_values_name_key_and_variable(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        MINIMAL_WATCH,
        {
            "NUCLEUS_WATCHER_UPLOAD__CONCURRENCY": "many",
            "NUCLEUS_WATCHER_UPLOAD__SPEED": "1",
            "NUCLEUS_WATCHER_UPLAOD__CONCURRENCY": "1",
            "NUCLEUS_WATCHER_WATCH__4__PATH": "/srv/other",
            "NUCLEUS_ENDPOINT": "ftp://example",
        },
    )

    assert problems == [
        "config.toml: at 'uplaod.concurrency': NUCLEUS_WATCHER_UPLAOD__CONCURRENCY names no "
        "setting; use NUCLEUS_WATCHER_<SECTION>__<KEY> or NUCLEUS_WATCHER_WATCH__<index>__<KEY>",
        "config.toml: at 'watch[4]': is not in the file, so NUCLEUS_WATCHER_WATCH__4__PATH has "
        "nothing to set",
        "config.toml: at 'nucleus.endpoint': must be an http:// or https:// URL "
        "(got 'ftp://example') (set by NUCLEUS_ENDPOINT)",
        "config.toml: at 'upload.concurrency': must be a whole number (got 'many') "
        "(set by NUCLEUS_WATCHER_UPLOAD__CONCURRENCY)",
        "config.toml: at 'upload.speed': unknown key (set by NUCLEUS_WATCHER_UPLOAD__SPEED)",
    ]


def test_the_environment_reaches_the_second_watch_by_its_index(tmp_path: Path) -> None:
    text = (
        MINIMAL_WATCH
        + '[[watch]]\npath = "/srv/b"\ndataset_id = "ds_b"\nreference_id = "b/{relpath}"\n'
    )

    settings = load(tmp_path, text, {"NUCLEUS_WATCHER_WATCH__1__DATASET_ID": "ds_from_env"})

    assert [watch.dataset_id for watch in settings.watch] == ["ds_a", "ds_from_env"]
    assert settings.watch[1].path == Path("/srv/b")
    assert settings.watch[1].reference_id == "b/{relpath}"
    assert settings.rule_sets[1].classify("x.jpg", mtime_ns=0).reference_id == "b/x.jpg"


def test_a_bad_value_for_the_second_watch_names_its_variable(tmp_path: Path) -> None:
    text = MINIMAL_WATCH + '[[watch]]\npath = "/srv/b"\ndataset_id = "ds_b"\n'

    problems = problems_of(tmp_path, text, {"NUCLEUS_WATCHER_WATCH__1__RECURSIVE": "maybe"})

    assert problems == [
        "config.toml: at 'watch[1].recursive': must be true or false (got 'maybe') "
        "(set by NUCLEUS_WATCHER_WATCH__1__RECURSIVE)"
    ]


def test_a_relative_path_from_the_environment_is_relative_to_the_config_file(
    tmp_path: Path,
) -> None:
    settings = load(tmp_path, MINIMAL_WATCH, {"NUCLEUS_WATCHER_STATE__PATH": "state/db.sqlite"})

    assert settings.state.path == tmp_path / "state/db.sqlite"


def test_a_variable_cannot_set_a_key_in_a_section_that_is_not_a_table(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path, "nucleus = 5\n" + MINIMAL_WATCH, {"NUCLEUS_ENDPOINT": "http://127.0.0.1:1/v1"}
    )

    assert problems == [
        "config.toml: at 'nucleus': is not a table, so NUCLEUS_ENDPOINT cannot set a key in it",
        "config.toml: at 'nucleus': must be a table (got 5)",
    ]


def test_only_the_documented_variable_names_are_read(tmp_path: Path) -> None:
    # Names pydantic-settings' own sources would take (field names, any case, JSON sections).
    settings = load(
        tmp_path,
        MINIMAL_WATCH,
        {
            "DEVICE_ID": "rig-1",
            "device_id": "rig-2",
            "upload": '{"concurrency": 9}',
            "nucleus_watcher_upload__concurrency": "9",
            "NUCLEUS_WATCHER_DEVICE_ID": "rig-3",
        },
    )

    assert settings.device == "rig-3"
    assert settings.upload.concurrency == 4


def test_the_given_mapping_is_read_instead_of_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NUCLEUS_WATCHER_UPLOAD__CONCURRENCY", "9")
    config_file = write_config(tmp_path, MINIMAL_WATCH)

    assert load_settings(config_file, environ={}).upload.concurrency == 4
    assert load_settings(config_file).upload.concurrency == 9


def test_settings_built_directly_read_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUCLEUS_WATCHER_UPLOAD__CONCURRENCY", "9")
    monkeypatch.setenv("UPLOAD", '{"concurrency": 9}')

    settings = Settings(watch=[{"path": "/srv/camera", "dataset_id": "ds_a"}])

    assert settings.upload.concurrency == 4


def test_a_long_bad_value_is_clipped_in_its_message(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, f'[upload]\nconcurrency = "{"x" * 100}"\n' + MINIMAL_WATCH)

    assert problems == [
        f"config.toml: at 'upload.concurrency': must be a whole number (got '{'x' * 55}...')"
    ]


# ---------------------------------------------------------------------------------------------
# API key


def write_key(path: Path, mode: int, text: str = SECRET_KEY + "\n") -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_api_key_file_comes_first(tmp_path: Path) -> None:
    key_file = write_key(tmp_path / "key", 0o600)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    write_key(credentials / "nucleus_api_key", 0o400, "from-credential")
    environ = {"NUCLEUS_API_KEY": "from-env", "CREDENTIALS_DIRECTORY": str(credentials)}

    assert resolve_api_key(NucleusSettings(api_key_file=str(key_file)), environ) == SECRET_KEY
    assert resolve_api_key(NucleusSettings(), environ) == "from-env"
    del environ["NUCLEUS_API_KEY"]
    assert resolve_api_key(NucleusSettings(), environ) == "from-credential"


def test_group_or_world_readable_key_file_is_refused_without_showing_the_key(
    tmp_path: Path,
) -> None:
    key_file = write_key(tmp_path / "key", 0o644)

    with pytest.raises(ConfigError) as caught:
        resolve_api_key(NucleusSettings(api_key_file=str(key_file)), {"NUCLEUS_API_KEY": "other"})

    assert caught.value.problems == [
        f"API key file {key_file} is open to other users (mode 0644); run: chmod 600 {key_file}"
    ]
    assert SECRET_KEY not in str(caught.value)


@pytest.mark.parametrize(
    ("content", "expected_end"),
    [
        ("  \n", "is empty"),
        (f"{SECRET_KEY} extra\n", ": the key contains spaces or control characters"),
    ],
)
def test_unusable_key_file_contents(tmp_path: Path, content: str, expected_end: str) -> None:
    key_file = write_key(tmp_path / "key", 0o600, content)

    with pytest.raises(ConfigError) as caught:
        resolve_api_key(NucleusSettings(api_key_file=str(key_file)), {})

    assert str(caught.value).startswith(f"API key file {key_file}")
    assert str(caught.value).endswith(expected_end)
    assert SECRET_KEY not in str(caught.value)


def test_missing_key_file_and_no_key_anywhere(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        resolve_api_key(NucleusSettings(api_key_file=str(tmp_path / "absent")), {})
    with pytest.raises(ConfigError) as nowhere:
        resolve_api_key(NucleusSettings(), {"CREDENTIALS_DIRECTORY": str(tmp_path)})

    assert missing.value.problems == [
        f"API key file {tmp_path / 'absent'}: cannot read: No such file or directory"
    ]
    assert nowhere.value.problems == [
        "no Nucleus API key: set nucleus.api_key_file or NUCLEUS_API_KEY, or give the systemd "
        "credential 'nucleus_api_key' (LoadCredential=)"
    ]


# ---------------------------------------------------------------------------------------------
# What only the file system can tell (check, run and scan ask)


def _places(tmp_path: Path) -> None:
    (tmp_path / "a file").write_text("not a folder\n")
    (tmp_path / "a dir").mkdir()
    write_key(tmp_path / "open key", 0o644)
    (tmp_path / "not a cert.pem").write_text("hello\n")


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("nucleus", "api_key_file", "missing key", "{tmp}/missing key: no such file"),
        ("nucleus", "api_key_file", "a dir", "{tmp}/a dir is not a regular file"),
        (
            "nucleus",
            "api_key_file",
            "open key",
            "{tmp}/open key is open to other users (mode 0644); run: chmod 600 {tmp}/open key",
        ),
        (
            "nucleus",
            "ca_bundle",
            "none.pem",
            "cannot read {tmp}/none.pem: No such file or directory",
        ),
        ("nucleus", "ca_bundle", "a dir", "cannot read {tmp}/a dir: Is a directory"),
        ("nucleus", "ca_bundle", "not a cert.pem", "{tmp}/not a cert.pem holds no PEM certificate"),
        (
            "state",
            "path",
            "a dir",
            "{tmp}/a dir is a folder; name a file in it, like {tmp}/a dir/state.db",
        ),
        ("state", "path", "a file/x/state.db", "cannot be created: {tmp}/a file is not a folder"),
        ("upload", "archive_dir", "a file", "{tmp}/a file is not a folder"),
        ("upload", "archive_dir", "a file/done", "cannot be created: {tmp}/a file is not a folder"),
    ],
)
def test_paths_the_file_system_refuses_give_one_line(
    tmp_path: Path, section: str, key: str, value: str, message: str
) -> None:
    _places(tmp_path)
    extra = 'after_upload = "move"\n' if key == "archive_dir" else ""
    settings = load(tmp_path, f'[{section}]\n{key} = "{value}"\n{extra}' + MINIMAL_WATCH)

    with pytest.raises(ConfigError) as caught:
        check_files(settings, "config.toml")

    expected = message.replace("{tmp}", str(tmp_path))
    assert caught.value.problems == [f"config.toml: at '{section}.{key}': {expected}"]


def test_a_watch_path_that_is_a_file_is_refused_and_a_missing_one_is_not(tmp_path: Path) -> None:
    _places(tmp_path)
    text = (
        f'[state]\npath = "{tmp_path}/state.db"\n'
        f'[[watch]]\npath = "{tmp_path}/a file"\ndataset_id = "ds_a"\n'
        f'[[watch]]\npath = "{tmp_path}/not yet"\ndataset_id = "ds_b"\n'
    )

    with pytest.raises(ConfigError) as caught:
        check_files(load(tmp_path, text), "config.toml")

    assert caught.value.problems == [
        f"config.toml: at 'watch[0].path': {tmp_path}/a file is not a folder"
    ]


def test_usable_paths_pass_the_file_checks(tmp_path: Path) -> None:
    (tmp_path / "key dir").mkdir()
    key_file = write_key(tmp_path / "key dir/api key", 0o600)
    text = (
        f'[nucleus]\napi_key_file = "{key_file}"\nca_bundle = "{certifi.where()}"\n'
        '[state]\npath = "new/folders/state.db"\n'
        '[upload]\nafter_upload = "move"\narchive_dir = "archive/later"\n' + MINIMAL_WATCH
    )

    check_files(load(tmp_path, text), "config.toml")


# ---------------------------------------------------------------------------------------------
# Value parsers


@pytest.mark.parametrize(
    ("text", "url", "host"),
    [
        ("https://api.scale.com/v1/nucleus/", "https://api.scale.com/v1/nucleus", "api.scale.com"),
        (
            " HTTP://127.0.0.1:8080/v1/nucleus ",
            "http://127.0.0.1:8080/v1/nucleus",
            "127.0.0.1:8080",
        ),
        ("https://[::1]:1/v1", "https://[::1]:1/v1", "[::1]:1"),
    ],
)
def test_endpoint_parsing(text: str, url: str, host: str) -> None:
    assert parse_endpoint(text) == (url, host)
    assert NucleusSettings(endpoint=text).endpoint == url


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http://user:s3cret@127.0.0.1/v1", "must not contain credentials (user:password@)"),
        ("https://:s3cret@api.example/v1", "must not contain credentials (user:password@)"),
        ("http://127.0.0.1:99999/v1", "is not a valid URL: Port out of range 0-65535"),
        ("http://[::1/v1", "is not a valid URL: Invalid IPv6 URL"),
        ("http:///v1/nucleus", "must be an http:// or https:// URL"),
        ("http://exa mple.com/v1", "must not contain spaces or control characters"),
        ("http://127.0.0.1/v1?key=1", "must not have a query (?...) or a fragment (#...)"),
        ("http://127.0.0.1/v1#top", "must not have a query (?...) or a fragment (#...)"),
    ],
)
def test_endpoint_refusals_are_the_same_in_config_and_client(text: str, message: str) -> None:
    with pytest.raises(ValueError) as parsed:
        parse_endpoint(text)
    with pytest.raises(ConfigError) as built:
        NucleusClient(text, "key")

    assert str(parsed.value).startswith(message)
    assert built.value.problems == [f"nucleus.endpoint: {parsed.value}"]
    assert "s3cret" not in str(parsed.value)


def test_endpoint_with_credentials_is_refused_at_load_without_showing_them(
    tmp_path: Path,
) -> None:
    text = '[nucleus]\nendpoint = "https://me:s3cret@api.example/v1"\n' + MINIMAL_WATCH

    assert problems_of(tmp_path, text) == [
        "config.toml: at 'nucleus.endpoint': must not contain credentials (user:password@); "
        "the API key is sent apart"
    ]


@pytest.mark.parametrize(
    ("text", "bytes_per_second"),
    [
        ("", None),
        ("2MiB/s", 2 * 1024 * 1024),
        ("500KB/s", 500_000),
        ("1.5MB/s", 1_500_000),
        ("800kbit/s", 100_000),
        ("10 Mbit/s", 1_250_000),
        ("64KiB", 65_536),
        ("1000", 1000),
        ("1 GB / s", 1_000_000_000),
    ],
)
def test_bandwidth_limit_parsing(text: str, bytes_per_second: int | None) -> None:
    assert parse_bandwidth_limit(text) == bytes_per_second


@pytest.mark.parametrize("text", ["2Mb/s", "fast", "-1MB/s", "0B/s", "2 MiB/min"])
def test_bandwidth_limit_refusals(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bandwidth_limit(text)


def test_bandwidth_limit_reaches_upload_settings(tmp_path: Path) -> None:
    settings = load(tmp_path, '[upload]\nbandwidth_limit = "2MiB/s"\n' + MINIMAL_WATCH)

    assert settings.upload.bandwidth_limit_bytes_per_second == 2_097_152


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("", None),
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_listen_address_parsing(text: str, address: tuple[str, int] | None) -> None:
    assert parse_listen_address(text) == address


@pytest.mark.parametrize(
    ("text", "message_start"),
    [
        ("9464", "must be host:port"),
        ("localhost", "must be host:port"),
        ("127.0.0.1:99999", "must be host:port"),
        ("[::1:9464", "must be host:port"),
        (":9464", "must be host:port"),
        ("127.0.0.1:\u0669\u0664", "must be host:port"),
        ("127.0.0.1:\u00b2", "must be host:port"),
        ("::1:9464", "must be host:port"),
        ("nosuchhost.invalid:9464", "'nosuchhost.invalid' is not an IP address"),
        ("[localhost]:9464", "'localhost' is not an IP address"),
        (" 127.0.0.1:9464", "' 127.0.0.1' is not an IP address"),
    ],
)
def test_listen_address_refusals(text: str, message_start: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message_start)):
        parse_listen_address(text)


def test_ipv6_listen_address_without_brackets_gets_a_hint(tmp_path: Path) -> None:
    assert problems_of(tmp_path, '[metrics]\nlisten = "::1:9464"\n' + MINIMAL_WATCH) == [
        "config.toml: at 'metrics.listen': must be host:port like \"127.0.0.1:9464\" (use "
        "0.0.0.0 for every interface), or empty to turn metrics off (got '::1:9464') (write an "
        'IPv6 address in brackets: "[::1]:9464")'
    ]


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("", ("127.0.0.1", 9464)),
        ('[metrics]\nlisten = ""\n', None),
        ('[metrics]\nlisten = "[::]:0"\n', ("::", 0)),
    ],
)
def test_settings_carry_the_parsed_listen_address(
    tmp_path: Path, text: str, address: tuple[str, int] | None
) -> None:
    assert load(tmp_path, text + MINIMAL_WATCH).metrics.listen_address == address
