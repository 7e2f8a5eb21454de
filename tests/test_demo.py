"""`nucleus-watcher demo`: the shipped samples, and the whole demo run as a user would run it.

The samples in `watcher/samples/` were made once by `make_samples` below (Pillow is only a test
dependency; the demo reads the committed files). To make them again:

    .venv/bin/python -m tests.test_demo watcher/samples
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from tests.configfactory import watcher_env
from watcher.commands import WEATHERS, load_samples
from watcher.files import check_image_complete

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- the samples

_SAMPLE_SIZE = (160, 120)
_SKIES = {  # top and bottom colour of the sky gradient
    "sunny": ((255, 214, 90), (120, 190, 255)),
    "foggy": ((205, 208, 212), (150, 155, 160)),
    "rainy": ((70, 90, 120), (30, 40, 60)),
}


def _sample_image(weather: str, number: int) -> Image.Image:
    width, height = _SAMPLE_SIZE
    top, bottom = _SKIES[weather]
    image = Image.new("RGB", _SAMPLE_SIZE)
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / (height - 1)
        r, g, b = (round(a + (z - a) * t) for a, z in zip(top, bottom, strict=True))
        draw.line([(0, y), (width, y)], fill=(r, g, b))
    if weather == "sunny":
        radius, cx, cy = 14 + 4 * number, 40 + 30 * (number - 1), 34
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        draw.ellipse(box, fill=(255, 240, 120), outline=(255, 170, 0), width=3)
    elif weather == "foggy":
        bands = 3 + number
        for band in range(bands):
            y = 20 + band * (80 // bands)
            draw.rectangle([0, y, width, y + 6], fill=(228, 230, 232))
    else:
        for x in range(-height, width, 12 - 2 * number):
            draw.line([(x, 0), (x + height // 3, height)], fill=(150, 180, 230), width=1)
    ground = (40, 70, 35) if weather == "rainy" else (60, 110, 50)
    draw.rectangle([0, height - 30, width, height], fill=ground)
    font = ImageFont.load_default(size=18)
    label = f"{weather.capitalize()} {number}"
    draw.text((9, height - 27), label, fill=(0, 0, 0), font=font)
    draw.text((8, height - 28), label, fill=(255, 255, 255), font=font)
    return image


def make_samples(folder: Path) -> list[Path]:
    """Write <weather>-<n>.jpg (n = 1, 3) and <weather>-2.png for each weather."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for weather in _SKIES:
        for number in (1, 2, 3):
            image = _sample_image(weather, number)
            out = io.BytesIO()
            if number == 2:
                image.quantize(colors=32).save(out, format="PNG", optimize=True)
                path = folder / f"{weather}-{number}.png"
            else:
                image.save(out, format="JPEG", quality=80, optimize=True)
                path = folder / f"{weather}-{number}.jpg"
            path.write_bytes(out.getvalue())
            written.append(path)
    return written


def test_samples_are_small_complete_images_three_per_weather(tmp_path: Path) -> None:
    samples = load_samples()
    assert sorted(sample.weather for sample in samples) == sorted(WEATHERS * 3)
    for sample in samples:
        assert 200 < len(sample.data) < 16_384, sample.name
        path = tmp_path / sample.name
        path.write_bytes(sample.data)
        assert check_image_complete(path) is None, sample.name
        with Image.open(path) as image:
            image.load()
            assert image.size == _SAMPLE_SIZE
            assert image.format == ("PNG" if sample.name.endswith(".png") else "JPEG")
    assert len({sample.sha256 for sample in samples}) == len(samples)


# --------------------------------------------------------------------------- the demo


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_uploads_every_sample_and_cleans_up() -> None:
    env = watcher_env()
    del env["NUCLEUS_API_KEY"]  # the demo needs no key of ours
    # Would send the daemon to the real API if the demo let it through to its child.
    env["NUCLEUS_ENDPOINT"] = "http://192.0.2.1:9/v1/nucleus"
    began = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from watcher.commands.demo import run_demo; import sys;"
            " sys.exit(run_demo(keep=False, seconds=3))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    elapsed = time.monotonic() - began
    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    assert elapsed < 30, output

    for sample in load_samples():
        lines = [line for line in output.splitlines() if f" {sample.relpath} " in line]
        stored = [line for line in lines if line.lstrip().startswith("stored")]
        assert len(stored) == 1, output
        assert json.dumps({"weather": sample.weather}) in stored[0], stored[0]
        assert re.search(r"\d+ ms after close", stored[0]), stored[0]
    assert sum(line.lstrip().startswith("stored") for line in output.splitlines()) == 9
    assert "writing" in output and "slowly" in output
    summary = [line for line in output.splitlines() if line.startswith("summary:")]
    assert len(summary) == 1, output
    assert "9 of 9 files uploaded" in summary[0]
    assert "all byte-identical (sha256 of the devserver's copy): yes" in summary[0]
    assert "demo-key" not in output + result.stderr

    folder = re.search(r"^  folder +(\S+)", output, re.MULTILINE)
    assert folder is not None, output
    demo_root = Path(folder.group(1)).parent
    assert demo_root.name.startswith("nucleus-watcher-demo-")
    assert not demo_root.exists()

    daemon = re.search(r"^  daemon +pid (\d+):", output, re.MULTILINE)
    assert daemon is not None, output
    assert not _alive(int(daemon.group(1)))


if __name__ == "__main__":
    for path in make_samples(Path(sys.argv[1])):
        print(path, path.stat().st_size)
