"""pydantic's validation errors -> one line each: the key, then what is wrong in plain words."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from watcher.config.sections import (
    DiskSettings,
    LogSettings,
    MetricsSettings,
    NucleusSettings,
    ScanSettings,
    SettleSettings,
    StateSettings,
    UploadSettings,
)
from watcher.config.settings import Settings
from watcher.config.watch import RuleSettings, WatchSettings
from watcher.errors import KeyedProblems
from watcher.rules import Problem, dotted_key, join_key, shorten

MODEL_BY_CONTAINER: dict[str, type[BaseModel]] = {
    "nucleus": NucleusSettings,
    "upload": UploadSettings,
    "settle": SettleSettings,
    "scan": ScanSettings,
    "state": StateSettings,
    "log": LogSettings,
    "metrics": MetricsSettings,
    "disk": DiskSettings,
    "watch": WatchSettings,
    "rules": RuleSettings,
}


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    return shorten(value, limit_chars=60)


def _unknown_key_message(loc: tuple[str | int, ...]) -> str:
    name = str(loc[-1])
    if name == "api_key":
        return (
            "unknown key; the API key never goes in the config: name a file in "
            "nucleus.api_key_file or set NUCLEUS_API_KEY"
        )
    container = next((part for part in reversed(loc[:-1]) if isinstance(part, str)), "")
    model = MODEL_BY_CONTAINER.get(container, Settings)
    close = difflib.get_close_matches(name, list(model.model_fields), n=1)
    return f"unknown key (did you mean '{close[0]}'?)" if close else "unknown key"


def _list_message(loc: tuple[str | int, ...], got: str) -> str:
    if loc == ("watch",):
        return "must be an array of tables: write [[watch]], not [watch]"
    if loc[-1] == "rules":
        return "must be an array of tables: write [[watch.rules]], not [watch.rules]"
    if loc[-1] in ("include", "exclude"):
        return f'must be a list of strings like ["*.jpg"] (got {got})'
    return f"must be a list (got {got})"


def _message(error: Any) -> str:
    kind: str = error["type"]
    loc: tuple[str | int, ...] = tuple(error["loc"])
    ctx: dict[str, Any] = error.get("ctx") or {}
    got = _shown(error.get("input"))
    if kind == "extra_forbidden":
        return _unknown_key_message(loc)
    if kind == "missing":
        return "at least one [[watch]] is required" if loc == ("watch",) else "is required"
    if kind in ("tuple_type", "list_type"):
        return _list_message(loc, got)
    simple = {
        "greater_than": f"must be more than {ctx.get('gt')} (got {got})",
        "greater_than_equal": f"must be at least {ctx.get('ge')} (got {got})",
        "less_than_equal": f"must be at most {ctx.get('le')} (got {got})",
        "int_parsing": f"must be a whole number (got {got})",
        "int_type": f"must be a whole number (got {got})",
        "int_from_float": f"must be a whole number (got {got})",
        "float_parsing": f"must be a number (got {got})",
        "float_type": f"must be a number (got {got})",
        "bool_parsing": f"must be true or false (got {got})",
        "bool_type": f"must be true or false (got {got})",
        "string_type": f"must be a string (got {got})",
        "path_type": f"must be a path string (got {got})",
        "literal_error": f"must be {ctx.get('expected')} (got {got})",
        "dict_type": f"must be a table (got {got})",
        "model_type": f"must be a table (got {got})",
        "model_attributes_type": f"must be a table (got {got})",
    }
    if kind in simple:
        return simple[kind]
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    return str(error["msg"])


def problems_from(exc: ValidationError) -> list[Problem]:
    """(dotted key, message) for each error; a validator's KeyedProblems each under their key."""
    problems: list[Problem] = []
    for error in exc.errors():
        base = dotted_key(error["loc"])
        raised = (error.get("ctx") or {}).get("error")
        if isinstance(raised, KeyedProblems):
            problems.extend((join_key(base, key), message) for key, message in raised.problems)
        else:
            problems.append((base, _message(error)))
    return problems
