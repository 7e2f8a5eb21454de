"""The small commands through the real command line: explain, check, usage errors."""

from __future__ import annotations

from pathlib import Path

from tests.configfactory import API_KEY, run_watcher, watcher_env, write_config
from tests.imagefactory import write_jpeg
from watcher.devserver import DevServer


def frame_config(tmp_path: Path, endpoint: str, root: Path, dataset_id: str = "ds_cam") -> Path:
    return write_config(
        tmp_path,
        endpoint=endpoint,
        watches=[
            {
                "path": str(root),
                "dataset_id": dataset_id,
                "reference_id": "cam7/{relpath}",
                "metadata": {"camera": "back"},
                "rules": [
                    {"match": "{weather}/**", "metadata": {"weather": "{weather}"}},
                    {
                        "regex": r"(?P<date>\d{4}-\d{2}-\d{2})/frame_(?P<frame>\d+)",
                        "metadata": {"Recording Date": "{date}", "frame": "{frame:int}"},
                    },
                ],
            }
        ],
    )


def test_explain_shows_reference_id_and_typed_metadata(tmp_path: Path) -> None:
    root = tmp_path / "cam"
    path = root / "Rainy" / "2024-05-01" / "frame_0042.jpg"
    write_jpeg(path)
    config = frame_config(tmp_path, "http://127.0.0.1:9/v1/nucleus", root)
    result = run_watcher("explain", "-c", str(config), str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "reference_id: cam7/Rainy/2024-05-01/frame_0042.jpg" in lines
    assert (
        'metadata:     {"Recording Date": "2024-05-01", "camera": "back", "frame": 42,'
        ' "weather": "Rainy"}'
    ) in lines
    assert "state:        not recorded yet" in lines


def test_explain_outside_every_watch_is_one_line(tmp_path: Path) -> None:
    config = frame_config(tmp_path, "http://127.0.0.1:9/v1/nucleus", tmp_path / "cam")
    result = run_watcher("explain", "-c", str(config), "/etc/hostname")
    assert result.returncode == 1
    assert result.stderr.strip() == "nucleus-watcher: /etc/hostname: not inside any watch folder"


def test_check_online_names_the_dataset_that_does_not_exist(tmp_path: Path) -> None:
    root = tmp_path / "cam"
    root.mkdir()
    with DevServer(datasets=["ds_cam"]) as server:
        good = run_watcher(
            "check", "-c", str(frame_config(tmp_path, server.base_url, root)), "--online"
        )
        assert good.returncode == 0, good.stderr
        assert "ds_cam: ok" in good.stdout
        bad_config = frame_config(tmp_path, server.base_url, root, dataset_id="ds_typo")
        bad = run_watcher("check", "-c", str(bad_config), "--online")
    assert bad.returncode == 1
    assert bad.stderr.startswith("  ds_typo: ")
    assert "404" in bad.stderr
    assert API_KEY not in good.stdout + good.stderr + bad.stdout + bad.stderr


def test_check_online_with_a_wrong_key(tmp_path: Path) -> None:
    root = tmp_path / "cam"
    root.mkdir()
    with DevServer(api_key="the-right-key") as server:
        config = frame_config(tmp_path, server.base_url, root)
        result = run_watcher("check", "-c", str(config), "--online")
    assert result.returncode == 1
    assert "401" in result.stderr
    assert API_KEY not in result.stdout + result.stderr


def test_missing_api_key_is_a_config_error(tmp_path: Path) -> None:
    root = tmp_path / "cam"
    root.mkdir()
    config = frame_config(tmp_path, "http://127.0.0.1:9/v1/nucleus", root)
    env = watcher_env()
    del env["NUCLEUS_API_KEY"]
    result = run_watcher("scan", "-c", str(config), env=env)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_usage_error_exits_2() -> None:
    result = run_watcher("scan")
    assert result.returncode == 2
    assert "the following arguments are required: -c/--config" in result.stderr
