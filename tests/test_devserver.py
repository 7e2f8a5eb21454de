"""The devserver over real HTTP on 127.0.0.1: every route, every rule, every fault."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import pytest
import requests

from tests.imagefactory import jpeg_bytes, png_bytes, write_jpeg, write_large_jpeg
from watcher.devserver import DevServer

AUTH = ("test-key", "")
REPO_ROOT = Path(__file__).resolve().parent.parent

FormFiles = list[tuple[str, tuple[str | None, bytes | str | BinaryIO, str]]]


def list_form(items: list[dict[str, Any]], images: dict[str, bytes]) -> FormFiles:
    """The daemon's list form: one `items` JSON part, then one `image` part per file."""
    files: FormFiles = [("items", (None, json.dumps(items), "application/json"))]
    for filename, data in images.items():
        content_type = "image/png" if filename.endswith(".png") else "image/jpeg"
        files.append(("image", (filename, data, content_type)))
    return files


def item(
    reference_id: str, image_url: str, metadata: dict[str, Any] | None = None, update: bool = False
) -> dict[str, Any]:
    return {
        "reference_id": reference_id,
        "metadata": metadata or {},
        "image_url": image_url,
        "update": update,
    }


def append(
    server: DevServer,
    dataset_id: str = "ds_test",
    *,
    files: FormFiles | None = None,
    json_body: Any = None,
    asynchronous: bool = False,
    session: requests.Session | None = None,
    auth: tuple[str, str] | None = AUTH,
    timeout: float | tuple[float, float] = 10.0,
    stream: bool = False,
) -> requests.Response:
    poster = session or requests
    return poster.post(
        f"{server.base_url}/dataset/{dataset_id}/append",
        params={"async": "1"} if asynchronous else None,
        files=files,
        json=json_body,
        auth=auth,
        timeout=timeout,
        stream=stream,
    )


def one_image_form(reference_id: str = "a", seed: int = 0, **meta: Any) -> FormFiles:
    filename = f"/cam/{reference_id}.jpg"
    return list_form([item(reference_id, filename, meta)], {filename: jpeg_bytes(seed=seed)})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def slow_job_server(tmp_path: Path) -> Iterator[DevServer]:
    server = DevServer(data_dir=tmp_path / "jobs", job_delay_seconds=0.4).start()
    yield server
    server.stop()


# --------------------------------------------------------------------------- append: list form


def test_list_form_stores_three_images_byte_identical(devserver: DevServer) -> None:
    images = {
        "/srv/camera/Sunny/2024-05-01/frame_001.jpg": jpeg_bytes(seed=1),
        "/srv/camera/Sunny/2024-05-01/frame_002.jpg": jpeg_bytes(seed=2),
        "/srv/camera/Foggy/frame_003.png": png_bytes(seed=3),
    }
    items = [
        item(f"cam1/{Path(name).name}", name, {"weather": name.split("/")[3], "frame": index})
        for index, name in enumerate(images)
    ]

    response = append(devserver, files=list_form(items, images))

    assert response.status_code == 200, response.text
    assert response.json() == {
        "dataset_id": "ds_test",
        "new_items": 3,
        "updated_items": 0,
        "ignored_items": 0,
        "upload_errors": 0,
    }
    stored = devserver.items("ds_test")
    assert set(stored) == {"cam1/frame_001.jpg", "cam1/frame_002.jpg", "cam1/frame_003.png"}
    for sent in items:
        kept = stored[sent["reference_id"]]
        original = images[sent["image_url"]]
        assert kept.metadata == sent["metadata"]
        assert kept.image_url == sent["image_url"]
        assert kept.image_sha256 == sha(original)
        assert kept.image_size_bytes == len(original)
        assert kept.times_written == 1
        assert devserver.image_bytes(sha(original)) == original
        assert devserver.image_path(sha(original)).parent == devserver.data_dir / "images"
    assert stored["cam1/frame_003.png"].content_type == "image/png"
    journal = devserver.data_dir / "datasets" / "ds_test" / "items.jsonl"
    assert len(journal.read_text().splitlines()) == 3


