"""Reading demo files: both line forms, and messages that name the file, the line and the field."""

import json

import pytest

from domex.store.demos import Demo, read_demos
from domex.errors import DemoError


def write(tmp_path, lines, name="demos.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_reads_both_forms_and_skips_blank_lines(tmp_path):
    path = write(tmp_path, [
        json.dumps({"prompt": "What is 2+2?", "response": "4", "source": "ignored"}),
        "",
        json.dumps({"text": "def f(x):\n    return x"}),
    ])
    demos = read_demos(path)
    assert demos == [Demo("What is 2+2?", "4"), Demo(None, "def f(x):\n    return x")]
    assert demos[0].is_chat and not demos[1].is_chat
    assert demos[0].text == "What is 2+2?\n\n4" and demos[1].text == "def f(x):\n    return x"
    assert [Demo.from_json(d.to_json()) for d in demos] == demos


def test_invalid_json_names_file_and_line(tmp_path):
    path = write(tmp_path, [json.dumps({"text": "fine"}), "", '{"text": "broken'])
    with pytest.raises(DemoError) as e:
        read_demos(path)
    assert f"{path}:3:" in str(e.value) and "invalid JSON" in str(e.value)


@pytest.mark.parametrize(
    "line, field",
    [({"prompt": "q"}, "'response'"), ({"response": "a"}, "'prompt'"), ({"body": "x"}, "'text'")],
)
def test_missing_field_is_named(tmp_path, line, field):
    path = write(tmp_path, [json.dumps({"text": "ok"}), json.dumps({"text": "ok"}), json.dumps(line)])
    with pytest.raises(DemoError) as e:
        read_demos(path)
    msg = str(e.value)
    assert f"{path}:3:" in msg and f"missing field {field}" in msg


def test_wrong_types_are_refused(tmp_path):
    with pytest.raises(DemoError, match=r":1: field 'text' must be a non-empty string"):
        read_demos(write(tmp_path, [json.dumps({"text": 5})]))
    with pytest.raises(DemoError, match=r":1: expected a JSON object"):
        read_demos(write(tmp_path, [json.dumps(["text", "x"])]))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_refused(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DemoError) as e:
        read_demos(path)
    assert str(path) in str(e.value) and "no demos" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(DemoError, match="not found"):
        read_demos(tmp_path / "nope.jsonl")
