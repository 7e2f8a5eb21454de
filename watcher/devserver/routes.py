"""The API paths the devserver answers, parsed into routes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

API_PREFIX: Final = "/v1/nucleus"


# --------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class _Route:
    name: str  # append | job | job_errors | job_info | dataset_info | dataset_property | refloc
    dataset_id: str = ""
    job_id: str = ""
    reference_id: str = ""
    property_name: str = ""

    @classmethod
    def parse(cls, raw_path: str) -> _Route | None:
        if not raw_path.startswith(API_PREFIX + "/"):
            return None
        segments = raw_path[len(API_PREFIX) + 1 :].split("/")
        decoded = [unquote(segment) for segment in segments]
        match decoded:
            case ["dataset", dataset_id, "append"]:
                return cls("append", dataset_id=dataset_id)
            case ["dataset", dataset_id, "info"]:
                return cls("dataset_info", dataset_id=dataset_id)
            case ["dataset", dataset_id, ("name" | "is_scene" | "use_privacy_mode") as prop]:
                # Small properties the official client reads before it appends.
                return cls("dataset_property", dataset_id=dataset_id, property_name=prop)
            case ["dataset", dataset_id, "refloc", *_] if len(segments) > 3:
                # A reference_id may hold slashes ("{device}/{relpath}"), encoded or not.
                return cls(
                    "refloc", dataset_id=dataset_id, reference_id=unquote("/".join(segments[3:]))
                )
            case ["job", job_id]:
                return cls("job", job_id=job_id)
            case ["job", job_id, "errors"]:
                return cls("job_errors", job_id=job_id)
            case ["job", job_id, "info"]:
                return cls("job_info", job_id=job_id)
        return None
