"""The record schema: strict parsing, one-line errors naming the field."""

import json

import pytest

from did_cli.errors import InputError
from did_cli.records import Record, parse_record


def _record(i: int = 0, **overrides) -> Record:
    body = dict(id=i, tokens=[0, 5, 6], confidence=[1.0, 0.5, 0.25], prompt_len=1, text="ab")
    return Record(**{**body, **overrides})


def _body(**overrides) -> str:
    body = {"id": 0, "tokens": [0, 5, 6], "confidence": [1.0, 0.5, 0.25], "prompt_len": 1}
    body.update(overrides)
    return json.dumps(body)


MALFORMED = [
    ('{"id": 0, "tokens": [0, 1], "confidence": [1.0, NaN], "prompt_len": 1}', "not valid JSON"),
    ('{"id": 0, "tokens": [0, 1], "confidence": [1.0, Infinity], "prompt_len": 1}', "not valid JSON"),
    (_body(id="abc"), "id must be a non-negative integer"),
    (_body(id=None), "id must be a non-negative integer"),
    (_body(id=True), "id must be a non-negative integer"),
    (_body(tokens=[], confidence=[]), "tokens must be a non-empty list"),
    (_body(tokens=True), "tokens must be a non-empty list"),
    (_body(tokens=[0, True, 1]), "tokens must be a non-empty list"),
    (_body(confidence=[1.0, 0.5]), "confidence must be a list as long as tokens"),
    (_body(confidence=[1.0, 2.0, 0.1]), "finite probabilities"),
    (_body(confidence=[1.0, 10**400, 0.1]), "finite probabilities"),  # a 401-digit integer overflows a float
    (_body(prompt_len=3), "prompt_len must be an integer"),
    (_body(stages=None), "stages must be a list of objects"),
    (_body(stages=[1]), "stages must be a list of objects"),
    (_body(model="x"), "model must be an object"),
    (_body(model=None), "model must be an object"),
    (_body(tokenizer=[1, 2]), "tokenizer must be an object"),
    (_body(text=5), "text must be a string"),
    (_body(seed="1"), "seed must be an integer"),
    (_body(draft_tokens="x"), "draft_tokens must be a list"),
    ("[1, 2]", "expected a JSON object"),
    ('{"id": 0}', "record lacks tokens"),
]


@pytest.mark.parametrize("line,message", MALFORMED)
def test_malformed_records_are_one_line_input_errors(line, message):
    with pytest.raises(InputError, match="in.jsonl line 3") as info:
        parse_record(line, "in.jsonl line 3")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_valid_record_round_trips_and_null_optionals_take_defaults():
    record = parse_record(_body(text=None, prompt=None, device=None), "x")
    assert record.text == "" and record.prompt is None
    assert parse_record(_record(7).to_json(), "x") == _record(7)


def test_only_a_variable_length_drafts_final_generated_eos_is_its_terminating_eos():
    varlen, fixed = [{"kind": "draft", "var_length": True}], [{"kind": "draft", "var_length": False}]
    assert _record(tokens=[0, 5, 9], stages=varlen).terminating_eos(9) == 2
    assert _record(tokens=[0, 5, 9], stages=[*varlen, {"kind": "refine"}]).terminating_eos(9) == 2
    assert _record(tokens=[0, 5, 9], stages=fixed).terminating_eos(9) is None  # a fixed-length draft ends anywhere
    assert _record(tokens=[0, 5, 9], stages=[]).terminating_eos(9) is None  # legacy records: no var_length
    assert _record(tokens=[0, 9, 6], stages=varlen).terminating_eos(9) is None  # ran to its length (or was cut)
    assert _record(tokens=[0, 5, 9], stages=varlen).terminating_eos(None) is None
