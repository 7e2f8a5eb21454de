"""Real config files for tests: a small TOML writer for the shapes our config uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

API_KEY = "test_key_Zq81vXw3"  # a fake key; tests grep all output for it


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, Sequence):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_config(
    directory: Path,
    *,
    endpoint: str,
    watches: Sequence[Mapping[str, Any]],
    name: str = "config.toml",
    **sections: Mapping[str, Any],
) -> Path:
    """Write a config with test-friendly defaults (fast settle and retries, no metrics port)."""
    defaults: dict[str, dict[str, Any]] = {
        "nucleus": {"endpoint": endpoint, "timeout_seconds": 30, "job_poll_seconds": 0.1},
        "upload": {"retry_initial_seconds": 0.05, "retry_max_seconds": 0.5},
        "settle": {"seconds": 0.3, "max_wait_seconds": 5},
        "state": {"path": str(directory / "state" / "state.db")},
        "log": {"format": "json", "level": "info"},
        "metrics": {"listen": ""},
    }
    for section, values in sections.items():
        defaults.setdefault(section, {}).update(values)
    lines: list[str] = []
    for section, values in defaults.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_value(v)}" for key, v in values.items())
        lines.append("")
    for watch in watches:
        lines.append("[[watch]]")
        rules = watch.get("rules", ())
        lines.extend(f"{key} = {_value(v)}" for key, v in watch.items() if key != "rules")
        for rule in rules:
            lines.append("[[watch.rules]]")
            lines.extend(f"{key} = {_value(v)}" for key, v in rule.items())
        lines.append("")
    path = directory / name
    path.write_text("\n".join(lines))
    return path


def watcher_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUCLEUS")}
    env["NUCLEUS_API_KEY"] = API_KEY
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_watcher(
    *args: str, timeout_seconds: float = 120, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real command line (`python -m watcher ...`) to completion."""
    return subprocess.run(
        [sys.executable, "-m", "watcher", *args],
        capture_output=True,
        text=True,
        timeout=timeout_seconds,
        env=dict(env) if env is not None else watcher_env(),
    )
