"""`printable`: every message, table and sample view shows control characters instead of obeying them."""

import unicodedata

import pytest

from did_cli.printable import printable

HOSTILE = [
    "\x1b[2J\x1b]0;PWNED\x07",
    "\x1b]8;;http://evil.example\x1b\\link\x1b]8;;\x1b\\",
    "\x9b2J\x90\x9d",
    "a\rb\bc\x00d\x7f",
    "\udcff\udcfe",
    "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
    "one\ntwo\u2028three\u2029four\tfive",
]


@pytest.mark.parametrize("text", HOSTILE, ids=ascii)
def test_every_control_character_becomes_one_visible_inert_character(text):
    shown = printable(text)
    assert len(shown) == len(text)  # one column each: widths computed afterwards hold
    for char in shown:
        assert unicodedata.category(char) not in ("Cc", "Cs", "Zl", "Zp"), ascii(shown)
        assert not ("\u202a" <= char <= "\u202e" or "\u2066" <= char <= "\u2069"), ascii(shown)
    assert shown.encode("utf-8")  # no lone surrogate left to fail a strict stream


def test_the_pictures_say_which_control_it_was():
    assert printable("\x1b[2J") == "␛[2J" and printable("a\nb\tc") == "a⏎b⇥c" and printable("\x00\x7f") == "␀␡"


def test_ordinary_text_of_every_script_passes_unchanged():
    text = "plain ASCII, café, 日本語, العربية, עברית, 👩‍👩‍👧 (ZWJ), ½ ∑ — “quotes” \u200e\u200f"
    assert printable(text) == text
