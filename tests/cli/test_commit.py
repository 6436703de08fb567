"""The destination says ok only once the output is committed (flushed, fsync'ed,
renamed, directory fsync'ed): a full disk or an output that cannot be put in place
fails both sides, and the temporary file is gone.  The control channel is a
subprocess's stdio (as under ssh), the receiver's limits set before it starts."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "holepunch_mig.cli"]

LIMITED = """\
import os, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execv(sys.executable, [sys.executable, "-m", "holepunch_mig.cli", *sys.argv[2:]])
"""


def _send(tmp_path: Path, src: Path, recv_cmd: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            *CLI,
            "send",
            "--control-cmd",
            " ".join(recv_cmd),
            "--peer-host",
            "127.0.0.1",
            "--input",
            str(src),
            "--report",
            str(tmp_path / "s.json"),
        ],
        capture_output=True,
        timeout=90,
    )


def _payload(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "in.bin"
    path.write_bytes(os.urandom(size))
    return path


def test_file_size_limit_is_not_ok(tmp_path: Path) -> None:
    # 2 MiB + 100 bytes against a 2 MiB + 50 limit: the last record is small enough to sit
    # in the output's buffer until the flush, the step that used to follow the ok
    src = _payload(tmp_path, (2 << 20) + 100)
    out = tmp_path / "outdir"
    out.mkdir()
    wrapper = tmp_path / "limited.py"
    wrapper.write_text(LIMITED)
    recv = [
        sys.executable,
        str(wrapper),
        str((2 << 20) + 50),
        "recv",
        "--control-stdio",
        "--output",
        str(out / "guest.img"),
    ]
    done = _send(tmp_path, src, recv)
    err = done.stderr.decode()
    assert done.returncode != 0, err
    assert "verified by the receiver" not in err
    assert "File too large" in err or "EFBIG" in err or "Errno 27" in err, err
    assert list(out.iterdir()) == []  # neither the output nor its temporary file


def test_output_naming_a_directory_is_not_ok(tmp_path: Path) -> None:
    src = _payload(tmp_path, 3 << 20)
    target = tmp_path / "target"
    target.mkdir()
    recv = [*CLI, "recv", "--control-stdio", "--output", str(target)]
    done = _send(tmp_path, src, recv)
    err = done.stderr.decode()
    assert done.returncode != 0, err
    assert "verified by the receiver" not in err
    assert "directory" in err.lower(), err
    assert list(target.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_committed_output_is_whole(tmp_path: Path) -> None:
    src = _payload(tmp_path, (3 << 20) + 7)
    out = tmp_path / "guest.img"
    done = _send(tmp_path, src, [*CLI, "recv", "--control-stdio", "--output", str(out)])
    assert done.returncode == 0, done.stderr.decode()
    assert "verified by the receiver" in done.stderr.decode()
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
