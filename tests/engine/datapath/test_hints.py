"""Changed-extent hints (engine/datapath/hints.py): the text and ``rbd diff`` JSON formats, merging, and
the errors that name the line and the file at fault."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from blockferry.datapath.extents import merge
from blockferry.datapath.hints import check_within, load_hints, parse_hints
from blockferry.errors import ConfigError, HintError
from hypothesis import given, settings
from hypothesis import strategies as st

# -- text format ---------------------------------------------------------------------------------


def test_text_decimal_and_hex() -> None:
    assert parse_hints("0 4096\n0x100000 0x2000\n") == [(0, 4096), (0x100000, 0x2000)]


def test_text_zero_padded_decimal() -> None:
    # "decimal" includes zero-padded numbers (printf "%012d" output); 010 is ten, not an error
    assert parse_hints("0000004096 0512\n010 05\n") == [(10, 5), (4096, 512)]


def test_text_blank_lines_and_comments_ignored() -> None:
    text = "\n# changed extents of sda\n\n   \n8192 512   # a trailing comment\n\t# indented comment\n0 512\n\n"
    assert parse_hints(text) == [(0, 512), (8192, 512)]


def test_text_tabs_and_extra_spaces_between_fields() -> None:
    assert parse_hints("  4096\t\t 100  \r\n") == [(4096, 100)]


def test_empty_and_comment_only_input_gives_no_extents() -> None:
    assert parse_hints("") == []
    assert parse_hints("\n\n# nothing changed\n") == []


# -- JSON (rbd diff --format json) ---------------------------------------------------------------


def test_rbd_diff_json() -> None:
    doc = json.dumps([
        {"offset": 4194304, "length": 4194304, "exists": "true"},
        {"offset": 0, "length": 1048576, "exists": "true"},
        {"offset": 16777216, "length": 4194304, "exists": "false"},
    ])
    # extents that no longer exist are read again too (they read back as zeros)
    assert parse_hints(doc) == [(0, 1048576), (4194304, 4194304), (16777216, 4194304)]


def test_rbd_diff_json_with_leading_whitespace_and_bool_exists() -> None:
    doc = '\n  [{"offset": 10, "length": 5, "exists": true}, {"offset": 0, "length": 5, "exists": false}]'
    assert parse_hints(doc) == [(0, 5), (10, 5)]


def test_rbd_diff_json_empty_list() -> None:
    assert parse_hints("[]") == []


@pytest.mark.parametrize("doc", [
    "[{\"offset\": 0}]",
    "[{\"offset\": \"0\", \"length\": 5}]",
    "[1, 2]",
    "[{\"offset\": 0, \"length\": 5}",
])
def test_rbd_diff_json_malformed_names_the_source(doc: str) -> None:
    with pytest.raises(HintError) as ei:
        parse_hints(doc, "sda.json")
    assert "sda.json" in str(ei.value)
    assert "JSON" in str(ei.value)


@pytest.mark.parametrize("entry", [{"offset": -1, "length": 5}, {"offset": 0, "length": -5}])
def test_rbd_diff_json_negative_refused(entry: dict[str, int]) -> None:
    doc = json.dumps([{"offset": 0, "length": 1}, entry])
    with pytest.raises(HintError) as ei:
        parse_hints(doc, "sda.json")
    assert "sda.json" in str(ei.value)
    assert "entry 1" in str(ei.value)


# -- sorting and merging ---------------------------------------------------------------------------


def test_results_sorted_and_merged() -> None:
    text = "\n".join([
        "100 10",  # 100..110
        "0 10",  # 0..10
        "10 5",  # adjacent to 0..10 -> 0..15
        "105 20",  # overlaps 100..110 -> 100..125
        "50 0",  # zero length: dropped
        "200 1",
        "110 3",  # inside 100..125
        "300 0",
    ])
    assert parse_hints(text) == [(0, 15), (100, 25), (200, 1)]


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad,lineno", [
    ("4096", 3),  # one field
    ("1 2 3", 3),  # three fields
    ("abc 10", 3),  # not a number
    ("10 1.5", 3),  # not a whole number
    ("10 0xZZ", 3),
    ("-10 5", 3),  # negative offset
    ("10 -5", 3),  # negative length
    ("-0x10 5", 3),
])
def test_bad_line_names_its_number(bad: str, lineno: int) -> None:
    text = f"0 512\n# comment\n{bad}\n4096 512\n"
    with pytest.raises(HintError) as ei:
        parse_hints(text, "sda.hints")
    msg = str(ei.value)
    assert f"sda.hints line {lineno}" in msg
    assert isinstance(ei.value, ConfigError)


def test_line_number_counts_blank_and_comment_lines() -> None:
    with pytest.raises(HintError, match=r"line 6\b"):
        parse_hints("\n\n# a\n0 1\n\nbroken\n")


def test_negative_and_non_number_messages_differ() -> None:
    with pytest.raises(HintError, match="negative"):
        parse_hints("-1 5")
    with pytest.raises(HintError, match="not a whole number"):
        parse_hints("x 5")
    with pytest.raises(HintError, match="OFFSET LENGTH"):
        parse_hints("1 2 3")


def test_load_hints_reads_a_file(tmp_path: Path) -> None:
    p = tmp_path / "sda.hints"
    p.write_text("# since yesterday\n0x1000 0x1000\n0 4096\n")
    assert load_hints(p) == [(0, 8192)]
    assert load_hints(str(p)) == [(0, 8192)]


def test_load_hints_reads_json_file(tmp_path: Path) -> None:
    p = tmp_path / "sda.json"
    p.write_text(json.dumps([{"offset": 0, "length": 4096, "exists": "true"}]))
    assert load_hints(p) == [(0, 4096)]


def test_load_hints_error_names_the_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "sda.hints"
    p.write_text("0 4096\nnonsense here\n")
    with pytest.raises(HintError) as ei:
        load_hints(p)
    assert f"{p} line 2" in str(ei.value)


def test_load_hints_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.hints"
    with pytest.raises(HintError) as ei:
        load_hints(p)
    assert str(p) in str(ei.value)
    assert "does not exist" in str(ei.value)


def test_load_hints_unreadable_file(tmp_path: Path) -> None:
    p = tmp_path / "binary.hints"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(HintError) as ei:
        load_hints(p)
    assert str(p) in str(ei.value)
    with pytest.raises(HintError):
        load_hints(tmp_path)  # a directory


# -- check_within ----------------------------------------------------------------------------------


def test_check_within_accepts_extents_up_to_the_end() -> None:
    check_within([(0, 10), (90, 10)], 100, "sda.hints")
    check_within([], 0, "sda.hints")


@pytest.mark.parametrize("extent", [(90, 11), (100, 1), (1000, 5)])
def test_check_within_refuses_extent_beyond_the_disk(extent: tuple[int, int]) -> None:
    with pytest.raises(HintError) as ei:
        check_within([(0, 10), extent], 100, "sda.hints")
    msg = str(ei.value)
    assert "sda.hints" in msg
    assert f"{extent[0]}+{extent[1]}" in msg
    assert "100 bytes" in msg


extents_st = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 12)), max_size=12)


@settings(max_examples=100, deadline=None)
@given(extents_st)
def test_parse_hints_text_matches_merge(extents: list[tuple[int, int]]) -> None:
    text = "\n".join(f"{off} {hex(n)}" if i % 2 else f"{hex(off)} {n}" for i, (off, n) in enumerate(extents))
    assert parse_hints(text) == merge(extents)
    doc = json.dumps([{"offset": off, "length": n, "exists": "true"} for off, n in extents])
    assert parse_hints(doc) == merge(extents)