def test_percent_encoded_filename_matches_its_image_url(devserver: DevServer) -> None:
    # aiohttp (the official client) percent-encodes part filenames.
    image_url = "/data/Recording Date/frame 1.jpg"
    files: FormFiles = [
        ("items", (None, json.dumps([item("r", image_url)]), "application/json")),
        ("image", (quote(image_url, safe=""), jpeg_bytes(seed=4), "image/jpeg")),
    ]
    response = append(devserver, files=files)
    assert response.status_code == 200, response.text
    assert devserver.items("ds_test")["r"].image_url == image_url


def test_large_part_is_stored_intact(devserver: DevServer, tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    digest = write_large_jpeg(path, 6 * 1024 * 1024, seed=5)
    with path.open("rb") as image_file:
        files: FormFiles = [
            ("items", (None, json.dumps([item("big", str(path))]), "application/json")),
            ("image", (str(path), image_file, "image/jpeg")),
        ]
        response = requests.post(
            f"{devserver.base_url}/dataset/ds_test/append", files=files, auth=AUTH, timeout=30
        )
    assert response.status_code == 200, response.text
    assert devserver.items("ds_test")["big"].image_sha256 == digest
    assert hashlib.sha256(devserver.image_bytes(digest)).hexdigest() == digest


def test_chunked_request_body_is_accepted(devserver: DevServer) -> None:
    image = jpeg_bytes(seed=6)
    boundary = "chunkedboundary42"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="items"\r\n'
            "Content-Type: application/json\r\n\r\n"
            + json.dumps([item("chunked", "c.jpg")])
            + f"\r\n--{boundary}\r\n"
            + 'Content-Disposition: form-data; name="image"; filename="c.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def pieces() -> Iterator[bytes]:  # a generator body makes requests send it chunked
        for start in range(0, len(body), 700):
            yield body[start : start + 700]

    response = requests.post(
        f"{devserver.base_url}/dataset/ds_test/append",
        data=pieces(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        auth=AUTH,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert devserver.image_bytes(sha(image)) == image


def test_items_part_sent_as_a_file_is_still_the_items_part(devserver: DevServer) -> None:
    files: FormFiles = [
        ("items", ("items.json", json.dumps([item("f", "f.jpg")]), "application/json")),
        ("image", ("f.jpg", jpeg_bytes(seed=8), "image/jpeg")),
    ]
    assert append(devserver, files=files).status_code == 200
    assert "f" in devserver.items("ds_test")


def test_legacy_single_item_form(devserver: DevServer) -> None:
    image = jpeg_bytes(seed=7)
    legacy_item = {"reference_id": "image_ref_300000", "metadata": {"License Plate": "ZPH-J27"}}
    files: FormFiles = [
        ("item", (None, json.dumps(legacy_item), "application/json")),
        ("image", ("plate.jpg", image, "image/jpeg")),
    ]
    response = append(devserver, files=files)
    assert response.status_code == 200, response.text
    assert response.json()["new_items"] == 1
    kept = devserver.items("ds_test")["image_ref_300000"]
    assert kept.metadata == {"License Plate": "ZPH-J27"}
    assert kept.image_url == "plate.jpg"
    assert kept.image_sha256 == sha(image)


def test_connection_is_kept_alive_across_requests(devserver: DevServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", devserver.port, timeout=10)
    try:
        for attempt in range(3):
            body = json.dumps(
                {"items": [item(f"k{attempt}", f"https://example.com/{attempt}.jpg")]}
            )
            connection.request(
                "POST",
                "/v1/nucleus/dataset/ds_test/append",
                body=body,
                headers={
                    "Content-Type": "application/json",
                    "Authorization": "Basic dGVzdC1rZXk6",  # test-key:
                },
            )
            answer = connection.getresponse()
            assert answer.status == 200
            assert json.loads(answer.read())["new_items"] == 1
            assert answer.getheader("Connection") != "close"
    finally:
        connection.close()
    assert set(devserver.items("ds_test")) == {"k0", "k1", "k2"}


# --------------------------------------------------------------------------- update semantics


def test_update_false_is_ignored_and_update_true_replaces_metadata_and_image(
    devserver: DevServer,
) -> None:
    first, second = jpeg_bytes(seed=10), jpeg_bytes(seed=11)
    name = "/cam/a.jpg"
    created = append(
        devserver,
        files=list_form([item("a", name, {"weather": "Sunny", "frame": 1})], {name: first}),
    )
    assert created.json()["new_items"] == 1

    ignored = append(
        devserver, files=list_form([item("a", name, {"weather": "Rainy"})], {name: second})
    )
    assert ignored.status_code == 200
    assert (ignored.json()["ignored_items"], ignored.json()["updated_items"]) == (1, 0)
    kept = devserver.items("ds_test")["a"]
    assert kept.metadata == {"weather": "Sunny", "frame": 1}
    assert kept.image_sha256 == sha(first)
    assert kept.times_written == 1

    updated = append(
        devserver,
        files=list_form([item("a", name, {"weather": "Rainy"}, update=True)], {name: second}),
    )
    assert (updated.json()["updated_items"], updated.json()["new_items"]) == (1, 0)
    kept = devserver.items("ds_test")["a"]
    assert kept.metadata == {"weather": "Rainy"}  # "frame" dropped: replaced, not merged
    assert kept.image_sha256 == sha(second)
    assert devserver.image_bytes(sha(second)) == second
    assert kept.times_written == 2


def test_new_reference_id_is_created_even_with_update_true(devserver: DevServer) -> None:
    name = "n.jpg"
    response = append(
        devserver, files=list_form([item("n", name, update=True)], {name: jpeg_bytes(seed=12)})
    )
    assert response.json()["new_items"] == 1
    assert devserver.items("ds_test")["n"].times_written == 1


# --------------------------------------------------------------------------- rules -> 4xx


def test_metadata_type_conflict_is_400_naming_the_key(devserver: DevServer) -> None:
    assert append(devserver, files=one_image_form("a", frame=1)).status_code == 200

    conflict = append(devserver, files=one_image_form("b", seed=1, frame="2"))
    assert conflict.status_code == 400
    assert "'frame'" in conflict.json()["error"]
    assert "b" not in devserver.items("ds_test")

    # Inside one request, and across bool/number.
    names = ["x.jpg", "y.jpg"]
    both = list_form(
        [item("x", names[0], {"flag": True}), item("y", names[1], {"flag": 1})],
        {names[0]: jpeg_bytes(seed=2), names[1]: jpeg_bytes(seed=3)},
    )
    inner = append(devserver, files=both)
    assert inner.status_code == 400
    assert "'flag'" in inner.json()["error"]
    assert set(devserver.items("ds_test")) == {"a"}  # nothing of a refused request is kept


def test_another_dataset_has_its_own_key_types(devserver: DevServer) -> None:
    assert append(devserver, "ds_one", files=one_image_form("a", frame=1)).status_code == 200
    assert append(devserver, "ds_two", files=one_image_form("a", frame="one")).status_code == 200


@pytest.mark.parametrize(
    ("files", "message_part"),
    [
        (
            [("items", (None, json.dumps([item("a", "a.jpg")]), "application/json"))],
            "no image part",
        ),
        (
            [
                ("items", (None, "[{not json", "application/json")),
                ("image", ("a.jpg", b"\xff\xd8\xff\xd9", "image/jpeg")),
            ],
            "not valid JSON",
        ),
        (
            list_form(
                [item("dup", "a.jpg"), item("dup", "b.jpg")],
                {"a.jpg": b"\xff\xd8\xff\xd9", "b.jpg": b"\xff\xd8\x00\xff\xd9"},
            ),
            "twice",
        ),
        (
            list_form(
                [item(f"r{i}", f"{i}.jpg") for i in range(11)],
                {f"{i}.jpg": bytes([0xFF, 0xD8, i, 0xFF, 0xD9]) for i in range(11)},
            ),
            "at most 10",
        ),
        (
            list_form([item("a", "a.jpg")], {"a.jpg": b"\xff\xd8\xff\xd9", "b.jpg": b"\x00"}),
            "belongs to no item",
        ),
    ],
    ids=["missing-image", "bad-json", "duplicate-reference-id", "eleven-files", "extra-image"],
)
def test_malformed_append_is_400_and_stores_nothing(
    devserver: DevServer, files: FormFiles, message_part: str
) -> None:
    with requests.Session() as session:
        refused = append(devserver, files=files, session=session)
        assert refused.status_code == 400
        assert message_part in refused.json()["error"]
        # The connection stays usable after a refusal.
        assert append(devserver, files=one_image_form("ok"), session=session).status_code == 200
    assert set(devserver.items("ds_test")) == {"ok"}
    assert list((devserver.data_dir / "incoming").iterdir()) == []
    assert len(list((devserver.data_dir / "images").iterdir())) == 1


def test_body_over_the_cap_is_413(tmp_path: Path) -> None:
    with DevServer(data_dir=tmp_path / "small", max_body_bytes=8 * 1024) as server:
        name = "big.jpg"
        too_big = append(
            server, files=list_form([item("big", name)], {name: jpeg_bytes(200, 200, seed=1)})
        )
        assert too_big.status_code == 413
        assert server.items("ds_test") == {}
        assert append(server, files=one_image_form("small")).status_code == 200


def test_unknown_dataset_is_404(devserver: DevServer, tmp_path: Path) -> None:
    assert append(devserver, "not_a_dataset", files=one_image_form()).status_code == 404
    info = requests.get(f"{devserver.base_url}/dataset/nope/info", auth=AUTH, timeout=10)
    assert info.status_code == 404

    with DevServer(data_dir=tmp_path / "listed", datasets=["ds_only"]) as server:
        assert append(server, "ds_other", files=one_image_form()).status_code == 404
        assert append(server, "ds_only", files=one_image_form()).status_code == 200


def test_unknown_route_is_404(devserver: DevServer) -> None:
    response = requests.get(f"{devserver.base_url}/no/such/route", auth=AUTH, timeout=10)
    assert response.status_code == 404


# --------------------------------------------------------------------------- auth


def test_requests_without_a_key_are_401(devserver: DevServer) -> None:
    no_auth = append(devserver, files=one_image_form(), auth=None)
    assert no_auth.status_code == 401
    empty_key = requests.get(f"{devserver.base_url}/dataset/ds_test/info", auth=("", ""))
    assert empty_key.status_code == 401
    assert devserver.items("ds_test") == {}
    any_key = requests.get(
        f"{devserver.base_url}/dataset/ds_test/info", auth=("whatever", ""), timeout=10
    )
    assert any_key.status_code == 200


def test_configured_key_must_match_and_is_never_echoed(tmp_path: Path) -> None:
    with DevServer(data_dir=tmp_path / "keyed", api_key="s3cret-key-123") as server:
        info_url = f"{server.base_url}/dataset/ds_test/info"
        wrong = requests.get(info_url, auth=("wrong-key-456", ""), timeout=10)
        assert wrong.status_code == 401
        assert "wrong-key-456" not in wrong.text
        assert "s3cret-key-123" not in wrong.text
        refused = append(server, files=one_image_form(), auth=("wrong-key-456", ""))
        assert refused.status_code == 401
        assert server.items("ds_test") == {}
        right = append(server, files=one_image_form(), auth=("s3cret-key-123", ""))
        assert right.status_code == 200


# --------------------------------------------------------------------------- remote URLs


def test_remote_url_json_form(devserver: DevServer) -> None:
    remote = [
        item("s3", "s3://bucket/a.jpg", {"camera": "back"}),
        item("gs", "gs://bucket/b.jpg"),
        item("web", "https://example.com/c.jpg"),
    ]
    for entry in remote:
        del entry["update"]  # the JSON form carries update at the top level
    created = append(devserver, json_body={"items": remote, "update": False})
    assert created.status_code == 200, created.text
    assert created.json()["new_items"] == 3
    kept = devserver.items("ds_test")["s3"]
    assert (kept.image_url, kept.image_sha256, kept.metadata) == (
        "s3://bucket/a.jpg",
        None,
        {"camera": "back"},
    )

    changed = [{"reference_id": "s3", "image_url": "s3://bucket/a2.jpg", "metadata": {}}]
    for body in ({"items": changed}, {"items": changed, "update": False}):
        ignored = append(devserver, json_body=body)
        assert ignored.json()["ignored_items"] == 1
        assert devserver.items("ds_test")["s3"].image_url == "s3://bucket/a.jpg"
    updated = append(devserver, json_body={"items": changed, "update": True})
    assert updated.json()["updated_items"] == 1
    assert devserver.items("ds_test")["s3"].image_url == "s3://bucket/a2.jpg"


def test_remote_url_must_have_a_known_scheme(devserver: DevServer) -> None:
    for bad_url in ("/local/path.jpg", "ftp://host/a.jpg", "file:///a.jpg"):
        refused = append(
            devserver, json_body={"items": [{"reference_id": "r", "image_url": bad_url}]}
        )
        assert refused.status_code == 400
        assert "gs://" in refused.json()["error"]
    assert devserver.items("ds_test") == {}


# --------------------------------------------------------------------------- async jobs


def wait_for_job(server: DevServer, job_id: str, timeout_seconds: float = 10.0) -> list[str]:
    """Poll a job until it leaves Running; return every status seen, in order."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        answer = requests.get(f"{server.base_url}/job/{job_id}", auth=AUTH, timeout=10)
        assert answer.status_code == 200
        seen.append(answer.json()["status"])
        if seen[-1] != "Running":
            return seen
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still running after {timeout_seconds} s: {seen}")


def test_async_job_runs_then_completes(slow_job_server: DevServer) -> None:
    response = append(slow_job_server, files=one_image_form("a", frame=1), asynchronous=True)
    assert response.status_code == 200
    job = response.json()
    assert set(job) == {"job_id", "job_last_known_status", "job_type", "job_creation_time"}
    assert job["job_last_known_status"] == "Running"
    # Applied at once; only the reported status waits for the delay.
    assert "a" in slow_job_server.items("ds_test")

    seen = wait_for_job(slow_job_server, job["job_id"])
    assert seen[0] == "Running"
    assert seen[-1] == "Completed"
    errors = requests.get(f"{slow_job_server.base_url}/job/{job['job_id']}/errors", auth=AUTH)
    assert errors.json() == []


def test_async_job_with_a_bad_item_ends_errored_user(devserver: DevServer) -> None:
    assert append(devserver, files=one_image_form("a", frame=1)).status_code == 200
    response = append(devserver, files=one_image_form("b", seed=1, frame="x"), asynchronous=True)
    assert response.status_code == 200
    job_id = response.json()["job_id"]

    assert wait_for_job(devserver, job_id)[-1] == "Errored_User"
    errors = requests.get(f"{devserver.base_url}/job/{job_id}/errors", auth=AUTH, timeout=10)
    decoded = [json.loads(entry) for entry in errors.json()]
    assert [entry["reference_id"] for entry in decoded] == ["b"]
    assert "'frame'" in decoded[0]["error"]
    assert "b" not in devserver.items("ds_test")


def test_unknown_job_is_404(devserver: DevServer) -> None:
    response = requests.get(f"{devserver.base_url}/job/job_nope", auth=AUTH, timeout=10)
    assert response.status_code == 404


# --------------------------------------------------------------------------- other routes


def test_info_refloc_and_delete(devserver: DevServer) -> None:
    reference_id = "cam1/Sunny/a.jpg"  # slashes, as "{device}/{relpath}" makes them
    name = "/srv/a.jpg"
    form = list_form([item(reference_id, name, {"weather": "Sunny"})], {name: jpeg_bytes()})
    assert append(devserver, files=form).status_code == 200
    base = devserver.base_url

    info = requests.get(f"{base}/dataset/ds_test/info", auth=AUTH, timeout=10).json()
    assert (info["dataset_id"], info["length"]) == ("ds_test", 1)
    assert isinstance(info["name"], str)

    item_url = f"{base}/dataset/ds_test/refloc/{quote(reference_id, safe='')}"
    found = requests.get(item_url, auth=AUTH, timeout=10)
    assert found.status_code == 200
    assert found.json()["item"]["reference_id"] == reference_id
    assert found.json()["item"]["metadata"] == {"weather": "Sunny"}

    assert requests.delete(item_url, auth=AUTH, timeout=10).status_code == 200
    assert requests.get(item_url, auth=AUTH, timeout=10).status_code == 404
    assert requests.delete(item_url, auth=AUTH, timeout=10).status_code == 404
    assert devserver.items("ds_test") == {}
    assert requests.get(f"{base}/dataset/ds_test/info", auth=AUTH).json()["length"] == 0


def test_request_log_and_append_count(devserver: DevServer) -> None:
    append(devserver, files=one_image_form("a"))
    append(devserver, files=one_image_form("b"), asynchronous=True)
    requests.get(f"{devserver.base_url}/dataset/ds_test/info", auth=AUTH, timeout=10)

    assert devserver.append_request_count() == 2
    records = devserver.requests()
    assert [(r.method, r.status, r.item_count) for r in records] == [
        ("POST", 200, 1),
        ("POST", 200, 1),
        ("GET", 200, 0),
    ]
    assert records[1].query == "async=1"
    assert records[0].path == "/v1/nucleus/dataset/ds_test/append"


# --------------------------------------------------------------------------- faults


def test_status_faults_answer_in_order_and_store_nothing(devserver: DevServer) -> None:
    devserver.inject_faults("500", "503", "429", retry_after_seconds=7)
    with requests.Session() as session:
        answers = [append(devserver, files=one_image_form(), session=session) for _ in range(4)]
    assert [answer.status_code for answer in answers] == [500, 503, 429, 200]
    assert answers[2].headers["Retry-After"] == "7"
    assert "Retry-After" not in answers[0].headers
    assert [r.fault for r in devserver.requests()] == ["500", "503", "429", None]
    assert devserver.items("ds_test")["a"].times_written == 1


def test_faults_hit_append_routes_only(devserver: DevServer) -> None:
    devserver.inject_faults("500")
    info = requests.get(f"{devserver.base_url}/dataset/ds_test/info", auth=AUTH, timeout=10)
    assert info.status_code == 200
    assert append(devserver, files=one_image_form()).status_code == 500


def test_reset_fault_breaks_the_connection_mid_body(devserver: DevServer, tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    write_large_jpeg(path, 4 * 1024 * 1024, seed=1)
    devserver.inject_faults("reset")
    with (
        path.open("rb") as image_file,
        pytest.raises(requests.exceptions.ConnectionError),
    ):
        append(
            devserver,
            files=[
                ("items", (None, json.dumps([item("big", "big.jpg")]), "application/json")),
                ("image", ("big.jpg", image_file, "image/jpeg")),
            ],
        )
    assert devserver.items("ds_test") == {}
    assert devserver.requests()[-1].fault == "reset"
    assert devserver.requests()[-1].status == 0
    assert append(devserver, files=one_image_form()).status_code == 200


def test_reset_fault_on_a_small_body_is_a_connection_reset(devserver: DevServer) -> None:
    devserver.inject_faults("reset")
    with pytest.raises(requests.exceptions.ConnectionError) as raised:
        append(devserver, files=one_image_form())
    assert "reset" in repr(raised.value).lower()
    assert devserver.items("ds_test") == {}


def test_stall_fault_holds_the_answer(devserver: DevServer) -> None:
    devserver.inject_faults("stall")
    with pytest.raises(requests.exceptions.ReadTimeout):
        append(devserver, files=one_image_form(), timeout=(5.0, 0.5))
    assert devserver.items("ds_test") == {}
    assert append(devserver, files=one_image_form()).status_code == 200
    # The fixture's stop() must end the stalled connection without waiting 300 s.


def test_drip_fault_sends_the_body_slowly(devserver: DevServer) -> None:
    devserver.inject_faults("drip")
    response = append(devserver, files=one_image_form(), timeout=(5.0, 0.3), stream=True)
    assert response.status_code == 200
    with pytest.raises(requests.exceptions.ConnectionError, match="timed out"):
        response.content  # noqa: B018 - reading the body is the point
    response.close()
    # Answered 200, so the items were stored.
    assert "a" in devserver.items("ds_test")


def test_drip_fault_body_arrives_whole(tmp_path: Path) -> None:
    with DevServer(data_dir=tmp_path / "drip", drip_byte_interval_seconds=0.002) as server:
        server.inject_faults("drip")
        response = append(server, files=one_image_form())
        assert response.status_code == 200
        assert response.json()["new_items"] == 1


def test_lost_fault_stores_then_drops_the_answer(devserver: DevServer) -> None:
    devserver.inject_faults("lost")
    with pytest.raises(requests.exceptions.ConnectionError):
        append(devserver, files=one_image_form("a", frame=1))
    assert devserver.items("ds_test")["a"].metadata == {"frame": 1}

    resent = append(devserver, files=one_image_form("a", frame=1))
    assert resent.status_code == 200
    assert resent.json()["ignored_items"] == 1
    assert devserver.append_request_count() == 2


def test_down_answers_503_everywhere_until_up(devserver: DevServer) -> None:
    devserver.set_down(True)
    info_url = f"{devserver.base_url}/dataset/ds_test/info"
    assert requests.get(info_url, auth=AUTH, timeout=10).status_code == 503
    assert append(devserver, files=one_image_form()).status_code == 503
    assert devserver.items("ds_test") == {}
    devserver.set_down(False)
    assert append(devserver, files=one_image_form()).status_code == 200


def test_fault_rate(devserver: DevServer) -> None:
    devserver.set_fault_rate(1.0, ["503"])
    assert append(devserver, files=one_image_form()).status_code == 503
    devserver.set_fault_rate(0.5, ["500", "429"], seed=3, retry_after_seconds=0.25)
    with requests.Session() as session:
        statuses = [
            append(devserver, files=one_image_form(f"r{i}"), session=session).status_code
            for i in range(30)
        ]
    assert set(statuses) == {200, 500, 429}
    assert len(devserver.items("ds_test")) == statuses.count(200)
    devserver.set_fault_rate(0, [])
    assert append(devserver, files=one_image_form("last")).status_code == 200


def test_unknown_fault_kind_is_refused(devserver: DevServer) -> None:
    with pytest.raises(ValueError, match="explode"):
        devserver.inject_faults("explode")


# --------------------------------------------------------------------------- persistence


def test_restart_on_the_same_folder_remembers_items(tmp_path: Path) -> None:
    data_dir = tmp_path / "kept"
    image = jpeg_bytes(seed=20)
    with DevServer(data_dir=data_dir) as first:
        form = list_form([item("a", "a.jpg", {"frame": 1})], {"a.jpg": image})
        assert append(first, files=form).status_code == 200
        assert append(first, files=one_image_form("gone", seed=2)).status_code == 200
        gone_url = f"{first.base_url}/dataset/ds_test/refloc/gone"
        assert requests.delete(gone_url, auth=AUTH, timeout=10).status_code == 200

    with DevServer(data_dir=data_dir) as second:
        kept = second.items("ds_test")
        assert set(kept) == {"a"}
        assert kept["a"].metadata == {"frame": 1}
        assert second.image_bytes(sha(image)) == image
        resent = append(second, files=form)
        assert resent.json()["ignored_items"] == 1
        conflict = append(second, files=one_image_form("b", seed=3, frame="one"))
        assert conflict.status_code == 400


def test_stop_ends_idle_and_stalled_connections_and_joins_their_threads(tmp_path: Path) -> None:
    server = DevServer(data_dir=tmp_path / "stop").start()
    idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        idle.request(
            "GET", "/v1/nucleus/dataset/ds_test/info", headers={"Authorization": "Basic azo="}
        )
        assert idle.getresponse().read()  # the connection now idles in keep-alive
        server.inject_faults("stall")
        with pytest.raises(requests.exceptions.ReadTimeout):
            append(server, files=one_image_form(), timeout=(5.0, 0.2))
    finally:
        server.stop()
        idle.close()
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("devserver-")]
    assert leftover == []


def test_without_a_data_dir_the_temporary_folder_is_removed(tmp_path: Path) -> None:
    server = DevServer().start()
    try:
        folder = server.data_dir
        assert append(server, files=one_image_form()).status_code == 200
        assert any((folder / "images").iterdir())
    finally:
        server.stop()
    assert not folder.exists()
    server.stop()  # idempotent


# --------------------------------------------------------------------------- link rate


def test_link_rate_is_one_link_shared_by_every_connection(tmp_path: Path) -> None:
    rate = 512 * 1024
    images = [jpeg_bytes(seed=seed) + b"\0" * 400_000 for seed in range(2)]
    with DevServer(data_dir=tmp_path / "link", link_rate_bytes_per_second=rate) as server:
        answers: list[int] = []

        def send(index: int) -> None:
            filename = f"/cam/{index}.jpg"
            form = list_form([item(f"r{index}", filename)], {filename: images[index]})
            answers.append(append(server, files=form, timeout=30).status_code)

        started = time.monotonic()
        senders = [threading.Thread(target=send, args=(index,)) for index in range(2)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(60)
        seconds = time.monotonic() - started

    assert answers == [200, 200]
    # ~800 kB through one 512 KiB/s link: both share it, so together they take ~1.5 s (the
    # bucket starts with one burst in hand); two links of that rate would take half as long.
    body_bytes = sum(len(image) for image in images)
    assert seconds >= (body_bytes - 2 * 64 * 1024) / rate * 0.95


def test_link_rate_option_is_checked_on_the_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "watcher", "devserver", "--link-rate", "fast"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "argument --link-rate: cannot read 'fast' as a rate" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- command line


@pytest.fixture
def cli_process(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    code = (
        "import sys; from pathlib import Path; from watcher.devserver import serve_forever_cli; "
        "sys.exit(serve_forever_cli('127.0.0.1', 0, Path(sys.argv[1]), None, 0.0, []))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "cli")],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield process
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=10)


def test_cli_prints_base_url_logs_requests_and_exits_0_on_sigterm(
    cli_process: subprocess.Popen[str],
) -> None:
    assert cli_process.stdout is not None
    base_url = cli_process.stdout.readline().strip()
    assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1/nucleus")

    info = requests.get(f"{base_url}/dataset/ds_cli/info", auth=("cli-key-789", ""), timeout=10)
    assert info.status_code == 200

    cli_process.send_signal(signal.SIGTERM)
    _, stderr = cli_process.communicate(timeout=15)
    assert cli_process.returncode == 0
    assert "GET /v1/nucleus/dataset/ds_cli/info 200" in stderr
    assert "cli-key-789" not in stderr


# --------------------------------------------------------------------------- official client


@pytest.mark.official
def test_official_client_append_is_stored_faithfully(
    devserver: DevServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nucleus = pytest.importorskip("nucleus")
    async_job = pytest.importorskip("nucleus.async_job")
    monkeypatch.setattr(async_job, "JOB_POLLING_INTERVAL", 0)  # sleep_until_complete polls
    digests: dict[str, str] = {}
    items = []
    for index in range(12):
        path = tmp_path / "frames" / f"frame {index:03d}.jpg"  # a space, to test quoting
        digests[f"frame-{index}"] = sha(write_jpeg(path, seed=100 + index))
        items.append(
            nucleus.DatasetItem(
                image_location=str(path),
                reference_id=f"frame-{index}",
                metadata={"index": index, "camera": "back", "night": index % 2 == 0},
            )
        )

    client = nucleus.NucleusClient("official-key", endpoint=devserver.base_url)
    dataset = client.get_dataset("ds_x")
    job = dataset.append(items)
    job.sleep_until_complete(verbose_std_out=False)

    appends = [r for r in devserver.requests() if r.path.endswith("/append")]
    # Two requests in flight at once, so either may be recorded first.
    assert sorted((r.query, r.status, r.item_count) for r in appends) == [
        ("async=1", 200, 2),
        ("async=1", 200, 10),
    ]
    stored = devserver.items("ds_x")
    assert set(stored) == set(digests)
    for index in range(12):
        kept = stored[f"frame-{index}"]
        assert kept.metadata == {"index": index, "camera": "back", "night": index % 2 == 0}
        assert kept.image_sha256 == digests[f"frame-{index}"]
        assert kept.image_url == str(tmp_path / "frames" / f"frame {index:03d}.jpg")
        assert (
            devserver.image_bytes(kept.image_sha256)
            == (tmp_path / "frames" / f"frame {index:03d}.jpg").read_bytes()
        )

    assert dataset.info().length == 12
    assert dataset.refloc("frame-3")["item"].metadata["index"] == 3
    dataset.delete_item("frame-3")
    assert "frame-3" not in devserver.items("ds_x")
    # Remote items go through a presigned-URL upload first, which the devserver does not offer.
