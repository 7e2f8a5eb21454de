"""The sample images shipped in `watcher/samples/`, named `<weather>-<n>.<ext>`."""

from __future__ import annotations

import hashlib
import importlib.resources
from dataclasses import dataclass
from typing import Final

WEATHERS: Final = ("Sunny", "Foggy", "Rainy")
_IMAGE_SUFFIXES: Final = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Sample:
    """One shipped sample image and where the demo writes it."""

    name: str  # "sunny-1.jpg"
    weather: str  # "Sunny": its folder, and the metadata the rule gives it
    data: bytes

    @property
    def relpath(self) -> str:
        """Its path under the watched folder, which is also its reference_id."""
        return f"{self.weather}/{self.name}"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def load_samples() -> list[Sample]:
    """The images in `watcher/samples/` named `<weather>-<n>.<ext>`, by name."""
    folder = importlib.resources.files("watcher") / "samples"
    samples: list[Sample] = []
    for entry in sorted(folder.iterdir(), key=lambda entry: entry.name):
        name = entry.name
        weather = name.split("-", 1)[0].capitalize()
        if entry.is_file() and name.lower().endswith(_IMAGE_SUFFIXES) and weather in WEATHERS:
            samples.append(Sample(name=name, weather=weather, data=entry.read_bytes()))
    return samples
