"""Text from files, made safe to print on a terminal.

Key names, trigger words, metadata and paths come from files anyone can write. Printed raw,
their control characters (ANSI escapes, NUL, CR/LF, the C1 range, Unicode line separators
and bidi overrides) can clear a terminal or forge whole report lines (``FAKE: 0 keys not
applied``). Text output escapes them as ``\\xNN`` / ``\\uNNNN``; JSON output stays exact.
"""
from __future__ import annotations

import re

# C0 controls, DEL, C1 controls, line/paragraph separators, bidi embeddings/overrides/isolates
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match) -> str:
    c = ord(m.group(0))
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text) -> str:
    """``text`` with every character that could steer a terminal escaped (newlines too)."""
    return _UNSAFE.sub(_escape, str(text))


def printable_lines(text) -> str:
    """Each line of ``text`` made printable, the line breaks kept (for multi-line reports
    whose lines were built from already-escaped values)."""
    return "\n".join(printable(line) for line in str(text).split("\n"))


__all__ = ["printable", "printable_lines"]
