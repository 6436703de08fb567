"""What a hostile peer's text can do to the terminal, and where --report writes: escape
sequences in an abort reason reach stderr escaped; a report path that is a planted
symlink is replaced, never followed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from holepunch_mig.wire import messages

CLI = [sys.executable, "-m", "holepunch_mig.cli"]
HOSTILE = "\x1b]0;pwned\x07\x1b[2K\r\nholepunch-mig: transfer OK\x9b31m"


def _read_frame(stream: object) -> bytes:
    read = stream.read  # type: ignore[attr-defined]
    (n,) = messages.LENGTH_PREFIX.unpack(read(4))
    return bytes(read(n))


def _hostile_source(tmp_path: Path, report: Path) -> subprocess.CompletedProcess[bytes]:
    """A fake source on recv's stdio control channel: a valid offer, then abort with a
    reason full of terminal escape sequences."""
    recv = subprocess.Popen(
        [
            *CLI,
            "recv",
            "--control-stdio",
            "--output",
            str(tmp_path / "out.bin"),
            "--report",
            str(report),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert recv.stdin is not None and recv.stdout is not None and recv.stderr is not None
    offer = messages.Offer(
        session="cd" * 16,
        key="ab" * 32,
        port=40000,
        candidates=[],
        policy="direct",
        limits={"max_record": 1 << 20},
    )
    recv.stdin.write(messages.frame(messages.encode(offer)))
    recv.stdin.flush()
    answer = messages.decode(_read_frame(recv.stdout))
    assert isinstance(answer, messages.Answer)
    recv.stdin.write(messages.frame(messages.encode(messages.Abort(reason=HOSTILE))))
    recv.stdin.close()
    err = recv.stderr.read()
    code = recv.wait(timeout=30)
    return subprocess.CompletedProcess(recv.args, code, b"", err)


def test_peer_abort_reason_reaches_the_terminal_escaped(tmp_path: Path) -> None:
    done = _hostile_source(tmp_path, tmp_path / "r.json")
    assert done.returncode == 1
    text = done.stderr.decode("utf-8", "replace")
    assert "pwned" in text  # the reason is shown ...
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text  # ... defused
    assert "\r" not in text
    # the peer's newline cannot start a line of its own that looks like ours
    assert not any(line.startswith("holepunch-mig: transfer OK") for line in text.splitlines())
    assert "\\x1b" in text


def test_report_replaces_a_planted_symlink_instead_of_following_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    planted = tmp_path / "report.json"
    planted.symlink_to(victim)
    done = _hostile_source(tmp_path, planted)
    assert done.returncode == 1
    assert victim.read_text() == "precious\n"
    assert not planted.is_symlink()
    report = json.loads(planted.read_text())
    assert report["ok"] is False
    # written whole under a temporary name beside it: nothing left over
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert os.stat(planted).st_mode & 0o077 in (0, 0o044)
