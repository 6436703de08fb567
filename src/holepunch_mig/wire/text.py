"""Peer-supplied text made safe to show: a reason or verdict from the other side (abort
reasons, results, ABORT records) may carry terminal escape sequences, carriage returns
or newlines that would retitle a terminal or forge a line of our own output.  Such
characters are shown as Python-style escapes (``\\x1b``), the rest passes unchanged."""

from __future__ import annotations

import unicodedata

__all__ = ["printable"]

_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
"""Controls (C0, DEL, C1), format characters (bidi overrides), surrogates, private use,
unassigned, line and paragraph separators."""


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control/format character escaped; one line unless
    ``keep_newlines`` (for our own multi-line output, already built from escaped parts)."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if keep_newlines and ch == "\n":
            out.append(ch)
        elif unicodedata.category(ch) in _UNSAFE:
            out.append(_escape(ch))
        else:
            out.append(ch)
    return "".join(out)
