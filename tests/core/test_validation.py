"""Validation of everything a client sends: each failure has its code."""

import sys
import unicodedata

import pytest

from roomcast.core import validation
from roomcast.exceptions import ChatError, ErrorCode


def code_of(fn, *args):
    with pytest.raises(ChatError) as info:
        fn(*args)
    return info.value.code


@pytest.mark.parametrize(
    "name", ["lobby", "  trimmed  ", "로비", "大厅", "café ☕", "x" * 64, "👨‍👩‍👧 family"]
)
def test_room_names_of_any_script_are_accepted(name):
    assert validation.room_name(name) == name.strip()


@pytest.mark.parametrize(
    "name",
    ["", "   ", "x" * 65, "bad\x00name", "tab\there", "line\nbreak", "a\u2028b", "\u202eevil"],
)
def test_bad_room_names_are_invalid_room(name):
    assert code_of(validation.room_name, name) == ErrorCode.INVALID_ROOM


@pytest.mark.parametrize("check", [validation.room_name, validation.nickname])
def test_names_refuse_exactly_the_ascii_control_characters(check):
    # Every ASCII code point inside a name: refused when Unicode calls it a control (Cc).
    for cp in range(128):
        name = f"a{chr(cp)}b"
        if unicodedata.category(chr(cp)) == "Cc":
            with pytest.raises(ChatError):
                check(name)
        else:
            assert check(name) == name


def test_names_refuse_non_ascii_controls_and_bidi_overrides_next_to_ascii():
    for bad in ("\x85", "\x9f", "\u2028", "\u2029", "\u202e", "\u2066", "\ue000"):
        assert code_of(validation.room_name, f"lob{bad}by") == ErrorCode.INVALID_ROOM


def test_room_name_length_counts_characters_not_bytes():
    assert validation.room_name("한" * 64) == "한" * 64
    assert code_of(validation.room_name, "한" * 65) == ErrorCode.INVALID_ROOM


@pytest.mark.parametrize("value", [None, 3.5, ["a"], {"a": 1}, True])
def test_room_ref_of_wrong_type_is_bad_request(value):
    assert code_of(validation.room_ref, {"room": value}) == ErrorCode.BAD_REQUEST


def test_room_ref_is_an_id_or_a_name():
    assert validation.room_ref({"room": 7}) == 7
    assert validation.room_ref({"room": " lobby "}) == "lobby"
    assert code_of(validation.room_ref, {}) == ErrorCode.BAD_REQUEST
    assert code_of(validation.room_ref, {"room": 0}) == ErrorCode.INVALID_ROOM
    assert code_of(validation.room_ref, {"room": -3}) == ErrorCode.INVALID_ROOM


def test_a_text_is_refused_for_exactly_the_control_characters_and_lone_surrogates():
    # Every code point, in a text around it: refused when Unicode calls it a control
    # character (but tab, line feed, carriage return) or a surrogate, accepted otherwise.
    for code in range(sys.maxunicode + 1):
        ch = chr(code)
        forbidden = unicodedata.category(ch) in ("Cc", "Cs") and ch not in "\t\n\r"
        try:
            accepted = validation.text({"text": f"a{ch}b"}) == f"a{ch}b"
        except ChatError as error:
            assert error.code == ErrorCode.INVALID_TEXT, hex(code)
            accepted = False
        assert accepted is not forbidden, hex(code)


def test_text_limits():
    assert validation.text({"text": "x" * 4000}) == "x" * 4000
    assert validation.text({"text": "😀" * 4000}) == "😀" * 4000
    assert validation.text({"text": "two\nlines"}) == "two\nlines"
    assert code_of(validation.text, {"text": "x" * 4001}) == ErrorCode.INVALID_TEXT
    assert code_of(validation.text, {"text": ""}) == ErrorCode.INVALID_TEXT
    assert code_of(validation.text, {"text": "  \n "}) == ErrorCode.INVALID_TEXT
    assert code_of(validation.text, {"text": 5}) == ErrorCode.INVALID_TEXT
    assert code_of(validation.text, {"text": "nul\x00"}) == ErrorCode.INVALID_TEXT
    assert code_of(validation.text, {}) == ErrorCode.BAD_REQUEST


def test_history_limit_out_of_range_is_an_error_not_clamped():
    assert validation.history_args({}) == (None, 50)
    assert validation.history_args({"before": 10, "limit": 100}) == (10, 100)
    for limit in (0, 101, -1, "5", 2.0, True):
        assert code_of(validation.history_args, {"limit": limit}) == ErrorCode.BAD_REQUEST
    assert code_of(validation.history_args, {"before": 0}) == ErrorCode.BAD_REQUEST


def test_since():
    assert validation.since({}) is None
    pos = validation.since({"since": {"epoch": "ab", "seq": 3}})
    assert (pos.epoch, pos.seq) == ("ab", 3)
    for bad in ({"epoch": 1, "seq": 1}, {"epoch": "a", "seq": -1}, {"epoch": "a"}, [1], "x"):
        assert code_of(validation.since, {"since": bad}) == ErrorCode.BAD_REQUEST


def test_payload_must_be_an_object():
    assert validation.payload(None) == {}
    for bad in ([], "room", 3):
        assert code_of(validation.payload, bad) == ErrorCode.BAD_REQUEST
