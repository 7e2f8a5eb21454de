"""The environment as a settings source: `NUCLEUS_WATCHER_...` variables and `NUCLEUS_ENDPOINT`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from watcher.config.document import anchor_relative_paths, deep_copy_tables
from watcher.rules import Problem, dotted_key

ENV_PREFIX = "NUCLEUS_WATCHER_"
# The official client's variable; NUCLEUS_WATCHER_NUCLEUS__ENDPOINT wins over it.
ENV_ENDPOINT = "NUCLEUS_ENDPOINT"


class IndexedEnvironmentSource(PydanticBaseSettingsSource):
    """`NUCLEUS_WATCHER_<SECTION>__<KEY>`, `NUCLEUS_WATCHER_WATCH__<i>__<KEY>`,
    `NUCLEUS_WATCHER_DEVICE_ID` and `NUCLEUS_ENDPOINT`, read from the mapping it is given.

    pydantic-settings' own environment source cannot reach the i-th `[[watch]]` of a file (a list
    is replaced whole), so this one reads the file's document to override single keys of its
    entries. It also keeps what the messages need: `origins`, {dotted key: variable that set it},
    and `problems`, the variables that name nothing or cannot apply.
    """

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        environ: Mapping[str, str],
        document: Mapping[str, Any],
        base_dir: Path | None,
    ) -> None:
        super().__init__(settings_cls)
        self._environ = environ
        self._document = document
        self._base_dir = base_dir
        fields = settings_cls.model_fields
        self._sections = {
            name
            for name, field in fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        }
        self._scalars = set(fields) - self._sections - {"watch"}
        self.origins: dict[str, str] = {}
        self.problems: list[Problem] = []

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Not asked for: __call__ reads every variable at once, in a fixed order.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        self.origins, self.problems = {}, []
        overrides: dict[str, Any] = {}
        endpoint = self._environ.get(ENV_ENDPOINT, "")
        if endpoint and f"{ENV_PREFIX}NUCLEUS__ENDPOINT" not in self._environ:
            self._set_in_section(overrides, ["nucleus", "endpoint"], endpoint, ENV_ENDPOINT)
        for variable in sorted(self._environ):
            if variable.startswith(ENV_PREFIX):
                self._apply(overrides, variable, self._environ[variable])
        return anchor_relative_paths(overrides, self._base_dir)

    def _apply(self, overrides: dict[str, Any], variable: str, value: str) -> None:
        parts = variable[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) == 1:
            # Single names are left for other uses, except the top-level keys themselves.
            if parts[0] in self._scalars:
                overrides[parts[0]] = value
                self.origins[parts[0]] = variable
        elif len(parts) == 2 and parts[0] in self._sections:
            self._set_in_section(overrides, parts, value, variable)
        elif len(parts) == 3 and parts[0] == "watch" and parts[1].isdigit():
            self._set_in_watch(overrides, int(parts[1]), parts[2], value, variable)
        else:
            self.problems.append(
                (
                    dotted_key(parts),
                    f"{variable} names no setting; use {ENV_PREFIX}<SECTION>__<KEY> or "
                    f"{ENV_PREFIX}WATCH__<index>__<KEY>",
                )
            )

    def _set_in_section(
        self, overrides: dict[str, Any], parts: list[str], value: str, variable: str
    ) -> None:
        section, key = parts
        if not isinstance(self._document.get(section, {}), Mapping):
            self.problems.append((section, f"is not a table, so {variable} cannot set a key in it"))
            return
        overrides.setdefault(section, {})[key] = value
        self.origins[dotted_key(parts)] = variable

    def _set_in_watch(
        self, overrides: dict[str, Any], index: int, key: str, value: str, variable: str
    ) -> None:
        watches = self._document.get("watch")
        if not isinstance(watches, list) or index >= len(watches):
            self.problems.append(
                (f"watch[{index}]", f"is not in the file, so {variable} has nothing to set")
            )
            return
        if not isinstance(watches[index], Mapping):
            return  # the file's own error says what is wrong with this entry
        # A list is replaced whole when sources merge, so this gives every entry of the file.
        entries = overrides.setdefault("watch", deep_copy_tables(watches))
        entries[index][key] = value
        self.origins[dotted_key(["watch", index, key])] = variable
