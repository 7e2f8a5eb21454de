"""Path rules: captures, templates, typed values, merge order, and what is refused at load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from watcher.config import WatchSettings, load_settings
from watcher.errors import ConfigError, PathRuleError
from watcher.rules import Classification, RuleSet, compile_watch

MTIME_NS = 1_700_000_000_123_456_789  # 2023-11-14T22:13:20.123456789Z

WEATHER_RULES: list[dict[str, Any]] = [
    {"match": "{weather}/**", "metadata": {"weather": "{weather}"}},
    {
        "regex": r"(?P<date>\d{4}-\d{2}-\d{2})/frame_(?P<frame>\d+)",
        "metadata": {"Recording Date": "{date}", "frame": "{frame:int}"},
    },
]


def make_rule_set(device: str = "cam1", **fields: Any) -> RuleSet:
    fields.setdefault("path", "/srv/camera")
    fields.setdefault("dataset_id", "ds_test")
    return RuleSet(WatchSettings.model_validate(fields).compiled_rules, device, "watch[0]")


def classify(rule_set: RuleSet, relpath: str, **kwargs: Any) -> Classification:
    return rule_set.classify(relpath, mtime_ns=MTIME_NS, **kwargs)


def config_problems(tmp_path: Path, toml_text: str) -> list[str]:
    config_file = tmp_path / "config.toml"
    config_file.write_text(toml_text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file, environ={})
    return caught.value.problems


WATCH_HEADER = '[[watch]]\npath = "/srv/camera"\ndataset_id = "ds_a"\n'


# ---------------------------------------------------------------------------------------------
# Captures and templates


@pytest.mark.parametrize("weather", ["Sunny", "Foggy", "Rainy"])
def test_glob_capture_names_the_weather_folder(weather: str) -> None:
    rule_set = make_rule_set(rules=WEATHER_RULES)

    shallow = classify(rule_set, f"{weather}/img_1.jpg")
    deep = classify(rule_set, f"{weather}/morning/east/img_2.jpg")

    assert shallow.metadata == {"weather": weather}
    assert deep.metadata == {"weather": weather}


def test_a_file_at_the_root_matches_no_folder_rule() -> None:
    rule_set = make_rule_set(rules=WEATHER_RULES)

    assert classify(rule_set, "img_1.jpg").metadata == {}


def test_regex_int_capture_becomes_a_json_number() -> None:
    rule_set = make_rule_set(rules=WEATHER_RULES)

    result = classify(rule_set, "Sunny/2024-05-01/frame_007.jpg")

    assert result.metadata == {"weather": "Sunny", "Recording Date": "2024-05-01", "frame": 7}
    assert type(result.metadata["frame"]) is int
    assert '"frame":7' in json.dumps(result.metadata, separators=(",", ":"))
    assert rule_set.metadata_types["frame"] is int
    assert rule_set.metadata_types["Recording Date"] is str


def test_float_and_bool_conversions() -> None:
    rule_set = make_rule_set(
        rules=[
            {
                "regex": r"exp_(?P<exposure>[^_]+)_ir_(?P<ir>[^.]+)",
                "metadata": {"exposure": "{exposure:float}", "infrared": "{ir:bool}"},
            }
        ]
    )

    for word, expected in [("Yes", True), ("off", False), ("1", True), ("FALSE", False)]:
        result = classify(rule_set, f"exp_0.25_ir_{word}.jpg")
        assert result.metadata == {"exposure": 0.25, "infrared": expected}
        assert type(result.metadata["infrared"]) is bool


def test_a_typed_value_inside_text_is_normalised_text() -> None:
    rule_set = make_rule_set(rules=[{"match": "frame_{n}.jpg", "metadata": {"label": "f{n:int}"}}])

    assert classify(rule_set, "frame_007.jpg").metadata == {"label": "f7"}


def test_static_metadata_merges_first_then_rules_in_order() -> None:
    rule_set = make_rule_set(
        metadata={"camera": "back", "site": "north", "calibrated": True},
        rules=[
            {"match": "front/**", "metadata": {"camera": "front", "lens": "wide"}},
            {"match": "**/*.png", "metadata": {"lens": "macro"}},
            {"match": "nowhere/**", "metadata": {"site": "south"}},
        ],
    )

    assert classify(rule_set, "back/a.jpg").metadata == {
        "camera": "back",
        "site": "north",
        "calibrated": True,
    }
    assert classify(rule_set, "front/a.png").metadata == {
        "camera": "front",
        "site": "north",
        "calibrated": True,
        "lens": "macro",
    }


def test_every_builtin_variable() -> None:
    sha256_calls: list[int] = []

    def content_sha256() -> str:
        sha256_calls.append(1)
        return "ab" * 32

    rule_set = make_rule_set(
        device="cam7",
        reference_id="{device}/{sha256}",
        metadata={
            "relpath": "{relpath}",
            "name": "{name}",
            "stem": "{stem}",
            "ext": "{ext}",
            "parent": "{parent}",
            "device": "{device}",
            "sha256": "{sha256}",
            "mtime": "{mtime}",
        },
    )

    nested = classify(rule_set, "2024/May/Shot 1.tar.JPG", sha256=content_sha256)
    at_root = classify(rule_set, "README", sha256=content_sha256)

    assert nested.metadata == {
        "relpath": "2024/May/Shot 1.tar.JPG",
        "name": "Shot 1.tar.JPG",
        "stem": "Shot 1.tar",
        "ext": "jpg",
        "parent": "2024/May",
        "device": "cam7",
        "sha256": "ab" * 32,
        "mtime": "2023-11-14T22:13:20.123456Z",
    }
    assert nested.reference_id == "cam7/" + "ab" * 32
    assert (at_root.metadata["parent"], at_root.metadata["ext"]) == ("", "")
    assert rule_set.needs_sha256
    assert len(sha256_calls) == 2  # once per file, although two templates use it


def test_sha256_is_not_computed_when_no_template_uses_it() -> None:
    calls: list[int] = []

    def content_sha256() -> str:
        calls.append(1)
        return "00" * 32

    rule_set = make_rule_set(rules=WEATHER_RULES)
    classify(rule_set, "Sunny/a.jpg", sha256=content_sha256)

    assert not rule_set.needs_sha256
    assert calls == []


def test_mtime_without_fraction_has_no_fraction() -> None:
    rule_set = make_rule_set(metadata={"taken": "{mtime}"})

    result = rule_set.classify("a.jpg", mtime_ns=1_700_000_000 * 1_000_000_000)

    assert result.metadata == {"taken": "2023-11-14T22:13:20Z"}


@pytest.mark.parametrize(
    ("pattern", "relpath", "expected"),
    [
        ("a/**/b.jpg", "a/b.jpg", True),  # ** may stand for no folder at all
        ("a/**/b.jpg", "a/x/y/b.jpg", True),
        ("**/b.jpg", "b.jpg", True),
        ("*.jpg", "sub/b.jpg", False),  # * stays within one segment
        ("*.jpg", "b.jpg", True),
        ("img_?.jpg", "img_1.jpg", True),
        ("img_?.jpg", "img_12.jpg", False),
        ("[ab]*.jpg", "b1.jpg", True),
        ("[!ab]*.jpg", "b1.jpg", False),
        ("[!ab]*.jpg", "c1.jpg", True),
        ("cam/**", "cam/x.jpg", True),
        ("cam/**", "camera/x.jpg", False),
        ("{day}/*.jpg", "x/y/z.jpg", False),  # a capture is exactly one segment
        ("{{raw}}/*.jpg", "{raw}/z.jpg", True),
    ],
)
def test_glob_semantics(pattern: str, relpath: str, expected: bool) -> None:
    rule_set = make_rule_set(rules=[{"match": pattern, "metadata": {"hit": True}}])

    assert ("hit" in classify(rule_set, relpath).metadata) is expected


def test_capture_of_part_of_a_segment() -> None:
    rule_set = make_rule_set(
        rules=[{"match": "{day}/frame_{n}.jpg", "metadata": {"day": "{day}", "n": "{n:int}"}}]
    )

    assert classify(rule_set, "mon/frame_42.jpg").metadata == {"day": "mon", "n": 42}


def test_escaped_braces_are_literal() -> None:
    rule_set = make_rule_set(metadata={"note": "{{not a variable}} {name}"})

    assert classify(rule_set, "a.jpg").metadata == {"note": "{not a variable} a.jpg"}


def test_optional_regex_group_drops_a_typed_key_and_blanks_text() -> None:
    rule_set = make_rule_set(
        rules=[
            {
                "regex": r"shot(?:_(?P<n>\d+))?\.jpg$",
                "metadata": {"n": "{n:int}", "label": "shot {n}"},
            }
        ]
    )

    assert classify(rule_set, "shot_3.jpg").metadata == {"n": 3, "label": "shot 3"}
    assert classify(rule_set, "shot.jpg").metadata == {"label": "shot "}


def test_remote_url_is_rendered_and_http_paths_are_percent_encoded() -> None:
    https_rules = make_rule_set(remote_url="https://cdn.example/img/{relpath}")
    bucket_rules = make_rule_set(remote_url="s3://bucket/{device}/{relpath}")

    assert (
        classify(https_rules, "a b/c#1.jpg").remote_url == "https://cdn.example/img/a%20b/c%231.jpg"
    )
    assert classify(bucket_rules, "a b/c.jpg").remote_url == "s3://bucket/cam1/a b/c.jpg"
    assert classify(make_rule_set(), "a.jpg").remote_url is None


# ---------------------------------------------------------------------------------------------
# What a file's path can break at run time


def test_newline_in_a_file_name_used_in_reference_id_is_a_path_rule_error() -> None:
    rule_set = make_rule_set(reference_id="{device}/{relpath}")

    with pytest.raises(PathRuleError) as caught:
        classify(rule_set, "day1/bad\nname.jpg")

    assert str(caught.value) == (
        "reference_id 'cam1/day1/bad\\nname.jpg' contains a control character (U+000A)"
    )
    assert "\n" not in str(caught.value)


def test_int_conversion_failure_is_a_path_rule_error() -> None:
    rule_set = make_rule_set(rules=[{"match": "frame_{n}.jpg", "metadata": {"frame": "{n:int}"}}])

    with pytest.raises(PathRuleError) as caught:
        classify(rule_set, "frame_abc.jpg")

    assert str(caught.value) == "metadata 'frame' (watch[0].rules[0]): {n} = 'abc' is not an int"


def test_overlong_reference_id_is_a_path_rule_error() -> None:
    rule_set = make_rule_set()

    with pytest.raises(PathRuleError) as caught:
        classify(rule_set, "d/" + "x" * 1100 + ".jpg")

    assert str(caught.value) == "reference_id is 1106 characters long; the limit is 1024"


# ---------------------------------------------------------------------------------------------
# metadata_sha256


def test_metadata_sha256_is_stable_for_the_same_rules_and_path() -> None:
    first = classify(make_rule_set(rules=WEATHER_RULES), "Sunny/2024-05-01/frame_1.jpg")
    again = classify(make_rule_set(rules=WEATHER_RULES), "Sunny/2024-05-01/frame_1.jpg")

    canonical = json.dumps(
        {"metadata": first.metadata, "reference_id": first.reference_id, "remote_url": None},
        sort_keys=True,
        separators=(",", ":"),
    )
    assert first == again
    assert first.metadata_sha256 == hashlib.sha256(canonical.encode()).hexdigest()


def test_metadata_sha256_changes_when_rules_change_what_is_sent() -> None:
    relpath = "Sunny/2024-05-01/frame_1.jpg"
    before = classify(make_rule_set(rules=WEATHER_RULES), relpath)
    more_rules = [*WEATHER_RULES, {"match": "**/*.jpg", "metadata": {"format": "jpeg"}}]
    after_new_rule = classify(make_rule_set(rules=more_rules), relpath)
    after_new_id = classify(make_rule_set(rules=WEATHER_RULES, reference_id="x/{relpath}"), relpath)
    after_remote = classify(
        make_rule_set(rules=WEATHER_RULES, remote_url="s3://b/{relpath}"), relpath
    )

    hashes = {
        before.metadata_sha256,
        after_new_rule.metadata_sha256,
        after_new_id.metadata_sha256,
        after_remote.metadata_sha256,
    }
    assert len(hashes) == 4


# ---------------------------------------------------------------------------------------------
# Refused at load


@pytest.mark.parametrize(
    ("toml_tail", "expected"),
    [
        pytest.param(
            '[[watch.rules]]\nmatch = "{day}/**"\nmetadata = { day = "{dya}" }\n',
            "config.toml: at 'watch[0].rules[0].metadata.day': unknown variable {dya}; known: "
            "day, device, ext, mtime, name, parent, relpath, sha256, stem",
            id="unknown-variable-in-rule",
        ),
        pytest.param(
            'metadata = { day = "{day}" }\n[[watch.rules]]\nmatch = "{day}/**"\n',
            "config.toml: at 'watch[0].metadata.day': unknown variable {day} "
            "(a capture is only known inside its own rule)",
            id="capture-in-static-metadata",
        ),
        pytest.param(
            '[[watch.rules]]\nmatch = "{n}.jpg"\nmetadata = { n = "{n:str}" }\n',
            "config.toml: at 'watch[0].rules[0].metadata.n': unknown type ':str' in '{n:str}'; "
            "use :int, :float or :bool",
            id="unknown-type",
        ),
        pytest.param(
            '[[watch.rules]]\nmatch = "a/{n}.jpg"\nmetadata = { n = "{n:int}" }\n'
            '[[watch.rules]]\nmatch = "b/{n}.jpg"\nmetadata = { n = "{n}" }\n',
            "config.toml: at 'watch[0].rules[1].metadata.n': gives 'n' text, but "
            "'rules[0].metadata.n' of this watch gives it a number; a metadata key keeps one "
            "type in a dataset",
            id="type-conflict-in-one-watch",
        ),
        pytest.param(
            'reference_id = "{parent}{ext}"\n',
            "config.toml: at 'watch[0].reference_id': can render empty: {parent} and {ext} are "
            "empty for some files; add text or {relpath}",
            id="reference-id-can-render-empty",
        ),
        pytest.param(
            'reference_id = "{relpath}\\u0007"\n',
            "config.toml: at 'watch[0].reference_id': contains a control character (U+0007)",
            id="reference-id-control-character",
        ),
        pytest.param(
            'reference_id = "{weather}/{relpath}"\n',
            "config.toml: at 'watch[0].reference_id': unknown variable {weather} "
            "(a capture is only known inside its own rule)",
            id="reference-id-with-capture",
        ),
        pytest.param(
            "[[watch.rules]]\nregex = '(?P<frame>\\d+'\n",
            "config.toml: at 'watch[0].rules[0].regex': is not a valid regular expression: "
            "missing ), unterminated subpattern at position 0",
            id="bad-regex",
        ),
        pytest.param(
            '[[watch.rules]]\nmatch = "{name}/*.jpg"\n',
            "config.toml: at 'watch[0].rules[0].match': capture {name} has the name of a built-in "
            "variable; rename it",
            id="capture-hides-builtin",
        ),
        pytest.param(
            '[[watch.rules]]\nmatch = "day/{n}/{x:int}.jpg"\n',
            "config.toml: at 'watch[0].rules[0].match': capture '{x:int}' cannot have a type; "
            "convert it in the metadata template instead",
            id="typed-capture",
        ),
        pytest.param(
            '[[watch.rules]]\nmatch = "{n}/{n}.jpg"\n',
            "config.toml: at 'watch[0].rules[0].match': capture '{n}' appears twice",
            id="capture-twice",
        ),
        pytest.param(
            '[[watch.rules]]\nmatch = "day/{a/b}.jpg"\n',
            "config.toml: at 'watch[0].rules[0].match': '{a/b}' is not a variable name",
            id="capture-across-segments",
        ),
        pytest.param(
            '[[watch.rules]]\nmatch = "/day/*.jpg"\n',
            "config.toml: at 'watch[0].rules[0].match': is relative to the watch path; drop the "
            "leading '/'",
            id="absolute-glob",
        ),
        pytest.param(
            'metadata = { a = "{name" }\n',
            "config.toml: at 'watch[0].metadata.a': '{' at position 0 is not closed; write '{{' "
            "for a literal brace",
            id="unclosed-brace",
        ),
        pytest.param(
            'metadata = { a = "x}" }\n',
            "config.toml: at 'watch[0].metadata.a': '}' at position 1 has no opening '{'; write "
            "'}}' for a literal brace",
            id="lone-closing-brace",
        ),
        pytest.param(
            'remote_url = "bucket/{relpath}"\n',
            "config.toml: at 'watch[0].remote_url': must start with gs://, s3://, http:// or "
            "https:// (got 'bucket/{relpath}')",
            id="remote-url-scheme",
        ),
        pytest.param(
            '[[watch.rules]]\nmatch = "day/[ab.jpg"\n',
            "config.toml: at 'watch[0].rules[0].match': '[ab.jpg' opens a '[' class that is not "
            "closed",
            id="unclosed-class",
        ),
    ],
)
def test_bad_rules_are_refused_at_load(tmp_path: Path, toml_tail: str, expected: str) -> None:
    assert config_problems(tmp_path, WATCH_HEADER + toml_tail) == [expected]


def test_a_long_remote_url_is_clipped_in_its_message(tmp_path: Path) -> None:
    problems = config_problems(tmp_path, WATCH_HEADER + f'remote_url = "bucket/{"a" * 100}"\n')

    assert problems == [
        "config.toml: at 'watch[0].remote_url': must start with gs://, s3://, http:// or "
        f"https:// (got 'bucket/{'a' * 68}...')"
    ]


def test_type_conflict_across_watches_of_one_dataset_is_refused(tmp_path: Path) -> None:
    problems = config_problems(
        tmp_path,
        '[[watch]]\npath = "/srv/a"\ndataset_id = "ds_a"\nmetadata = { exposure = 1.5 }\n'
        '[[watch]]\npath = "/srv/b"\ndataset_id = "ds_a"\nmetadata = { exposure = "long" }\n',
    )

    assert problems == [
        "config.toml: at 'watch[1].metadata.exposure': gives 'exposure' text, but "
        "'watch[0].metadata.exposure' gives it a number in the same dataset ds_a; a metadata key "
        "keeps one type in a dataset"
    ]


def test_different_datasets_may_type_a_key_differently(tmp_path: Path) -> None:
    config_file = tmp_path / "config.toml"
    config_file.write_text(
        '[[watch]]\npath = "/srv/a"\ndataset_id = "ds_a"\nmetadata = { exposure = 1.5 }\n'
        '[[watch]]\npath = "/srv/b"\ndataset_id = "ds_b"\nmetadata = { exposure = "long" }\n'
    )

    settings = load_settings(config_file, environ={})

    assert [rule_set.metadata_types for rule_set in settings.rule_sets] == [
        {"exposure": float},
        {"exposure": str},
    ]


def test_each_key_typed_differently_in_one_dataset_is_one_line(tmp_path: Path) -> None:
    problems = config_problems(
        tmp_path,
        '[[watch]]\npath = "/srv/a"\ndataset_id = "ds_1"\nmetadata = { a = 1, b = true }\n'
        '[[watch]]\npath = "/srv/b"\ndataset_id = "ds_1"\nmetadata = { a = "x", b = "{name}" }\n'
        '[[watch]]\npath = "/srv/c"\ndataset_id = "ds_2"\nmetadata = { a = "x", b = "{name}" }\n',
    )

    assert problems == [
        "config.toml: at 'watch[1].metadata.a': gives 'a' text, but 'watch[0].metadata.a' gives "
        "it a number in the same dataset ds_1; a metadata key keeps one type in a dataset",
        "config.toml: at 'watch[1].metadata.b': gives 'b' text, but 'watch[0].metadata.b' gives "
        "it true/false in the same dataset ds_1; a metadata key keeps one type in a dataset",
    ]


def test_compiling_checks_a_watch_that_skipped_validation() -> None:
    # model_construct skips validation, as a caller building settings by hand might.
    watch = WatchSettings.model_construct(
        path=Path("/srv/x"),
        dataset_id="ds_x",
        reference_id="{nope}",
        metadata={},
        remote_url="",
        rules=(),
    )

    assert compile_watch(watch) == [
        ("reference_id", "unknown variable {nope} (a capture is only known inside its own rule)")
    ]


def test_a_rule_set_renders_from_the_compilation_its_watch_made_at_load(tmp_path: Path) -> None:
    config_file = tmp_path / "config.toml"
    config_file.write_text(
        '[[watch]]\npath = "/srv/a"\ndataset_id = "ds_a"\n'
        '[[watch.rules]]\nmatch = "{weather}/**"\nmetadata = { weather = "{weather}" }\n'
        '[[watch]]\npath = "/srv/b"\ndataset_id = "ds_a"\nreference_id = "b/{relpath}"\n',
        encoding="utf-8",
    )

    settings = load_settings(config_file, environ={})

    assert len(settings.rule_sets) == 2
    assert all(
        rule_set.compiled is watch.compiled_rules
        for rule_set, watch in zip(settings.rule_sets, settings.watch, strict=True)
    )
