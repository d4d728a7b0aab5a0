"""Reading samples: did records, .jsonl with a text field, plain .txt; malformed lines named by number."""

import re

import pytest

from did_cli.errors import InputError
from did_cli.evaluation import Sample, read_samples
from did_cli.records import Record


def test_did_records_give_their_text_prompt_and_id(tmp_path):
    path = tmp_path / "drafts.jsonl"
    records = [
        Record(id=4, tokens=[67, 0, 1], confidence=[1.0, 0.5, 0.5], prompt_len=1, text="ab"),
        Record(id=5, tokens=[67, 2, 3], confidence=[1.0, 1.0, 0.5], prompt_len=2, text="d", prompt="c"),
    ]
    path.write_text("".join(r.to_json() + "\n" for r in records))
    assert read_samples(path) == [Sample("ab", None, 1, 4, 3), Sample("d", "c", 2, 5, 3)]


def test_jsonl_with_a_text_field_and_blank_lines(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "prompt": null}\n')
    assert read_samples(path) == [Sample("one", line=1), Sample("two", line=3)]


def test_txt_holds_one_sample_per_line_kept_verbatim(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text(' leading space\n{"not": "json"}\r\n\n')
    assert read_samples(path) == [Sample(" leading space", line=1), Sample('{"not": "json"}', line=2)]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('{"text": "ok"}\n{"text": "cut', "line 2: not valid JSON"),
        ('{"text": "ok"}\n\n[1, 2]', "line 3: expected a JSON object"),
        ('{"text": "ok"}\n{"tokens": [1]}', "line 2: record lacks id, confidence"),
        ('{"text": 3}', "line 1: no text field"),
        ('{"text": "ok", "prompt": 5}', "line 1: prompt must be a string or null"),
        ("plain words", "line 1: not valid JSON (Expecting value; for plain text with one sample per line, name"),
    ],
)
def test_malformed_lines_are_reported_with_their_number(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(lines)
    with pytest.raises(InputError, match=re.escape(f"{path} {message}")):
        read_samples(path)


def test_missing_empty_and_non_utf8_inputs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_samples(tmp_path / "nope.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(InputError, match="holds no samples"):
        read_samples(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        read_samples(tmp_path / "latin1.txt")
