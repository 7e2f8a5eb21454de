"""What the section models share: their base, the carrier for problems under sub-keys, and the
field types and checks several sections use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from watcher.rules import Problem


class Section(BaseModel):
    """Frozen, and unknown keys are errors: a misspelt key must not fall back to a default."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class KeyedProblems(ValueError):
    """Raised from a validator to report problems under keys below the model being validated."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(message for _, message in self.problems))


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
