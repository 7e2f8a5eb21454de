"""What the section models share: their base, and the field types and checks several sections
use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from watcher.errors import KeyedProblems


class Section(BaseModel):
    """Frozen, and unknown keys are errors: a misspelt key must not fall back to a default."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def refuse_bool(value: Any) -> Any:
    # pydantic's lax mode reads `concurrency = true` as 1; a bool in a number field is a mistake.
    if isinstance(value, bool):
        raise KeyedProblems([("", "must be a number, not true/false")])
    return value


# The longest any duration setting may be (one week). Longer is no real setting, and inf or 1e300
# would reach a timer: Condition.wait and time.sleep raise OverflowError on those.
MAX_SECONDS = 604_800
PositiveSeconds = Annotated[float, BeforeValidator(refuse_bool), Field(gt=0, le=MAX_SECONDS)]


def path_text(value: str) -> str:
    # The OS cannot take a path with NUL in it: os.stat and open raise ValueError.
    if "\0" in value:
        raise ValueError("must not contain a NUL character (\\u0000)")
    return value


def _absolute(value: Path) -> Path:
    # A missing folder is fine (a mount may come later; the daemon waits), a relative one is
    # not: it would depend on the daemon's working directory.
    path_text(str(value))
    if not value.is_absolute():
        raise ValueError(f"must be an absolute path (got '{value}')")
    return value


AbsolutePath = Annotated[Path, AfterValidator(_absolute)]
