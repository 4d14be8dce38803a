"""Reading a batch input file: line errors go to the error file, whole-file errors name the line."""

from __future__ import annotations

import json

import pytest

from gateway.batch_lines import FileInvalid, parse_file

EMB = "/v1/embeddings"


def jsonl(*lines) -> bytes:
    return b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines)


def good(custom_id: str) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": EMB, "body": {"model": "m", "input": "x"}}


def test_valid_and_invalid_lines_are_told_apart_and_blank_lines_skipped():
    content = jsonl(good("a"), b"", b"{oops", good("b") | {"url": "/v1/completions"},
                    good("c") | {"body": {"model": "m", "input": "x", "stream": True}}, good("d"))
    parsed = parse_file("batch_x", content, EMB, max_lines=10)
    assert [line["custom_id"] for line in parsed.valid] == ["a", "d"] and parsed.total == 5
    errors = {number: json.loads(raw) for number, raw in parsed.errors.items()}
    assert sorted(errors) == [3, 4, 5]
    assert errors[3]["custom_id"] is None and errors[3]["error"]["code"] == "invalid_json"
    assert errors[4]["error"]["code"] == "invalid_url"
    assert "stream" in errors[5]["error"]["message"]


@pytest.mark.parametrize("content, code, line", [
    (jsonl(good("a"), good("a")), "duplicate_custom_id", 2),
    (jsonl(good("a"), {"method": "POST"}), "missing_required_parameter", 2),
    (jsonl(good("a"), good("b"), good("c")), "too_many_lines", 3),
    (b"\n\n", "empty_file", None),
])
def test_a_file_invalid_as_a_whole_names_the_line(content, code, line):
    with pytest.raises(FileInvalid) as invalid:
        parse_file("batch_x", content, EMB, max_lines=2)
    [error] = invalid.value.errors
    assert (error.code, error.line) == (code, line)
