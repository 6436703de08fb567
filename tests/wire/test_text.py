"""Peer text shown on a terminal: controls escaped, ordinary text untouched."""

from __future__ import annotations

from holepunch_mig.wire.text import printable


def test_controls_are_escaped_and_text_is_kept() -> None:
    assert printable("link lost: ECONNRESET (é, 日本)") == "link lost: ECONNRESET (é, 日本)"
    assert printable("\x1b]0;x\x07a\r\nb\x9b\u202e") == "\\x1b]0;x\\x07a\\x0d\\x0ab\\x9b\\u202e"
    assert printable("a\nb\x1b", keep_newlines=True) == "a\nb\\x1b"
