"""Text that is safe to show on a terminal: the one escaping every message, note, table and sample view goes through.

Strings from outside did (file names, a record's model name, a model's tokens, a library's error text) can hold
control characters. Printed raw, an escape sequence clears the screen, sets the window title, hides later output
inside an unterminated OSC string or fakes a link; a carriage return or backspace overwrites what came before; a
newline splits a one-line error. `printable` replaces each such character with something visible and inert:

* C0 controls (U+0000-U+001F) with Unicode's control pictures (ESC shows as ␛, NUL as ␀), except a newline (⏎) and
  a tab (⇥); DEL as ␡;
* C1 controls (U+0080-U+009F, where 0x9b starts an escape sequence on some terminals), lone surrogates (the
  undecodable bytes of a file name) and the bidirectional embeddings, overrides and isolates that reorder what is
  shown (the "Trojan Source" characters), and the line and paragraph separators, with U+FFFD.

Everything else, other scripts and emoji included, passes unchanged; each replacement is one column wide, so widths
computed afterwards (a table column, a name cut to fit) hold.
"""

from __future__ import annotations

__all__ = ["printable"]

_REPLACEMENT = "\ufffd"
_BIDI = (*range(0x202A, 0x202F), *range(0x2066, 0x206A))  # LRE RLE PDF LRO RLO, LRI RLI FSI PDI
_TABLE: dict[int, str] = {code: chr(0x2400 + code) for code in range(0x20)}
_TABLE[ord("\n")] = "⏎"
_TABLE[ord("\t")] = "⇥"
_TABLE[0x7F] = "␡"
_TABLE.update(dict.fromkeys(range(0x80, 0xA0), _REPLACEMENT))
_TABLE.update(dict.fromkeys((*_BIDI, 0x2028, 0x2029), _REPLACEMENT))
_TABLE.update(dict.fromkeys(range(0xD800, 0xE000), _REPLACEMENT))


def printable(text: str) -> str:
    """`text` on one line with every control character shown as a visible, inert character (module docstring)."""
    return text.translate(_TABLE)
