"""A served load's request file (`kvscope.measure.serve.load.read_request_file`): CSV and JSONL give the same specs;
arrivals are sorted; every bad row is one line naming the file, its line number and the reason; an empty file, a
folder, a missing file, an unknown extension or a name too long is one line too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvscope.errors import KvscopeError
from kvscope.measure.serve.load import RequestSpec, read_request_file

ROWS = [(0.5, 10, 4), (0.0, 7, 2), (2.25, 100, 1), (0.5, 3, 9)]  # unsorted, two at 0.5


def _csv(tmp_path: Path, text: str, name: str = "r.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _jsonl(tmp_path: Path, objs: list[object], name: str = "r.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return p


def _error(path: Path) -> str:
    with pytest.raises(KvscopeError) as info:
        read_request_file(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"request file {path}")
    return msg.removeprefix(f"request file {path}")


def test_csv_and_jsonl_give_the_same_specs_sorted_by_arrival(tmp_path: Path) -> None:
    csv_path = _csv(tmp_path, "arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{a},{p},{o}\n" for a, p, o in ROWS))
    objs = [{"arrival_s": a, "prompt_tokens": p, "output_tokens": o} for a, p, o in ROWS]
    want = [RequestSpec(1, 0.0, 7, 2), RequestSpec(0, 0.5, 10, 4), RequestSpec(3, 0.5, 3, 9),
            RequestSpec(2, 2.25, 100, 1)]  # ids in the file's order, sorted by arrival (stable)
    assert read_request_file(csv_path) == want
    assert read_request_file(_jsonl(tmp_path, objs)) == want
    assert read_request_file(_jsonl(tmp_path, objs, "r.JSON")) == want


def test_request_ids_columns_in_any_order_extras_blank_lines_and_a_bom(tmp_path: Path) -> None:
    text = "\ufeffnote, request_id ,output_tokens,prompt_tokens,arrival_s\r\nx,70,4,10,1.5\r\n\r\ny,5,2,7,0\r\n"
    want = [RequestSpec(5, 0.0, 7, 2), RequestSpec(70, 1.5, 10, 4)]
    assert read_request_file(_csv(tmp_path, text)) == want
    objs = [{"request_id": 70, "arrival_s": 1.5, "prompt_tokens": 10, "output_tokens": 4, "prompt": "hi"},
            {"request_id": 5, "arrival_s": 0, "prompt_tokens": 7.0, "output_tokens": 2}]
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(objs[0]) + "\n\n   \n" + json.dumps(objs[1]))  # blank lines, no final newline
    assert read_request_file(p) == want


HEADER = "arrival_s,prompt_tokens,output_tokens\n"


@pytest.mark.parametrize(("body", "line", "why"), [
    ("0,1,1\n,1,1\n", 3, "no arrival_s (missing field)"),
    ("0,1,1\n0,,1\n", 3, "no prompt_tokens (missing field)"),
    ("0,1,1\n0,1\n", 3, "2 fields, the header (line 1) names 3"),
    ("abc,1,1\n", 2, "arrival_s 'abc' is not a number"),
    ("0,ten,1\n", 2, "prompt_tokens 'ten' is not a number"),
    ("-0.5,1,1\n", 2, "arrival_s must be finite and >= 0, got '-0.5'"),
    ("0,1,1\n\ninf,1,1\n", 4, "arrival_s must be finite and >= 0, got 'inf'"),
    ("nan,1,1\n", 2, "arrival_s must be finite and >= 0, got 'nan'"),
    ("0,0,1\n", 2, "prompt_tokens must be from 1 to"),
    ("0,1,-3\n", 2, "output_tokens must be from 1 to"),
    ("0,12.5,1\n", 2, "prompt_tokens must be a whole number, got '12.5'"),
    ("0,1,1e99\n", 2, "output_tokens must be from 1 to"),
    ("0,1," + "9" * 5000 + "\n", 2, "output_tokens must be from 1 to"),
    ('0,1,"1\n', 2, "not CSV"),
])
def test_every_bad_csv_row_names_its_line(tmp_path: Path, body: str, line: int, why: str) -> None:
    msg = _error(_csv(tmp_path, HEADER + body))
    assert msg.startswith(f", line {line}: ") and why in msg, msg


@pytest.mark.parametrize(("text", "line", "why"), [
    ("request_id,arrival_s,prompt_tokens,output_tokens\n1,0,1,1\n2,0,1,1\n1,3,1,1\n", 4,
     "request_id 1 is already on line 2 (duplicate request_id)"),
    ("request_id,arrival_s,prompt_tokens,output_tokens\n1,0,1,1\n,0,1,1\n", 3,
     "no request_id (missing field), yet line 2 has one"),
    ("request_id,arrival_s,prompt_tokens,output_tokens\n-1,0,1,1\n", 2, "request_id must be from 0 to"),
    ("request_id,arrival_s,prompt_tokens,output_tokens\n1.5,0,1,1\n", 2, "request_id must be a whole number"),
    ("\n\narrival_s,prompt_tokens\n0,1\n", 3, "the header lacks output_tokens"),
    ("0,1,1\n1,2,2\n", 1, "no header"),
    ("arrival_s,prompt_tokens,output_tokens,arrival_s\n0,1,1,0\n", 1, "the header names arrival_s twice"),
])
def test_ids_and_headers_name_their_line(tmp_path: Path, text: str, line: int, why: str) -> None:
    msg = _error(_csv(tmp_path, text))
    assert msg.startswith(f", line {line}: ") and why in msg, msg


GOOD = {"arrival_s": 0, "prompt_tokens": 1, "output_tokens": 1}


@pytest.mark.parametrize(("bad", "why"), [
    ({"prompt_tokens": 1, "output_tokens": 1}, "no arrival_s (missing field)"),
    ({**GOOD, "output_tokens": None}, "no output_tokens (missing field)"),
    ({**GOOD, "arrival_s": "soon"}, "arrival_s 'soon' is not a number"),
    ({**GOOD, "arrival_s": True}, "arrival_s 'True' is not a number"),
    ({**GOOD, "prompt_tokens": [3]}, "prompt_tokens '[3]' is not a number"),
    ({**GOOD, "arrival_s": -1}, "arrival_s must be finite and >= 0"),
    ({**GOOD, "prompt_tokens": 0}, "prompt_tokens must be from 1 to"),
    ({**GOOD, "output_tokens": 2.5}, "output_tokens must be a whole number, got '2.5'"),
    ({**GOOD, "request_id": 0}, "a request_id, yet line 1 has none"),
    ([1, 2, 3], "not a JSON object"),
])
def test_every_bad_jsonl_row_names_its_line(tmp_path: Path, bad: object, why: str) -> None:
    msg = _error(_jsonl(tmp_path, [{**GOOD, "arrival_s": 0.1}, GOOD, bad]))  # the bad one on line 3
    assert msg.startswith(", line 3: ") and why in msg, msg


def test_jsonl_errors_of_syntax_and_non_finite(tmp_path: Path) -> None:
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(GOOD) + "\n{\"arrival_s\": 0,\n")
    assert _error(p).startswith(", line 2: not JSON (")
    p.write_text(json.dumps(GOOD) + '\n{"arrival_s": NaN, "prompt_tokens": 1, "output_tokens": 1}\n')
    assert _error(p) == ", line 2: arrival_s must be finite and >= 0, got 'nan'"
    p.write_text(json.dumps({**GOOD, "request_id": 4}) + "\n" + json.dumps({**GOOD, "request_id": 4}) + "\n")
    assert _error(p) == ", line 2: request_id 4 is already on line 1 (duplicate request_id)"


@pytest.mark.parametrize("text", ["", "\n\n", HEADER, "  \n" + HEADER + "\n"])
def test_an_empty_file_is_refused(tmp_path: Path, text: str) -> None:
    assert _error(_csv(tmp_path, text)).startswith(": no requests (CSV with the header")
    p = tmp_path / "e.jsonl"
    p.write_text(text.replace(HEADER, ""))
    assert _error(p).startswith(": no requests")


def test_paths_refused_in_one_line(tmp_path: Path) -> None:
    assert _error(tmp_path / "r.txt").startswith(": unknown extension '.txt' (.csv, .jsonl or .json")
    assert _error(tmp_path / "requests").startswith(": unknown extension ''")
    assert _error(tmp_path / "absent.csv") == ": no such file"
    (tmp_path / "d.csv").mkdir()
    assert _error(tmp_path / "d.csv") == ": is a folder, not a file"
    assert _error(tmp_path / ("x" * 300 + ".csv")) == ": File name too long"
    (tmp_path / "f").write_text("")
    assert _error(tmp_path / "f" / "r.csv").endswith(f": {tmp_path / 'f'} is not a folder")
    (tmp_path / "bin.csv").write_bytes(HEADER.encode() + b"\xff\xfe,1,1\n")
    assert _error(tmp_path / "bin.csv") == f": not UTF-8 text (byte {len(HEADER)})"
